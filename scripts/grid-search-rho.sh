#!/usr/bin/env bash
# The paper's rho grid search (Section 5.3): train SAM and ASAM for each rho in
# {0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0}, evaluate on valid, pick the rho with the best
# validation BLEU (the paper found 0.1 for SAM and 0.2 for ASAM). Finished runs are reused, an
# interrupted one resumes.
#
#   bash scripts/grid-search-rho.sh                               # full grid, seed 1
#   METHODS=asam RHOS="0.1 0.2" MAX_UPDATE=300 bash scripts/grid-search-rho.sh --max-tokens 1024
# Env: METHODS (default "sam asam"), RHOS, SEEDS (default "1"), GRID_DIR (default runs/iwslt14-grid),
# DATA, MAX_UPDATE; extra arguments go to fairseq-train.
set -euo pipefail
METHODS="${METHODS:-sam asam}"
RHOS="${RHOS:-0.005 0.01 0.02 0.05 0.1 0.2 0.5 1.0 2.0}"
SEEDS="${SEEDS:-1}"
GRID_DIR="${GRID_DIR:-runs/iwslt14-grid}"
PYTHON="${PYTHON:-python}"
if [[ -x .venv/bin/python && "${PYTHON}" == python ]]; then PYTHON=.venv/bin/python; fi
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

for method in ${METHODS}; do
    case "${method}" in sam|asam) ;; *) echo "grid-search-rho: METHODS may hold sam and asam, got ${method}" >&2; exit 2;; esac
    for rho in ${RHOS}; do
        for seed in ${SEEDS}; do
            run="${GRID_DIR}/${method}-rho${rho}-seed${seed}"
            echo "=== grid: ${method} rho=${rho} seed=${seed} -> ${run}"
            if [[ -f "${run}/eval.json" ]]; then
                echo "    already evaluated, reused"
                continue
            fi
            RHO="${rho}" RUN_DIR="${run}" bash "${here}/train-iwslt14.sh" "${method}" "${seed}" "$@"
            bash "${here}/evaluate-iwslt14.sh" "${run}" --subsets valid
        done
    done
done
"${PYTHON}" "${here}/summarize.py" --grid "${GRID_DIR}" --out "${GRID_DIR}"
