"""The fast tier's guard (tests/process_guard.py, wired in tests/conftest.py) refuses every way of starting a
process in a test that is not marked slow, and a test that catches the refusal still fails."""

import multiprocessing
import multiprocessing.forkserver
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import process_guard
import pytest

pytest_plugins = ["pytester"]


def _noop():
    pass


def _fork():
    pid = os.fork()
    if pid == 0:  # only if the guard failed: the child must not go on running the tests
        os._exit(0)
    os.waitpid(pid, 0)


STARTS = {
    "subprocess.run": lambda: subprocess.run([sys.executable, "-c", "pass"]),
    "os.popen": lambda: os.popen("true").read(),
    "multiprocessing spawn": lambda: multiprocessing.get_context("spawn").Process(target=_noop).start(),
    "multiprocessing forkserver": lambda: multiprocessing.get_context("forkserver").Process(target=_noop).start(),
    # a fork server that is already running (tests/workers.py keeps one per test process): no process is
    # started here, the running server is asked to fork one
    "multiprocessing forkserver, running": lambda: multiprocessing.get_context("forkserver").Process(target=_noop).start(),
    "multiprocessing fork": lambda: multiprocessing.get_context("fork").Process(target=_noop).start(),
    "os.fork": _fork,
    "os.posix_spawn": lambda: os.waitpid(os.posix_spawn("/bin/true", ["true"], os.environ), 0),
}


# Run before the guard is on (so marked slow: it starts the fork server that "running" asks, as tests/workers.py
# keeps one per test process).
PREPARE = {"multiprocessing forkserver, running": lambda: multiprocessing.forkserver.ensure_running()}


@pytest.mark.parametrize("start", [pytest.param(k, marks=pytest.mark.slow) if k in PREPARE else k for k in STARTS])
def test_guard_refuses_and_records_each_way_of_starting_a_process(start):
    PREPARE.get(start, lambda: None)()
    violations = []
    with process_guard.guard(SimpleNamespace(nodeid="t.py::x"), violations):
        with pytest.raises(process_guard.StartsAProcess, match=r"t.py::x starts a process .* not marked slow"):
            STARTS[start]()
    assert len(violations) == 1


def test_a_test_that_catches_the_refusal_still_fails_and_slow_is_the_way_out(pytester):
    pytester.makeconftest((Path(__file__).parent / "conftest.py").read_text())
    pytester.makeini("[pytest]\nmarkers =\n    slow: x\n")
    pytester.makepyfile(test_inner="""
        import subprocess
        import pytest

        def test_swallows():
            try:
                subprocess.run(["true"])
            except Exception:
                pass

        @pytest.mark.slow
        def test_marked_slow():
            pass
    """)
    result = pytester.runpytest_inprocess("-p", "no:cacheprovider", "-p", "no:xdist")
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(["*test_swallows starts a process (Popen._execute_child) but is not marked slow*"])


def test_make_test_hands_out_the_modules_longest_first():
    """`make test` keeps the collection order (tests/conftest.py puts the longest modules first) instead of
    xdist's default order by number of tests, and every module named there exists."""
    from pathlib import Path

    import conftest

    root = Path(__file__).resolve().parents[1]
    recipe = root.joinpath("Makefile").read_text().split("\ntest: install\n", 1)[1].split("\n\n", 1)[0]
    assert "--dist loadfile --no-loadscope-reorder" in recipe
    missing = [n for n in conftest.HEAVY_FIRST if not (root / "tests" / n).is_file()]
    assert not missing and len(set(conftest.HEAVY_FIRST)) == len(conftest.HEAVY_FIRST)
