"""The warm python launcher (tests/warm_python.py) runs a command line as ``python`` does, only warm.

Each program runs twice, through the real interpreter and through the launcher, and everything a caller can
see must be equal: exit status, stdout and stderr (tracebacks included), argv, sys.path[0], __name__, the
working directory, the environment, stdin, atexit output and buffering. What is allowed to differ, and is
checked to: the run has torch imported before its first line (that is the point).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import warm_python

pytestmark = pytest.mark.slow  # every test here starts processes

REPORT = ("import os, sys; print(sys.argv, repr(sys.path[0]), __name__, os.getcwd(), os.environ.get('ASAM_X'), "
          "sys.stdin.read().upper(), sep='|')")


@pytest.fixture(scope="module")
def launcher():
    return warm_python.launcher()


def both(launcher, argv, **kw):
    kw.setdefault("stdout", subprocess.PIPE)
    kw.setdefault("stderr", subprocess.PIPE)
    kw.setdefault("text", True)
    kw.setdefault("timeout", 120)
    return [subprocess.run([py, *argv], **kw) for py in (sys.executable, launcher)]


def same(cold, warm):
    assert (warm.returncode, warm.stdout, warm.stderr) == (cold.returncode, cold.stdout, cold.stderr)


def test_the_three_forms_run_as_python_runs_them(launcher, tmp_path):
    pkg = tmp_path / "lib" / "wpkg"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "mod.py").write_text(REPORT + "\nprint(__file__ == sys.argv[0], __spec__.name)\n")
    script = tmp_path / "bin" / "script.py"
    script.parent.mkdir()
    script.write_text(REPORT + "\nprint(__file__)\n")
    env = dict(os.environ, ASAM_X="x", PYTHONPATH=str(tmp_path / "lib"))
    for argv in (["-c", REPORT, "a", "b c"], ["-m", "wpkg.mod", "--flag", "1"], [str(script), "arg"],
                 ["-u", "-c", REPORT]):
        cold, warm = both(launcher, argv, env=env, cwd=tmp_path, input="some input")
        assert cold.returncode == 0 and "SOME INPUT" in cold.stdout, cold.stderr
        same(cold, warm)


def test_exits_errors_and_atexit_are_pythons(launcher, tmp_path):
    programs = ["raise SystemExit(3)", "raise SystemExit('a message')", "import sys; sys.exit()",
                "def f():\n    1 / 0\nf()",
                "import atexit, sys; atexit.register(lambda: print('bye')); print('hi'); print('err', file=sys.stderr)",
                "raise KeyboardInterrupt"]
    for code in programs:
        cold, warm = both(launcher, ["-c", code], cwd=tmp_path)
        same(cold, warm)
    script = tmp_path / "boom.py"
    script.write_text("def g():\n    raise ValueError('x')\ng()\n")
    same(*both(launcher, [str(script)], cwd=tmp_path))


def test_output_order_and_buffering_into_one_pipe(launcher):
    code = "import sys\nfor i in range(3):\n    print('out', i)\n    print('err', i, file=sys.stderr)"
    for argv in (["-c", code], ["-u", "-c", code]):
        same(*both(launcher, argv, stderr=subprocess.STDOUT))
    # unbuffered (-u / PYTHONUNBUFFERED): the interleaving is the order of the calls
    warm = subprocess.run([launcher, "-u", "-c", code], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert warm.stdout.split("\n")[:2] == ["out 0", "err 0"]


def test_runs_are_warm_and_start_warm_runs(launcher):
    code = "import sys; print('torch' in sys.modules, 'fairseq' in sys.modules, sys.executable)"
    cold, warm = both(launcher, ["-c", code])
    assert cold.stdout.split()[:2] == ["False", "False"]
    assert warm.stdout.split() == ["True", "False", launcher]  # fairseq itself is imported by the run
    nested = ("import subprocess, sys; print(subprocess.run([sys.executable, '-c', "
              "\"import sys; print('torch' in sys.modules)\"], capture_output=True, text=True).stdout.strip())")
    assert subprocess.run([launcher, "-c", nested], capture_output=True, text=True).stdout.strip() == "True"


def test_other_command_lines_and_environments_run_cold(launcher):
    code = "import sys; print('torch' in sys.modules)"
    for argv, env in ((["-I", "-c", code], None), (["-c", code], dict(os.environ, OMP_NUM_THREADS="7")),
                      (["-c", code], dict(os.environ, PYTHONHASHSEED="123"))):
        p = subprocess.run([launcher, *argv], capture_output=True, text=True, env=env)
        assert (p.returncode, p.stdout) == (0, "False\n"), p.stderr
    p = subprocess.run([launcher, "-c", code], capture_output=True, text=True, stdin=subprocess.DEVNULL,
                       pass_fds=(), close_fds=True, preexec_fn=lambda: os.close(0))
    assert p.stdout == "False\n"


def _default_signals():
    # as from a shell: a test process may have SIGINT ignored (then python, cold or warm, ignores it too)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_DFL)


def _start(launcher):
    """A warm run that prints its pid and sleeps; (launcher process, the run's pid)."""
    p = subprocess.Popen([launcher, "-c", "import os, time; print(os.getpid(), flush=True); time.sleep(120)"],
                         stdout=subprocess.PIPE, text=True, preexec_fn=_default_signals)
    pid = int(p.stdout.readline())
    assert pid != p.pid
    return p, pid


def _gone(pid, within=20.0):
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.05)
    return False


def test_a_signal_to_the_launcher_reaches_the_run_and_ends_both_alike(launcher):
    for sig in (signal.SIGTERM, signal.SIGINT):
        p, pid = _start(launcher)
        p.send_signal(sig)
        rc = p.wait(timeout=30)
        assert _gone(pid)
        assert rc == (-sig if sig == signal.SIGTERM else -signal.SIGINT)  # python ends by SIGINT after ^C


def test_ignored_signals_stay_ignored_as_in_a_cold_run(launcher):
    def ignore():
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, signal.SIG_IGN)

    code = "import signal; print([signal.getsignal(s) == signal.SIG_IGN for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)])"
    for pre in (ignore, _default_signals):
        cold, warm = both(launcher, ["-c", code], preexec_fn=pre)
        same(cold, warm)
    assert cold.stdout == "[False, False, False]\n"


def test_a_killed_launcher_takes_its_run_down(launcher):
    p, pid = _start(launcher)
    p.kill()
    p.wait(timeout=30)
    assert _gone(pid)


def test_fairseq_sets_up_logging_in_the_runs_own_order(launcher):
    """fairseq is imported by the run, not the server: its import configures the root logger (to stderr, at
    DEBUG) unless the program did first, as fairseq-train does (to stdout, at INFO)."""
    show = "print([h.stream.name for h in logging.root.handlers], logging.root.level)"
    for code in (f"import logging, fairseq; {show}",
                 f"import logging, sys; logging.basicConfig(stream=sys.stdout, level=logging.INFO); import fairseq; {show}"):
        same(*both(launcher, ["-c", code]))


def test_a_bare_environment_is_warm_too():
    """Under the C locale python sets LC_CTYPE itself (PEP 538): the launcher compares what the server has."""
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": os.environ.get("PYTHONPATH", "")}
    exe = warm_python.launcher(env)
    p = subprocess.run([exe, "-c", "import sys; print('torch' in sys.modules)"], env=env, capture_output=True, text=True)
    assert p.stdout == "True\n", p.stderr
