"""A warm ``python`` for the slow tests whose library code starts Python processes.

The demo, the IWSLT/Multi30k recipes and the studies start ``sys.executable -m fairseq_cli.train`` (and
``-m fairseq_cli.preprocess``, ``-c ...`` for fairseq-generate, ``-m fairseq_asam.vision ...``): each such
process spends its first 4-6 CPU-seconds importing torch and fairseq, most of an end-to-end test's time on
this project's 2-core machine. ``warm_executable()`` is the path of a small executable that takes the same
command lines as ``python`` and runs them in a process forked from a server that has imported torch,
torchvision and fairseq's costly dependencies once (``PRELOAD``), and done nothing else (no torch operation,
no thread, no logging setup):

- ``python [-u] -m MODULE ARGS``, ``python [-u] -c CODE ARGS`` and ``python [-u] SCRIPT ARGS`` run as
  ``python`` runs them: ``__main__``, ``sys.argv``, ``sys.path[0]``, the caller's working directory,
  environment (``PYTHONPATH`` included), stdin/stdout/stderr (the caller's own file descriptors, passed
  over a Unix socket, so output streams as it is written), exit status, atexit handlers, buffering.
- Any other command line (another option, ``-`` or none), a closed standard descriptor, an environment that
  differs from the server's in what a process reads once at start-up (thread counts, hash seed, ...), or no
  server: the real interpreter runs it (``execv``), cold, exactly as before.
- Signals sent to the launcher (SIGTERM, SIGINT, a parent's death signal, ...) are passed on to the run, and
  the launcher ends as the run ended (its exit code or the same signal). A launcher killed outright
  (SIGKILL, a test's timeout) takes its run down with it.
- Inside a run, ``sys.executable`` is the launcher again, so the processes a run starts itself (a study's
  fairseq-train runs) are warm too.

What differs from a cold process: the CPU time of a run is not counted in its caller's children's CPU time
(``os.times()``, ``RUSAGE_CHILDREN``: the run is the server's descendant, not the caller's), and the run's
process is not a child of the caller. Tests that check either (a recorded CPU time, a process tree) run the
real interpreter. ``warm_launches`` (a fixture in tests/conftest.py) points ``sys.executable`` at the
launcher for one test module.
"""

from __future__ import annotations

import atexit
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

# torch, torchvision and what fairseq imports that costs (scikit-learn and scipy alone about 2 CPU-seconds), but
# not fairseq itself: its import configures the root logger (a basicConfig in a few of its modules), which a
# run must meet in its own order (fairseq-train configures it first, to stdout). None of these touches logging.
PRELOAD = ["torch", "torchvision", "numpy", "sklearn.metrics", "scipy.stats", "wandb", "hydra", "omegaconf",
           "sacrebleu", "bitarray", "fsspec"]

# What a new process reads once, at start-up or while importing PRELOAD: a run whose environment differs from
# the server's in one of these runs cold.
STARTUP_ENV = ["OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "PYTHONHASHSEED", "PYTHONOPTIMIZE",
               "PYTHONWARNINGS", "PYTHONDONTWRITEBYTECODE", "PYTHONSAFEPATH", "PYTHONNOUSERSITE", "PYTHONHOME",
               "PYTHONIOENCODING", "PYTHONUTF8", "PYTHONDEVMODE", "PYTHONMALLOC", "PYTHONFAULTHANDLER",
               "PYTHONTRACEMALLOC", "PYTHONSTARTUP", "PYTHONINSPECT", "PYTHONVERBOSE", "PYTHONNODEBUGRANGES",
               "LOGLEVEL", "CUDA_VISIBLE_DEVICES", "TORCH_HOME", "LANG", "LC_ALL", "LC_CTYPE"]

