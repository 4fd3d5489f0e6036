"""The fast tier's rule, checked: a test that is not marked ``slow`` starts no process.

tests/conftest.py calls ``guard(item)`` around the setup, call and teardown of every test that is not
marked slow (so also around the session and module fixtures it is the first to request). While it is on,
every way of starting a process raises ``StartsAProcess``: ``subprocess.Popen`` (run, check_output,
os.popen), multiprocessing's spawn start method (torch.multiprocessing, torchrun's workers) through
``_posixsubprocess.fork_exec``, its forkserver start method through
``multiprocessing.forkserver.connect_to_new_process`` (the request to the fork server, which may be running
already: tests/workers.py keeps one), its fork start method and DataLoader workers through ``os.fork``, and
``os.system`` / ``os.posix_spawn``. Helpers that start a process another way (the warm fairseq fork server
of tests/fairseq_helpers.py forks in its own process) call ``check(what)`` first.
"""

from __future__ import annotations

import _posixsubprocess
import contextlib
import multiprocessing.forkserver
import os
import subprocess

import pytest


class StartsAProcess(RuntimeError):
    pass


_STARTERS = [
    (subprocess.Popen, "_execute_child"),
    (_posixsubprocess, "fork_exec"),
    (multiprocessing.forkserver, "connect_to_new_process"),
    (os, "fork"),
    (os, "forkpty"),
    (os, "posix_spawn"),
    (os, "posix_spawnp"),
]

_current: list = []  # [(item, violations)] while a guarded phase runs


def check(what: str) -> None:
    """Raise (and record) if the running test is not marked slow; a no-op otherwise."""
    if not _current:
        return
    item, violations = _current[-1]
    msg = (f"{item.nodeid} starts a process ({what}) but is not marked slow: mark it @pytest.mark.slow, "
           "or keep it in-process (the fast tier, `make test-fast`, starts none)")
    violations.append(msg)
    raise StartsAProcess(msg)


def _refusing(what: str):
    def refuse(*args, **kwargs):
        check(what)

    return refuse


@contextlib.contextmanager
def guard(item, violations: list):
    """While the block runs, starting a process raises StartsAProcess and is appended to ``violations``."""
    mp = pytest.MonkeyPatch()
    for owner, name in _STARTERS:
        if hasattr(owner, name):
            mp.setattr(owner, name, _refusing(f"{owner.__name__}.{name}"))
    _current.append((item, violations))
    try:
        yield
    finally:
        _current.pop()
        mp.undo()
