"""Helpers for tests (and benchmarks) that run real fairseq on a tiny corpus.

``make_tiny_corpus(tmpdir)`` (from ``benchmarks/tiny_corpus.py``, which the benchmark shares) writes a
small synthetic German-English-shaped parallel corpus and binarizes it with the real
``fairseq-preprocess`` (its ``main``, in this process); it returns the ``data-bin`` directory that
``fairseq-train DATA`` takes.

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
from benchmarks import tiny_corpus
from benchmarks.tiny_corpus import write_tiny_raw_corpus  # noqa: F401 (the tests import it from here)

REPO = Path(__file__).resolve().parents[1]
USER_DIR = str(Path(fairseq_asam.__file__).resolve().parent)


def make_tiny_corpus(tmpdir, **corpus_kwargs) -> str:
    """``benchmarks.tiny_corpus.make_tiny_corpus``, binarized by fairseq-preprocess in this process."""
    return tiny_corpus.make_tiny_corpus(tmpdir, in_process=True, **corpus_kwargs)


def make_tiny_lm_corpus(tmpdir) -> str:
    """``benchmarks.tiny_corpus.make_tiny_lm_corpus``, binarized by fairseq-preprocess in this process."""
    return tiny_corpus.make_tiny_lm_corpus(tmpdir, in_process=True)


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
    """Run ``fairseq_cli.<tool>`` (train, generate, interactive, hydra_train, ...) in a fresh process.

    The process is forked from a warm server that has run the command's first statement, the import of
    ``fairseq_cli.<tool>``, and nothing else (``_ForkServer``): the state ``python -c`` has at that point,
    without paying the imports (about 6 CPU-seconds) again for each of the suite's few dozen runs.
    """
    preload = f"from fairseq_cli.{tool} import cli_main"
    code = f"import sys; {preload}; sys.argv[0] = 'fairseq-{tool}'; cli_main()"
    proc = _fork_server(preload).run(code, args, env=_env(), cwd=str(REPO), timeout=timeout, input=input)
    if check and proc.returncode != 0:
        raise RuntimeError(f"fairseq-{tool} failed (exit {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return proc


# The server: it runs the preload statement (argv[1]: the import the command starts with; its env and
# working directory are the runs'), then for each request forks a child that takes
# the request's stdin/stdout/stderr files, working directory, environment and argv, and runs the code as
# `python -c CODE ARGS` would (as __main__; SystemExit and interpreter shutdown, atexit included, as usual).
# The control channel is a pair of pipes (argv[2], argv[3]), read and written with os.read/os.write so that
# no buffered data is inherited by a child, which closes them and replaces fds 0-2 before it runs anything.
# What the preload itself prints (fairseq's import-time "Please install tensorboardX") goes to /dev/null.
_SERVER = r"""
import json, os, sys
exec(sys.argv[1])
REQUESTS, REPLIES = int(sys.argv[2]), int(sys.argv[3])

def serve():
    buf = b""
    while True:
        while b"\n" not in buf:
            chunk = os.read(REQUESTS, 65536)
            if not chunk:
                return None
            buf += chunk
        line, buf = buf.split(b"\n", 1)
        req = json.loads(line)
        pid = os.fork()
        if pid == 0:
            return req
        os.write(REPLIES, (json.dumps({"pid": pid}) + "\n").encode())
        _, status = os.waitpid(pid, 0)
        os.write(REPLIES, (json.dumps({"returncode": os.waitstatus_to_exitcode(status)}) + "\n").encode())

req = serve()
if req is None:
    sys.exit(0)
os.close(REQUESTS)
os.close(REPLIES)
for fd, path, flags in ((0, req["stdin"], os.O_RDONLY), (1, req["stdout"], os.O_WRONLY | os.O_TRUNC),
                        (2, req["stderr"], os.O_WRONLY | os.O_TRUNC)):
    f = os.open(path, flags)
    os.dup2(f, fd)
    os.close(f)