# The launcher: stdlib only, started with -S (no site): a few milliseconds.
_CLIENT = r'''
import json, os, signal, socket, sys

REAL, SOCK, SERVER_ENV = {real!r}, {sock!r}, {server_env!r}
FORWARD = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2)


def cold():
    os.execv(REAL, [REAL, *sys.argv[1:]])


def request():
    argv, unbuffered = sys.argv[1:], False
    while argv and argv[0] == "-u":
        argv, unbuffered = argv[1:], True
    if not argv:
        return None
    if argv[0] in ("-m", "-c"):
        if len(argv) < 2:
            return None
        kind, target, args = argv[0], argv[1], argv[2:]
    elif argv[0].startswith("-"):
        return None
    else:
        kind, target, args = "script", argv[0], argv[1:]
    env = dict(os.environ)
    if unbuffered:
        env["PYTHONUNBUFFERED"] = "1"
    if any(env.get(k) != v for k, v in SERVER_ENV.items()):
        return None
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            return None
    # the signals this process was started with ignored (inherited from its caller, as a cold run's would be)
    ignored = [int(s) for s in FORWARD if signal.getsignal(s) == signal.SIG_IGN]
    return {{"kind": kind, "target": target, "args": args, "cwd": os.getcwd(), "env": env,
             "executable": os.path.abspath(sys.argv[0]), "ignored": ignored}}


req = request()
if req is None:
    cold()
pid, pending = None, []


def forward(sig, frame):
    if pid is None:  # the run is not started yet: it gets the signal as soon as it is
        pending.append(sig)
        return
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


for sig in FORWARD:
    if signal.getsignal(sig) != signal.SIG_IGN:  # an ignored one the run ignores too
        signal.signal(sig, forward)
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
try:
    s.connect(SOCK)
    data = json.dumps(req).encode()
    socket.send_fds(s, [len(data).to_bytes(8, "big") + data], [0, 1, 2])
except OSError:
    cold()
f = s.makefile("rb")
line = f.readline()
if not line:
    cold()
pid = json.loads(line)["pid"]
for sig in pending:
    forward(sig, None)
line = f.readline()
status = json.loads(line)["status"] if line else -signal.SIGKILL
if status < 0:
    for sig in FORWARD:
        signal.signal(sig, signal.SIG_DFL)
    os.kill(os.getpid(), -status)
os._exit(status if status >= 0 else 1)
'''

# The server: argv[1] the socket path, argv[2] the modules to import, argv[3] STARTUP_ENV (JSON). When it
# listens, it prints its own values of STARTUP_ENV (JSON), which the launcher compares a run's with.
_SERVER = r'''
import json, os, select, signal, socket, sys

SOCK, PRELOAD, STARTUP_ENV = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3])
for name in PRELOAD:
    __import__(name)
_START_PATH = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
BASE_PATH = [p for p in sys.path[1:] if p not in _START_PATH]  # sys.path[0] is -c's ""


def recv_request(conn):
    head, fds, _, _ = socket.recv_fds(conn, 1 << 20, 3)
    size = int.from_bytes(head[:8], "big")
    data = head[8:]
    while len(data) < size:
        chunk = conn.recv(size - len(data))
        if not chunk:
            raise EOFError
        data += chunk
    return json.loads(data), fds


def stdio(fd, write, env, encoding):
    import io

    unbuffered = bool(env.get("PYTHONUNBUFFERED"))
    raw = io.FileIO(fd, "wb" if write else "rb", closefd=False)
    raw.name = ("<stdin>", "<stdout>", "<stderr>")[fd]  # as python names them
    if write and unbuffered:
        buf = raw
    else:
        buf = io.BufferedWriter(raw) if write else io.BufferedReader(raw)
    errors = "backslashreplace" if fd == 2 else sys.stdout.errors
    return io.TextIOWrapper(buf, encoding=encoding, errors=errors, line_buffering=write and (fd == 2 or raw.isatty()),
                            write_through=write and unbuffered)


def run(req, fds):
    """The worker: becomes the process `python` would have started, runs the request, exits."""
    import atexit, runpy, threading, types

    for i, fd in enumerate(fds):
        if fd != i:
            os.dup2(fd, i)
    for fd in fds:
        if fd > 2:
            os.close(fd)
    # the signal dispositions python starts with, given what the caller left ignored
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2):
        if sig in req["ignored"]:
            signal.signal(sig, signal.SIG_IGN)
        else:
            signal.signal(sig, signal.default_int_handler if sig == signal.SIGINT else signal.SIG_DFL)
    os.chdir(req["cwd"])
    os.environ.clear()
    os.environ.update(req["env"])
    extra = [p for p in req["env"].get("PYTHONPATH", "").split(os.pathsep) if p]
    encoding = sys.stdout.encoding
    sys.stdin, sys.stdout, sys.stderr = (stdio(0, False, req["env"], encoding), stdio(1, True, req["env"], encoding),
                                         stdio(2, True, req["env"], encoding))
    sys.__stdin__, sys.__stdout__, sys.__stderr__ = sys.stdin, sys.stdout, sys.stderr
    sys.executable = req["executable"]
    kind, target, args = req["kind"], req["target"], req["args"]
    code = 0
    try:
        if kind == "-m":
            sys.path[:] = [os.getcwd(), *extra, *BASE_PATH]
            sys.argv = ["-m", *args]
            runpy._run_module_as_main(target, alter_argv=True)
        elif kind == "-c":
            sys.path[:] = ["", *extra, *BASE_PATH]
            sys.argv = ["-c", *args]
            main = types.ModuleType("__main__")
            main.__dict__["__builtins__"] = __builtins__
            sys.modules["__main__"] = main
            exec(compile(target, "<string>", "exec"), main.__dict__)
        else:
            sys.path[:] = [os.path.dirname(os.path.realpath(target)), *extra, *BASE_PATH]
            sys.argv = [target, *args]
            runpy.run_path(target, run_name="__main__")
    except SystemExit as e:
        if e.code is None:
            code = 0
        elif isinstance(e.code, int):
            code = e.code
        else:
            print(e.code, file=sys.stderr)
            code = 1
    except BaseException as e:
        # the traceback python prints: without this function's frame (and, for a script, runpy's)
        tb = e.__traceback__.tb_next
        while kind == "script" and tb is not None and tb.tb_frame.f_code.co_filename != target:
            tb = tb.tb_next
        sys.excepthook(type(e), e.with_traceback(tb), tb)
        code = -signal.SIGINT if isinstance(e, KeyboardInterrupt) else 1  # python ends by SIGINT then
    try:
        threading._shutdown()
        atexit._run_exitfuncs()
    finally:
        for s in (sys.stdout, sys.stderr):
            try:
                s.flush()
            except Exception:
                pass
        if code < 0:
            signal.signal(-code, signal.SIG_DFL)
            os.kill(os.getpid(), -code)
        os._exit(code & 0xFF)


def supervise(conn):
    """Between the launcher and its run: starts the run, kills it if the launcher goes, reports its end."""
    try:
        req, fds = recv_request(conn)
    except (OSError, EOFError, ValueError):
        os._exit(0)
    pid = os.fork()
    if pid == 0:
        conn.close()
        run(req, fds)
    for fd in fds:
        os.close(fd)
    conn.sendall((json.dumps({"pid": pid}) + "\n").encode())
    pidfd = os.pidfd_open(pid)
    while True:
        ready, _, _ = select.select([conn, pidfd], [], [])
        if pidfd in ready:
            break
        try:
            gone = not conn.recv(1)
        except OSError:
            gone = True
        if gone:  # the launcher is gone: so is its run
            os.kill(pid, signal.SIGKILL)
            break
    _, status = os.waitpid(pid, 0)
    try:
        conn.sendall((json.dumps({"status": os.waitstatus_to_exitcode(status)}) + "\n").encode())
    except OSError:
        pass
    os._exit(0)


def reap(block):
    """Waits for ended supervisors: their CPU time, and their runs', counts in this server's children's, and
    so in the test process's once this server has ended (the suite's CPU time stays the whole of it)."""
    while True:
        try:
            pid, _ = os.waitpid(-1, 0 if block else os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
srv.bind(SOCK)
srv.listen(64)
# the environment as this process has it (python sets LC_CTYPE itself under the C locale, PEP 538)
sys.stdout.write(json.dumps({k: os.environ.get(k) for k in STARTUP_ENV}) + "\n")
sys.stdout.flush()
while True:  # until the test process closes stdin: then the runs still going are waited for
    ready, _, _ = select.select([srv, 0], [], [], 1.0)
    reap(block=False)
    if 0 in ready and not os.read(0, 1):
        srv.close()
        reap(block=True)
        break
    if srv in ready:
        conn, _ = srv.accept()
        if os.fork() == 0:
            srv.close()
            supervise(conn)
        conn.close()
'''


