"""Train a Transformer on IWSLT'14 DE-EN with Adam, Adam+SAM or Adam+ASAM (paper Section 5.3, Table 5).

The paper's settings: transformer_iwslt_de_en with shared decoder input/output embeddings, Adam
(lr 5e-4, betas 0.9/0.98), inverse_sqrt schedule with 4000 warm-up updates, dropout 0.3, weight
decay 1e-4, label smoothing 0.1, max-tokens 4096; rho = 0.1 for SAM and 0.2 for ASAM (picked by the
paper's grid search on validation BLEU; eta = 0.01, p = 2, element-wise, no bias normalization).
A fourth method, ``asam-onepass``, is not in the paper: ASAM with one forward/backward pass per update,
perturbed along Adam's first moment (``--asam-one-pass momentum``, docs/efficiency.md), at ASAM's rho.
Validation BLEU is computed during training (``--eval-bleu``, as fairseq's IWSLT'14 example) and
picks checkpoint_best.pt. The paper does not give a training length; the default here is 50,000
updates (about 40 epochs at max-tokens 4096), overridable. On a GPU the run uses fairseq's ``--amp``
(fp32 weights, fp16 autocast) unless a precision flag is given: under ``--fp16`` the ascent perturbs the
fp16 weights, where most of eps rounds away (docs/precision.md).

One run directory per method and seed (``runs/iwslt14/<method>-seed<seed>/``) holds checkpoints/,
train.log (fairseq's JSON log) and run.json (the exact fairseq-train command). Running the same
command again resumes from checkpoints/checkpoint_last.pt. Every setting can be overridden: the
flags below (or the environment variables named in their help), and any further argument is passed
to fairseq-train after the defaults, so it wins (argparse keeps the last value)::

    bash scripts/train-iwslt14.sh asam 1
    MAX_UPDATE=200 bash scripts/train-iwslt14.sh sam 2 --max-tokens 1024 --encoder-layers 2
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

from ..checks import argparse_type, check_int, check_rho

__all__ = ["DEFAULT_RHO", "METHODS", "PAPER_RHO", "fairseq_train_args", "main"]

METHODS = ("adam", "sam", "asam", "asam-onepass")
PAPER_RHO = {"sam": 0.1, "asam": 0.2}  # paper Section 5.3
# One pass along the momentum at ASAM's own rho: the efficiency study found that a stale direction wants
# the same or a smaller rho than the two-pass update with ASAM's T_w, never MSAM's larger one.
DEFAULT_RHO = {**PAPER_RHO, "asam-onepass": PAPER_RHO["asam"]}
_OPTIMIZER = {"adam": "adam", "sam": "sam_adam", "asam": "asam_adam", "asam-onepass": "asam_adam"}
_POLICY = {"asam-onepass": ["--asam-one-pass", "momentum"]}
DEFAULT_DATA = "data-bin/iwslt14.tokenized.de-en"
DEFAULT_RUNS = "runs/iwslt14"
DEFAULT_MAX_UPDATE = 50000
# Any of these in the extra arguments decides the precision (or the device) and no --amp is added.
_PRECISION_FLAGS = ("--cpu", "--amp", "--fp16", "--bf16", "--memory-efficient-fp16", "--memory-efficient-bf16")
# --user-dir as an absolute path: fairseq resolves a relative one against the working directory.
USER_DIR = str(Path(__file__).resolve().parent.parent)


def _remove_bpe(data: Path) -> str:
    """The --remove-bpe flavour matching how the data was prepared (prep-info.json from prepare.py)."""
    info = Path(data) / "prep-info.json"
    if info.exists():
        return json.loads(info.read_text()).get("remove_bpe", "subword_nmt")
    return "subword_nmt"


def fairseq_train_args(method: str, seed: int, *, data: str | Path, run_dir: str | Path, rho: float | None = None,
                       max_update: int = DEFAULT_MAX_UPDATE, eval_bleu: bool = True, extra: list[str] = (),
                       cuda: bool | None = None) -> list[str]:
    """The fairseq-train argument list for one run (the paper's settings, then ``extra``).

    ``cuda`` (default: whether torch sees a CUDA device): the run trains on a GPU, so ``--amp`` is added
    unless ``extra`` names a precision flag or ``--cpu``; ``--fp16`` would leave most weights unperturbed.
    """
    if method not in METHODS:
        raise ValueError(f"METHOD must be one of {', '.join(METHODS)}, got {method!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"SEED must be an integer, got {seed!r}")
    check_int(seed, "SEED", 0)
    if isinstance(max_update, bool) or not isinstance(max_update, int):
        raise ValueError(f"MAX_UPDATE must be an integer, got {max_update!r}")
    check_int(max_update, "MAX_UPDATE", 1)
    if rho is not None and method == "adam":
        raise ValueError("RHO/--rho only applies to sam and asam, not adam")
    run_dir = Path(run_dir)
    args = [
        str(data),
        "--user-dir", USER_DIR,
        "--task", "translation" if method == "adam" else "translation_sam",
        "--source-lang", "de", "--target-lang", "en",
        "--arch", "transformer_iwslt_de_en", "--share-decoder-input-output-embed",
        "--optimizer", _OPTIMIZER[method], "--adam-betas", "(0.9, 0.98)", "--clip-norm", "0.0",
        "--lr", "5e-4", "--lr-scheduler", "inverse_sqrt", "--warmup-updates", "4000",
        "--dropout", "0.3", "--weight-decay", "0.0001",
        "--criterion", "label_smoothed_cross_entropy", "--label-smoothing", "0.1",
        "--max-tokens", "4096",
        # fairseq-fixed 0.12.3.1's compiled batch_by_size drops the last (n mod 8) sentences with the
        # default multiple of 8, so validation (loss, --eval-bleu) would skip up to 7 sentences.
        "--required-batch-size-multiple", "1",
        "--max-update", str(max_update),
        "--seed", str(seed),
        "--save-dir", str(run_dir / "checkpoints"), "--no-epoch-checkpoints",
        "--log-format", "json", "--log-interval", "100", "--log-file", str(run_dir / "train.log"),
    ]
    if method != "adam":
        r = check_rho(DEFAULT_RHO[method] if rho is None else rho, "RHO")
        args += ["--asam-rho", str(r), *_POLICY.get(method, [])]
    if cuda is None:
        import torch

        cuda = torch.cuda.is_available()
    if cuda and not any(a.split("=", 1)[0] in _PRECISION_FLAGS for a in extra):
        args.append("--amp")
    if eval_bleu:
        args += [
            "--eval-bleu", "--eval-bleu-args", '{"beam": 5, "max_len_a": 1.2, "max_len_b": 10}',
            "--eval-bleu-detok", "moses", "--eval-bleu-remove-bpe", _remove_bpe(Path(data)),
            "--best-checkpoint-metric", "bleu", "--maximize-best-checkpoint-metric",
        ]
    return args + list(extra)


def finished_updates(run_dir: Path) -> int:
    """Updates reached by the last validation in run_dir/train.log (0 if none).

    fairseq-train resumed at max_update would still take one more update before it checks the limit,
    so a finished run is recognised here and not started again.
    """
    from .summarize import read_valid_log

    pts = read_valid_log(Path(run_dir) / "train.log")
    return pts[-1]["update"] if pts and (Path(run_dir) / "checkpoints" / "checkpoint_last.pt").exists() else 0


def _last_value(args: list[str], flag: str) -> str | None:
    value = None
    for i, a in enumerate(args):
        if a == flag and i + 1 < len(args):
            value = args[i + 1]
        elif a.startswith(flag + "="):
            value = a.split("=", 1)[1]
    return value


def _env_int(name: str, default):
    v = os.environ.get(name)
    if v in (None, ""):
        return default
    try:
        return int(v)
    except ValueError:
        raise SystemExit(f"asam-iwslt-train: error: {name} must be an integer, got {v!r}") from None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="asam-iwslt-train", allow_abbrev=False,
        description="Train Adam / Adam+SAM / Adam+ASAM (or ASAM one-pass) on IWSLT'14 DE-EN with the paper's settings. "
        "Unknown arguments are passed to fairseq-train after the defaults (so they override them).",
    )
    ap.add_argument("method", choices=METHODS)
    ap.add_argument("seed", nargs="?", type=int, default=1, help="random seed (default: 1)")
    ap.add_argument("--data", default=os.environ.get("DATA", DEFAULT_DATA), help="binarized data (env DATA; default: %(default)s)")
    ap.add_argument("--run-dir", default=os.environ.get("RUN_DIR"),
                    help="run directory (env RUN_DIR; default: $RUNS/<method>-seed<seed>)")
    ap.add_argument("--runs", default=os.environ.get("RUNS", DEFAULT_RUNS), help="root of run directories (env RUNS; default: %(default)s)")
    ap.add_argument("--rho", type=argparse_type(check_rho, "--rho (RHO)"), default=os.environ.get("RHO") or None,
                    help="SAM/ASAM radius (env RHO; default: the paper's 0.1 for sam, 0.2 for asam and asam-onepass)")
    ap.add_argument("--no-eval-bleu", action="store_true", help="skip BLEU during validation (faster; best = lowest loss)")
    ap.add_argument("--dry-run", action="store_true", help="print the fairseq-train command and exit")
    args, extra = ap.parse_known_args(argv)
    if args.seed < 0:
        ap.error(f"SEED must be >= 0, got {args.seed}")
    max_update = _env_int("MAX_UPDATE", DEFAULT_MAX_UPDATE)
    if max_update < 1:
        ap.error(f"MAX_UPDATE must be >= 1, got {max_update}")
    if args.rho is not None and args.method == "adam":
        ap.error("--rho (RHO) only applies to sam and asam")
    if not args.dry_run and not Path(args.data).is_dir():
        ap.error(f"--data (DATA) {args.data}: no such directory; run data-prep/prepare-iwslt14.sh first")
    run_dir = Path(args.run_dir or Path(args.runs) / f"{args.method}-seed{args.seed}")
    fs_args = fairseq_train_args(args.method, args.seed, data=args.data, run_dir=run_dir, rho=args.rho,
                                 max_update=max_update, eval_bleu=not args.no_eval_bleu, extra=extra)
    cmd = [sys.executable, "-m", "fairseq_cli.train", *fs_args]
    if args.dry_run:
        print(shlex.join(cmd))
        return 0
    target = int(_last_value(fs_args, "--max-update"))
    if finished_updates(run_dir) >= target:
        print(f"[train-iwslt14] {run_dir} already reached {target} updates; nothing to do "
              "(raise MAX_UPDATE or --max-update to train further)", flush=True)
        return 0
    run_dir.mkdir(parents=True, exist_ok=True)
    meta = {"method": args.method, "seed": args.seed, "data": str(args.data),
            "rho": (args.rho or DEFAULT_RHO[args.method]) if args.method != "adam" else None,
            "fairseq_train_args": fs_args}
    tmp = run_dir / f"run.json.tmp-{os.getpid()}"
    tmp.write_text(json.dumps(meta, indent=1) + "\n")
    os.replace(tmp, run_dir / "run.json")
    resumed = (run_dir / "checkpoints" / "checkpoint_last.pt").exists()
    print(f"[train-iwslt14] {args.method} seed {args.seed} -> {run_dir}" + (" (resuming from checkpoint_last.pt)" if resumed else ""),
          flush=True)
    return subprocess.call(cmd)


if __name__ == "__main__":
    sys.exit(main())