os.chdir(req["cwd"])
os.environ.clear()
os.environ.update(req["env"])
sys.argv = ["-c", *req["args"]]  # what `python -c CODE ARGS` gives
code = compile(req["code"], "<string>", "exec")
del json, os, serve, req, REQUESTS, REPLIES
exec(code)
"""


class _ForkServer:
    """One warm server per preload statement and test process (so per xdist worker); runs are sequential."""

    def __init__(self, preload: str):
        self.preload, self.proc = preload, None

    def _start(self):
        req_r, self.requests = os.pipe()
        self.replies, rep_w = os.pipe()
        self.proc = subprocess.Popen([sys.executable, "-c", _SERVER, self.preload, str(req_r), str(rep_w)],
                                     pass_fds=(req_r, rep_w), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL, env=_env(), cwd=str(REPO))
        os.close(req_r)
        os.close(rep_w)

    def _reply(self, deadline):
        import json
        import select
        import time

        line = b""
        while not line.endswith(b"\n"):
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                return None
            ready, _, _ = select.select([self.replies], [], [], left)
            if ready:
                chunk = os.read(self.replies, 1)
                if not chunk:
                    raise RuntimeError("the fairseq fork server died")
                line += chunk
        return json.loads(line)

    def submit(self, code, args, *, env, cwd, input=None):
        """Start one run (forked by the server); returns its handle for ``collect``."""
        import json
        import tempfile

        import process_guard

        process_guard.check("a fairseq CLI forked by the fork server")
        if self.proc is None or self.proc.poll() is not None:
            self._start()
        tmp = Path(tempfile.mkdtemp(prefix="fairseq-run-"))
        (tmp / "in").write_text(input or "")
        (tmp / "out").touch()
        (tmp / "err").touch()
        req = dict(code=code, args=[str(a) for a in args], env=env, cwd=cwd,
                   stdin=str(tmp / "in"), stdout=str(tmp / "out"), stderr=str(tmp / "err"))
        os.write(self.requests, (json.dumps(req) + "\n").encode())
        return dict(tmp=tmp, pid=self._reply(None)["pid"], cmd=[sys.executable, "-c", code, *map(str, args)])

    def collect(self, run, deadline):
        """Wait for the run until ``deadline`` (time.monotonic); its CompletedProcess, or TimeoutExpired."""
        import shutil
        import time

        tmp = run["tmp"]
        try:
            done = self._reply(deadline)
            if done is None:
                os.kill(run["pid"], 9)
                self._reply(None)
                raise subprocess.TimeoutExpired(run["cmd"], deadline - time.monotonic(),
                                                (tmp / "out").read_text(), (tmp / "err").read_text())
            return subprocess.CompletedProcess(run["cmd"], done["returncode"], (tmp / "out").read_text(errors="replace"),
                                               (tmp / "err").read_text(errors="replace"))
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def run(self, code, args, *, env, cwd, timeout, input=None):
        import time

        return self.collect(self.submit(code, args, env=env, cwd=cwd, input=input), time.monotonic() + timeout)


    def close(self):
        if self.proc is not None:
            os.close(self.requests)  # end of input: the server exits
            os.close(self.replies)
            self.proc.wait(timeout=60)
            self.proc = None


_FORK_SERVERS: dict = {}


def close_fork_servers() -> None:
    """Stop this process's fork servers (tests/conftest.py does at the end of each test module: each holds
    torch and fairseq in memory)."""
    while _FORK_SERVERS:
        _FORK_SERVERS.popitem()[1].close()


def _fork_server(preload: str, slot: int = 0) -> _ForkServer:
    """The server for ``preload``; ``slot`` > 0 gives more of them, for runs that must run at once (DDP ranks)."""
    if (preload, slot) not in _FORK_SERVERS:
        _FORK_SERVERS[preload, slot] = _ForkServer(preload)
    return _FORK_SERVERS[preload, slot]


def run_fairseq_at_once(tool: str, arg_lists: list[list[str]], *, timeout: float = 240):
    """``run_fairseq`` for several argument lists at the same time (e.g. the ranks of a DDP run), each from
    its own fork server; their CompletedProcess list, in order. A timeout kills every run still going."""
    import time

    preload = f"from fairseq_cli.{tool} import cli_main"
    code = f"import sys; {preload}; sys.argv[0] = 'fairseq-{tool}'; cli_main()"
    servers = [_fork_server(preload, slot=i) for i in range(len(arg_lists))]
    runs = [srv.submit(code, args, env=_env(), cwd=str(REPO)) for srv, args in zip(servers, arg_lists)]
    deadline = time.monotonic() + timeout
    out = []
    try:
        for srv, run in zip(servers, runs):
            out.append(srv.collect(run, deadline))
    finally:
        for srv, run in zip(servers[len(out):], runs[len(out):]):
            try:
                os.kill(run["pid"], 9)
                srv.collect(run, None)
            except (ProcessLookupError, RuntimeError):
                pass
    return out


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
        # One fairseq-preprocess per test session (per xdist worker), in this process: the in-process
        # tests that only read the corpus start no process (the fast tier's rule, tests/conftest.py).
        if "data_bin" not in _CORPUS:
            _CORPUS["data_bin"] = make_tiny_corpus(tmp_path_factory.mktemp("tiny-corpus"))
        return _CORPUS["data_bin"]

    return tiny_data_bin
