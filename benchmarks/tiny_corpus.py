"""A tiny synthetic parallel corpus, binarized with the real ``fairseq-preprocess``.

The benchmark's fairseq sections, the tests and the guides' offline examples train on it.
``make_tiny_corpus(dir)`` writes a German-English-shaped corpus in fairseq's raw text format (one
sentence per line, space-separated tokens) under ``dir/raw`` and binarizes it into ``dir/data-bin``,
which it returns (what ``fairseq-train DATA`` takes). From the repository root::

    .venv/bin/python -m benchmarks.tiny_corpus runs/tiny
"""

from __future__ import annotations

import argparse
import os
import random
import subprocess
import sys
from pathlib import Path

__all__ = ["make_tiny_corpus", "make_tiny_lm_corpus", "write_tiny_raw_corpus"]

# The "translation" the corpus encodes: every source word has one target word, and the target
# sentence is the source sentence mapped word by word, in the same order. A one-layer transformer of
# width 64 learns it in 300 updates (docs/fairseq.md's "Try it": test BLEU about 75). The target used
# to be reversed as well; 200 updates of that model then gave BLEU 15 (the right words, mostly in the
# wrong order), against 65 in the same order. The random draws are the same as then, so every
# sentence kept its length and its batch.
_SRC_WORDS = [f"s{i}" for i in range(24)]
_TGT_WORDS = [f"t{i}" for i in range(24)]


def _sentence_pair(rng: random.Random) -> tuple[str, str]:
    n = rng.randint(3, 9)
    idx = [rng.randrange(len(_SRC_WORDS)) for _ in range(n)]
    return " ".join(_SRC_WORDS[i] for i in idx), " ".join(_TGT_WORDS[i] for i in idx)


def write_tiny_raw_corpus(raw_dir, *, n_train: int = 240, n_valid: int = 24, n_test: int = 16, seed: int = 1) -> Path:
    """Write train/valid/test.{de,en} into ``raw_dir``; returns ``raw_dir``."""
    for name, n in (("n_train", n_train), ("n_valid", n_valid), ("n_test", n_test)):
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {n!r}")
    raw = Path(raw_dir)
    raw.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    for split, n in (("train", n_train), ("valid", n_valid), ("test", n_test)):
        pairs = [_sentence_pair(rng) for _ in range(n)]
        (raw / f"{split}.de").write_text("".join(s + "\n" for s, _ in pairs), encoding="utf-8")
        (raw / f"{split}.en").write_text("".join(t + "\n" for _, t in pairs), encoding="utf-8")
    return raw


def make_tiny_lm_corpus(tmpdir, *, in_process: bool = False) -> str:
    """The English side of the tiny corpus binarized for fairseq's language_modeling task; returns data-bin."""
    tmp = Path(tmpdir)
    raw = write_tiny_raw_corpus(tmp / "raw")
    return _preprocess(tmp / "lm-data-bin", "--only-source",
                       "--trainpref", str(raw / "train.en"), "--validpref", str(raw / "valid.en"),
                       in_process=in_process)


def make_tiny_corpus(tmpdir, *, in_process: bool = False, **corpus_kwargs) -> str:
    """Write the raw corpus under ``tmpdir/raw`` and binarize it into ``tmpdir/data-bin``; returns data-bin.

    ``in_process=True`` runs fairseq-preprocess's ``main`` in this process (the same files, without a new
    Python and a fresh fairseq import: what the tests' fast tier needs).
    """
    tmp = Path(tmpdir)
    raw = write_tiny_raw_corpus(tmp / "raw", **corpus_kwargs)
    return _preprocess(
        tmp / "data-bin", "--source-lang", "de", "--target-lang", "en",
        "--trainpref", str(raw / "train"), "--validpref", str(raw / "valid"), "--testpref", str(raw / "test"),
        in_process=in_process,
    )  # fmt: skip


def _preprocess_here(argv: list[str]) -> None:
    """fairseq-preprocess's main in this process, leaving the process's logging as it found it."""
    import logging

    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        from fairseq import options
        from fairseq_cli import preprocess  # its first import calls logging.basicConfig(stream=sys.stdout)
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
    log = logging.getLogger("fairseq_cli.preprocess")
    before = list(log.handlers)
    try:
        preprocess.main(options.get_preprocessing_parser().parse_args(argv))
    finally:
        for h in log.handlers[len(before):]:  # the preprocess.log FileHandler main adds on every call
            log.removeHandler(h)
            h.close()


def _preprocess(dest, *args: str, in_process: bool = False) -> str:
    """Run the real fairseq-preprocess into ``dest``; returns it."""
    argv = [*args, "--destdir", str(dest), "--workers", "1"]
    if in_process:
        _preprocess_here(argv)
        return str(dest)
    cmd = [sys.executable, "-m", "fairseq_cli.preprocess", *argv]
    # One thread: the corpus is tiny and thread start-up only costs on a shared machine.
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"fairseq-preprocess failed:\n{proc.stderr[-4000:]}")
    return str(dest)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Write the tiny synthetic corpus and binarize it with fairseq-preprocess.")
    ap.add_argument("out", type=Path, help="folder that receives raw/ and data-bin/")
    ap.add_argument("--train", type=int, default=240, help="training pairs (default: %(default)s)")
    args = ap.parse_args(argv)
    if args.train < 1:
        ap.error(f"--train must be >= 1, got {args.train}")
    print(make_tiny_corpus(args.out, n_train=args.train))
    return 0


if __name__ == "__main__":
    sys.exit(main())