class _Server:
    def __init__(self, env: dict):
        self.dir = Path(tempfile.mkdtemp(prefix="warm-python-"))
        sock = str(self.dir / "sock")
        self.proc = subprocess.Popen([sys.executable, "-c", _SERVER, sock, json.dumps(PRELOAD), json.dumps(STARTUP_ENV)],
                                     env=env,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                     text=True)
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the warm python server did not start (exit {self.proc.wait()})")
        server_env = json.loads(line)
        self.executable = self.dir / "python"
        self.executable.write_text(f"#!{sys.executable} -S\n"
                                   + _CLIENT.format(real=sys.executable, sock=sock, server_env=server_env))
        self.executable.chmod(0o755)

    def close(self):
        self.proc.stdin.close()  # the server waits for its runs, then ends
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc.stdout.close()
        for p in self.dir.iterdir():
            p.unlink()
        self.dir.rmdir()


_SERVERS: dict = {}


def warm_executable(env: dict | None = None) -> str:
    """The launcher's path (a server per environment and test process, started on first use); the real
    interpreter's with ``ASAM_TESTS_COLD=1`` in the environment (to compare, or to rule the launcher out)."""
    if os.environ.get("ASAM_TESTS_COLD") == "1":
        return sys.executable
    return launcher(env)


def launcher(env: dict | None = None) -> str:
    """The launcher's path whatever ``ASAM_TESTS_COLD`` says (tests/test_warm_python.py tests the launcher)."""
    env = dict(os.environ if env is None else env)
    key = tuple(env.get(k) for k in ["PYTHONPATH", *STARTUP_ENV])
    if key not in _SERVERS or _SERVERS[key].proc.poll() is not None:
        _SERVERS[key] = _Server(env)
    return str(_SERVERS[key].executable)


@atexit.register
def close_servers() -> None:
    while _SERVERS:
        _SERVERS.popitem()[1].close()
