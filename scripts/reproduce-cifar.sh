#!/usr/bin/env bash
# The paper's CIFAR comparisons (Tables 2 and 3): every model x {SGD, SAM, ASAM} x seeds, then a table of
# the mean ± std of the maximum test accuracy, like the paper's. Runs that finished are skipped and
# interrupted ones resume from their last checkpoint, so the script can simply be run again.
#
#   bash scripts/reproduce-cifar.sh                      # everything, the paper's settings (days on one GPU)
#   DATASETS=cifar10 MODELS="resnet20 wrn28_2" SEEDS="0 1 2" bash scripts/reproduce-cifar.sh
#
# Settings (environment): DATASETS, MODELS, METHODS, SEEDS, DATA_DIR, OUT, EPOCHS (empty: the paper's
# 200 for SAM/ASAM and 400 for SGD), LABEL_NOISE (Table 6, e.g. 0.4 with MODELS=resnet32),
# EXTRA_ARGS (passed to asam-vision-train, e.g. "--amp bf16 --workers 8"), PYTHON.
set -euo pipefail
cd "$(dirname "$0")/.."

DATASETS=${DATASETS:-"cifar10 cifar100"}
MODELS=${MODELS:-"resnet20 resnet56 vgg19_bn densenet121 wrn28_2 wrn28_10 resnext29_32x4d"}
METHODS=${METHODS:-"sgd sam asam"}
SEEDS=${SEEDS:-"0 1 2 3 4"}
DATA_DIR=${DATA_DIR:-data}
OUT=${OUT:-runs/cifar}
EPOCHS=${EPOCHS:-}
LABEL_NOISE=${LABEL_NOISE:-0}
EXTRA_ARGS=${EXTRA_ARGS:-}
if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi

run_dirs=()
for dataset in $DATASETS; do
  for model in $MODELS; do
    for method in $METHODS; do
      for seed in $SEEDS; do
        dir="$OUT/$dataset-$model-$method-noise$LABEL_NOISE-s$seed"
        run_dirs+=("$dir")
        if [[ -f "$dir/summary.json" ]] && "$PYTHON" -c 'import json,sys; s=json.load(open(sys.argv[1])); sys.exit(s["epochs_done"] != s["epochs"])' "$dir/summary.json"; then
          echo "== $dir: done, skipping"
          continue
        fi
        args=(--dataset "$dataset" --data-dir "$DATA_DIR" --model "$model" --minimizer "$method" --seed "$seed"
              --label-noise "$LABEL_NOISE" --run-dir "$dir" --no-progress)
        [[ -n "$EPOCHS" ]] && args+=(--epochs "$EPOCHS")
        [[ -f "$dir/checkpoint_last.pt" ]] && args+=(--resume)
        echo "== $dir: training (${args[*]} $EXTRA_ARGS)"
        # shellcheck disable=SC2086  # EXTRA_ARGS is a list of flags
        "$PYTHON" -m fairseq_asam.vision "${args[@]}" $EXTRA_ARGS
      done
    done
  done
done

echo "== maximum test accuracy (%), mean ± std over seeds; table also in $OUT/summary.md"
"$PYTHON" -m fairseq_asam.vision.report "${run_dirs[@]}" --markdown "$OUT/summary.md"
