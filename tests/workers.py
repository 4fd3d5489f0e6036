"""Worker processes for the multi-process tests, forked from a warm server instead of started cold.

A DDP/FSDP test starts 2-4 workers per run, and a fresh worker spends its first 4-7 CPU-seconds importing
torch, torchvision, transformers and this project: most of such a test's time on this project's CPU machine.
Here the workers are forked by multiprocessing's fork server (``start_method="forkserver"``), which imports
``PRELOAD`` once per test process and then forks each worker from that state. The server runs no torch
operation and holds no thread and no process group when it forks, so each worker starts as a new one would,
its imports done.

- ``run_workers(fn, args, nprocs)``: ``fn(rank, *args)`` per worker, as ``torch.multiprocessing.start_processes``.
- ``torchrun(nproc, argv, cwd=, env=)``: the real torchrun, for the tests of what it does itself.
- ``run_ranks(nproc, argv, cwd=, env=)``: a command line (``-m module ...`` or ``script.py ...``) on ``nproc``
  ranks with the environment torchrun gives its workers (RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE,
  MASTER_ADDR, MASTER_PORT; rank 0 hosts the store), run as ``python`` would run it (``__main__``, sys.argv,
  exit status, atexit). torchrun's own agent is not in the loop: tests that check what torchrun itself does
  (its argument parsing, the docs' commands) run the real ``torchrun``.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# What the workers import: the union for every test that uses this module. The server starts once per test
# process with the list it has then, so it is one list, set in one place.
PRELOAD = ["torch", "torch.distributed.fsdp", "torchvision", "fairseq_asam", "fairseq_asam.vision.train",
           "fairseq_asam.vision.fsdp", "fsdp_helpers"]
if importlib.util.find_spec("transformers") is not None:  # the hf extra (without it, its tests skip)
    PRELOAD += ["tests.hf_helpers", "fairseq_asam.integrations.transformers"]


def _preload() -> None:
    import torch.multiprocessing as mp

    mp.get_context("forkserver").set_forkserver_preload(PRELOAD)


def run_workers(fn, args: tuple, nprocs: int = 2) -> None:
    """``fn(rank, *args)`` in ``nprocs`` workers, joined; raises here if one fails (the others are stopped).
    The workers set their own environment (RANK, MASTER_PORT, ...) and thread count."""
    import torch.multiprocessing as mp

    _preload()
    mp.start_processes(fn, args=args, nprocs=nprocs, join=True, start_method="forkserver")


def free_port() -> int:
    """A TCP port that is free on 127.0.0.1 now (for MASTER_PORT or fairseq's --distributed-init-method)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, nproc: int, port: int, argv: list[str], cwd: str, env: dict, logs: str) -> None:
    """One rank: torchrun's environment, the working directory, stdout/stderr to files, then the command as
    ``python ARGV`` runs it. A non-zero exit status ends the worker with that status (and, through
    start_processes, the other ranks)."""
    import atexit
    import runpy

    for fd, name in ((1, "out"), (2, "err")):
        f = os.open(os.path.join(logs, f"rank{rank}.{name}"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(f, fd)
        os.close(f)
    os.environ.clear()
    os.environ.update(env)
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(nproc), LOCAL_WORLD_SIZE=str(nproc),
                      GROUP_RANK="0", ROLE_RANK=str(rank), ROLE_WORLD_SIZE=str(nproc), MASTER_ADDR="localhost",
                      MASTER_PORT=str(port))
    os.chdir(cwd)
    import torch

    if "OMP_NUM_THREADS" in env:  # what a new process reads at its first parallel operation
        torch.set_num_threads(int(env["OMP_NUM_THREADS"]))
    code = 0
    try:
        if argv[0] == "-m":
            sys.argv = [argv[1], *argv[2:]]
            runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
        else:
            sys.argv = list(argv)
            sys.path.insert(0, os.path.dirname(os.path.abspath(argv[0])))
            runpy.run_path(argv[0], run_name="__main__")
    except SystemExit as e:  # as the interpreter: an int is the status, another object is printed, status 1
        if e.code is None or isinstance(e.code, int):
            code = e.code or 0
        else:
            print(e.code, file=sys.stderr)
            code = 1
    except BaseException:
        import traceback

        traceback.print_exc()
        code = 1
    atexit._run_exitfuncs()  # what interpreter shutdown runs (multiprocessing's workers end with os._exit)
    sys.stdout.flush()
    sys.stderr.flush()
    if code:
        os._exit(code)


def torchrun(nproc: int, argv: list[str], *, cwd: str, env: dict, timeout: float = 400) -> subprocess.CompletedProcess:
    """The real ``torchrun --standalone --nproc_per_node nproc ARGV`` (for what torchrun itself does)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc), *map(str, argv)]
    return subprocess.run(cmd, env=env, cwd=str(cwd), capture_output=True, text=True, timeout=timeout)


def run_ranks(nproc: int, argv: list[str], *, cwd: str, env: dict, timeout: float = 400) -> subprocess.CompletedProcess:
    """``argv`` on ``nproc`` ranks; the CompletedProcess has the first non-zero exit status (or 0) and every rank's
    stdout and stderr, rank 0's first (torchrun prints them interleaved)."""
    import torch.multiprocessing as mp

    _preload()
    with tempfile.TemporaryDirectory(prefix="ranks-") as logs:
        ctx = mp.start_processes(_rank_main, args=(nproc, free_port(), list(map(str, argv)), str(cwd), dict(env), logs),
                                 nprocs=nproc, join=False, start_method="forkserver")
        deadline, code = time.monotonic() + timeout, 0
        try:
            while not ctx.join(timeout=max(0.0, min(1.0, deadline - time.monotonic()))):
                if time.monotonic() > deadline:
                    raise subprocess.TimeoutExpired(argv, timeout)
        except mp.ProcessExitedException as e:
            code = e.exit_code or 1
        finally:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
                    p.join()
        read = lambda r, n: Path(logs, f"rank{r}.{n}").read_text(errors="replace")  # noqa: E731
        out = "".join(read(r, "out") for r in range(nproc))
        err = "".join(read(r, "err") for r in range(nproc))
    return subprocess.CompletedProcess(list(argv), code, out, err)
