"""Helpers for tests (and benchmarks) that run real fairseq on a tiny corpus.

``make_tiny_corpus(tmpdir)`` (from ``benchmarks/tiny_corpus.py``, which the benchmark shares) writes a
small synthetic German-English-shaped parallel corpus and binarizes it with the real
``fairseq-preprocess``; it returns the ``data-bin`` directory that ``fairseq-train DATA`` takes.

``tiny_model_args()`` is a 1-layer, 16-dim transformer (the ``transformer`` arch with small sizes): a
few hundred updates a minute on one CPU core. ``run_fairseq(tool, args)`` runs a fairseq console
entry point (``train``, ``generate``, ``interactive``, ``hydra_train``) in a fresh Python process:
fairseq keeps global state (metrics aggregators, registries, logging handlers) that must not leak
between runs.

Example (from the repository root)::

    .venv/bin/python -m benchmarks.tiny_corpus runs/tiny
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import fairseq_asam
from benchmarks.tiny_corpus import make_tiny_corpus, make_tiny_lm_corpus, write_tiny_raw_corpus  # noqa: F401 (the tests import them from here)

REPO = Path(__file__).resolve().parents[1]
USER_DIR = str(Path(fairseq_asam.__file__).resolve().parent)


def tiny_model_args() -> list[str]:
    """A 1-layer 16-dim transformer, dropout 0.1, and the defaults the tests share."""
    return [
        "--arch", "transformer",
        "--encoder-layers", "1", "--decoder-layers", "1",
        "--encoder-embed-dim", "16", "--decoder-embed-dim", "16",
        "--encoder-ffn-embed-dim", "32", "--decoder-ffn-embed-dim", "32",
        "--encoder-attention-heads", "2", "--decoder-attention-heads", "2",
        "--dropout", "0.1",
    ]  # fmt: skip


# Validation with BLEU (beam 1): it also puts numpy arrays into the checkpoint's saved metrics.
EVAL_BLEU_ARGS = [
    "--eval-bleu", "--eval-bleu-args", '{"beam": 1, "max_len_b": 12}',
    "--best-checkpoint-metric", "bleu", "--maximize-best-checkpoint-metric",
]  # fmt: skip


def tiny_train_args(data_bin, save_dir, *extra: str, validate: bool = False) -> list[str]:
    """fairseq-train arguments for a short CPU run on the tiny corpus (extra args go last and win).

    ``validate=True`` validates with BLEU at each epoch end and at the last update instead of
    ``--disable-validation``.
    """
    return [
        str(data_bin),
        "--user-dir", USER_DIR,
        *tiny_model_args(),
        "--criterion", "label_smoothed_cross_entropy", "--label-smoothing", "0.1",
        "--lr", "5e-3", "--adam-betas", "(0.9, 0.98)", "--weight-decay", "1e-4",
        "--max-tokens", "200", "--seed", "3", "--cpu", "--num-workers", "0",
        "--save-dir", str(save_dir), "--no-epoch-checkpoints", "--no-progress-bar",
        "--log-format", "json", "--log-interval", "1",
        *(EVAL_BLEU_ARGS if validate else ["--disable-validation"]),
        *extra,
    ]  # fmt: skip


def _env() -> dict:
    env = dict(os.environ)
    # The repository on the path (the package, benchmarks/), one thread per process:
    # the tests share two cores and thread oversubscription only makes every run slower.
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.setdefault("OMP_NUM_THREADS", "1")
    env.setdefault("MKL_NUM_THREADS", "1")
    return env


def train_logs(proc, kind: str = "train_inner") -> list[dict]:
    """The JSON records fairseq-train (``--log-format json``) logged under ``kind`` (train_inner, train, valid)."""
    import json

    out = []
    for line in proc.stdout.splitlines():
        marker = f"| {kind} | "
        if marker in line:
            out.append(json.loads(line.split(marker, 1)[1]))
    return out


def run_fairseq(tool: str, args: list[str], *, check: bool = True, timeout: float = 300, input: str | None = None):
    """Run ``fairseq_cli.<tool>`` (train, generate, interactive, hydra_train, ...) in a fresh process."""
    cmd = [sys.executable, "-c", f"import sys; from fairseq_cli.{tool} import cli_main; sys.argv[0] = 'fairseq-{tool}'; cli_main()", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=timeout, cwd=str(REPO), input=input)
    if check and proc.returncode != 0:
        raise RuntimeError(f"fairseq-{tool} failed (exit {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return proc


# ---- in-process: fairseq's own Trainer, for tests that look inside one update ------------------------


def build_trainer(data_bin, save_dir, *extra: str, task_cls=None, cfg_edit=None, args=None):
    """fairseq's Trainer, task, model and criterion built the way fairseq_cli.train.main builds them.

    ``extra`` are fairseq-train flags (``args``, if given, is the whole argument list instead of
    ``tiny_train_args(data_bin, save_dir, *extra)``); ``task_cls`` replaces the task class (e.g. a subclass that
    records what happens inside an update); ``cfg_edit(cfg)`` may change the parsed config (e.g. bf16
    without fairseq's command-line rule that --bf16 implies --tpu). Returns (trainer, task, cfg).
    """
    from fairseq import options, tasks, utils
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf
    from fairseq.trainer import Trainer
    from omegaconf import open_dict

    parser = options.get_training_parser()
    args = options.parse_args_and_arch(parser, args if args is not None else tiny_train_args(data_bin, save_dir, *extra))
    cfg = convert_namespace_to_omegaconf(args)
    if cfg_edit is not None:
        with open_dict(cfg):
            cfg_edit(cfg)
    utils.import_user_module(cfg.common)
    utils.set_torch_seed(cfg.common.seed)
    if task_cls is None:
        task = tasks.setup_task(cfg.task)
    else:
        task = task_cls.setup_task(cfg.task)
    task.load_dataset("train")
    model = task.build_model(cfg.model)
    criterion = task.build_criterion(cfg.criterion)
    return Trainer(cfg, task, model, criterion), task, cfg


def train_batches(task, cfg, n: int):
    """The first ``n`` training batches of epoch 1, in fairseq's order, unshuffled."""
    itr = task.get_batch_iterator(
        dataset=task.dataset("train"),
        max_tokens=cfg.dataset.max_tokens,
        max_sentences=cfg.dataset.batch_size,
        seed=cfg.common.seed,
        num_workers=0,
        epoch=1,
    ).next_epoch_itr(shuffle=False)
    out = []
    for sample in itr:
        out.append(sample)
        if len(out) == n:
            break
    if len(out) < n:
        raise ValueError(f"the corpus has only {len(out)} batches, {n} were asked for")
    return out


_CORPUS: dict = {}


def tiny_data_bin_fixture():
    """A session-wide pytest fixture of the binarized tiny corpus, shared by every module importing it.

    Use as ``tiny_data_bin = fairseq_helpers.tiny_data_bin_fixture()`` at module level.
    """
    import pytest

    @pytest.fixture(scope="session")
    def tiny_data_bin(tmp_path_factory):
        if "data_bin" not in _CORPUS:  # one fairseq-preprocess run per test session
            _CORPUS["data_bin"] = make_tiny_corpus(tmp_path_factory.mktemp("tiny-corpus"))
        return _CORPUS["data_bin"]

    return tiny_data_bin
