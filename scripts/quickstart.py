#!/usr/bin/env python
"""Run a README "Start here" command block as printed and record what it printed and how long it took.

The block is the indented shell block under the README paragraph that starts with the given title (the
CIFAR-10 quick start by default). It runs in a fresh folder that links ``.venv`` to this checkout's, one
command after the other, each through ``bash -c`` exactly as the README prints it; the wall and CPU time of
each (with its child processes) and its last output lines go to the JSON, with the commit, command, machine
and date. ``scripts/readme_numbers.py`` renders the README's time from ``docs/quickstart-results.json``:

    python scripts/quickstart.py --json docs/quickstart-results.json
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from provenance import conditions, cpu_seconds, stamp, write_json  # noqa: E402  (scripts/, beside this file)

ROOT = Path(__file__).resolve().parents[1]
TITLE = "**CIFAR-10 with torchvision.**"


def block(readme: str, title: str = TITLE) -> list[str]:
    """The shell commands of the indented block after the paragraph that starts with ``title`` (a trailing
    backslash joins a line to the next, as in the shell)."""
    start = readme.find(title)
    if start < 0:
        raise ValueError(f"README.md has no paragraph starting with {title!r}")
    m = re.search(r"\n\n((?:    .*\n)+)", readme[start:])
    if m is None:
        raise ValueError(f"no indented command block after {title!r}")
    text = "".join(line[4:] + "\n" for line in m.group(1).splitlines())
    return [c.strip() for c in text.replace("\\\n", " ").splitlines() if c.strip()]


def run_block(commands: list[str], venv: Path, workdir: Path) -> list[dict]:
    """Each command in ``workdir`` (which gets a ``.venv`` link to ``venv``); raises on the first failure."""
    (workdir / ".venv").symlink_to(venv.resolve())
    out = []
    for cmd in commands:
        cpu0, t0 = cpu_seconds(), time.perf_counter()
        p = subprocess.run(["bash", "-c", cmd], cwd=workdir, capture_output=True, text=True)
        wall, cpu = time.perf_counter() - t0, cpu_seconds() - cpu0
        if p.returncode != 0:
            raise RuntimeError(f"`{cmd}` failed (exit {p.returncode}):\n{(p.stdout + p.stderr)[-3000:]}")
        out.append({"command": cmd, "wall_s": round(wall, 1), "cpu_s": round(cpu, 1),
                    "output_tail": p.stdout.strip().splitlines()[-6:]})
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--title", default=TITLE, help="the README paragraph whose block runs (default: %(default)s)")
    ap.add_argument("--json", type=Path, default=None, help="write the record here")
    a = ap.parse_args(argv)
    commands = block((ROOT / "README.md").read_text(), a.title)
    with tempfile.TemporaryDirectory(prefix="asam-quickstart-") as d:
        steps = run_block(commands, ROOT / ".venv", Path(d))
    rec = {**stamp(shlex.join(["python", "scripts/quickstart.py", *(sys.argv[1:] if argv is None else argv)])),
           "title": a.title, **conditions(),
           "load_average": [round(x, 2) for x in os.getloadavg()], "steps": steps,
           "wall_s": round(sum(s["wall_s"] for s in steps), 1), "cpu_s": round(sum(s["cpu_s"] for s in steps), 1)}
    for s in steps:
        print(f"$ {s['command']}\n  {s['wall_s']} s wall, {s['cpu_s']} s CPU; " + " | ".join(s["output_tail"][-2:]))
    if a.json:
        write_json(rec, str(a.json))
    return 0


if __name__ == "__main__":
    sys.exit(main())
