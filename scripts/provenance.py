"""Where a committed result comes from: the commit, the command, the machine and the date.

Every JSON under docs/ that the documentation quotes carries these four keys (issue 28: one source for
every number), written by the script that measured it:

    from provenance import stamp
    result = {**stamp("python scripts/toy_example.py"), "runs": ...}
    write_json(result, "docs/toy-results.json")
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import time

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")


def machine() -> dict:
    import torch

    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    info["cpu"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return info


def commit() -> str | None:
    """The repository's HEAD commit (None outside a git checkout), with "+dirty" when files differ from it."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=ROOT, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, cwd=ROOT, timeout=10)
    except OSError:
        return None
    if head.returncode != 0:
        return None
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def cpu_seconds() -> float:
    """CPU time of this process and of its finished child processes (a script's fairseq-train, a command)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def conditions() -> dict:
    """What a timing ran under besides the machine: torch's thread setting and the cores it was allowed."""
    return {"omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "cores_allowed": len(os.sched_getaffinity(0))}


def stamp(command: str) -> dict:
    """The four provenance keys, in the order the committed JSON files show them."""
    return {"commit": commit(), "command": command, "machine": machine(),
            "date": time.strftime("%Y-%m-%d", time.gmtime())}


def write_json(doc: dict, path: str) -> None:
    """``doc`` to ``path`` whole or not at all (a temporary file renamed over it)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(doc, f, indent=1)
        f.write("\n")
    os.replace(path + ".tmp", path)
