"""Shared pytest setup: one torch thread per test, and the guard that keeps the fast tier honest.

Two tiers (README "Tests"): ``make test-fast`` runs ``pytest -m "not slow"``, ``make test`` runs all. A test
that starts a process (subprocess, fairseq-train/-generate, torchrun, multiprocessing workers, a venv,
pip) or trains for more than about a second is marked ``@pytest.mark.slow``. The guard below makes the
first half of that rule checked, in both tiers: while a test that is not marked slow is set up, runs and
is torn down (including the session and module fixtures it is the first to request), every way of
starting a process raises ``StartsAProcess`` (tests/process_guard.py), and the test fails even if it
catches the error.
"""

from __future__ import annotations

import contextlib
import sys

import numpy.testing  # noqa: F401  (its import runs `lscpu` once, to probe SVE: here, before any test is guarded)
import process_guard  # tests/ is on sys.path under pytest
import pytest
import torch


@pytest.fixture(autouse=True)
def one_torch_thread():
    """torch on one intra-op thread while a test runs.

    The tests' models are tiny and gain nothing from threads, while on a shared two-core machine
    intra-op threads spin against the other processes (3 in-process fairseq updates measured 7 s with
    2 threads, 0.1 s with 1); it is also what the tests' DDP workers use.
    """
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module", autouse=True)
def _close_fork_servers():
    """The warm fairseq fork servers a module started (tests/fairseq_helpers.py) end with the module."""
    yield
    fairseq_helpers = sys.modules.get("fairseq_helpers")
    if fairseq_helpers is not None:
        fairseq_helpers.close_fork_servers()


@pytest.fixture(scope="module")
def warm_launches():
    """For one module: ``sys.executable`` is the warm python launcher (tests/warm_python.py), so the Python
    processes the library starts (fairseq-train, -preprocess, -generate, a study's runs) skip the imports of
    torch and fairseq; one thread per process (``OMP_NUM_THREADS=1``), as the tests' own fairseq runs.
    Their CPU time is not counted in this process's children's: a test that checks a recorded CPU time or
    a process tree does not use this."""
    import warm_python

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OMP_NUM_THREADS", "1")
        mp.setenv("MKL_NUM_THREADS", "1")
        mp.setattr(sys, "executable", warm_python.warm_executable())
        yield sys.executable


# ---- the fast tier's guard: no process starts in a test that is not marked slow ---------------------

_VIOLATIONS = pytest.StashKey[list]()


def pytest_sessionstart(session):
    # The library looks glibc up once per process (fairseq_asam._compat.release_freed_host_memory, called
    # by the fairseq task after each ascent on the CPU) with ctypes.util.find_library, which runs
    # `/sbin/ldconfig -p`: a lookup of the library's, not a process the first fairseq test starts.
    from fairseq_asam import _compat

    _compat.release_freed_host_memory()
    # matplotlib builds its font cache on a machine's first plot by running `fc-list`: a lookup of
    # matplotlib's, not a process the test that plots first starts
    with contextlib.suppress(ImportError):
        import matplotlib.font_manager  # noqa: F401


def _phase(item):
    if item.get_closest_marker("slow") is not None:
        return contextlib.nullcontext()
    return process_guard.guard(item, item.stash.setdefault(_VIOLATIONS, []))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_setup(item):
    with _phase(item):
        yield


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
    with _phase(item):
        outcome = yield
    # A test that caught the error (pytest.raises(Exception), a helper's try/except) still fails.
    violations = item.stash.get(_VIOLATIONS, [])
    if violations and outcome.excinfo is None:
        outcome.force_exception(process_guard.StartsAProcess(violations[0]))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_teardown(item, nextitem):
    with _phase(item):
        yield


# ---- order: the longest modules first -----------------------------------------------------------------

# `make test` runs `pytest -n 2 --dist loadfile --no-loadscope-reorder`: each module is one unit of work,
# handed to the workers in collection order (xdist's default would reorder them by number of tests). These modules
# start many processes (seconds of wall time per module in `make test` on this project's 2-core machine:
# test_fairseq_cli 92, test_fairseq_schedule 89, test_iwslt_e2e 51, test_multi30k_study 46, ... down to
# test_fairseq_docs 15); started first, they no longer leave one worker running a long module alone at the end
# while the other is idle. Within a module, and among the other modules, the order stays.
HEAVY_FIRST = ("test_fairseq_cli.py", "test_fairseq_schedule.py", "test_iwslt_e2e.py", "test_multi30k_study.py",
               "test_transformers.py", "test_vision_train.py", "test_benchmark.py", "test_mt_study.py", "test_fsdp.py",
               "test_warm_python.py", "test_efficiency_study.py", "test_readme.py", "test_package.py",
               "test_precision.py", "test_fairseq_update.py", "test_sharpness_cli.py", "test_tracking.py",
               "test_lightning.py", "test_fairseq_docs.py", "test_gpu_check.py", "test_iwslt_prepare.py")


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(HEAVY_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # a stable sort
