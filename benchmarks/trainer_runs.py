"""What the whole-update trainer sections ("hf", "lightning") share: a driver process per call, the methods in
an order that rotates round after round, and the medians of the timed updates with their ratios to the base."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def rotated(methods: list[str], rounds: int) -> list[str]:
    """``methods`` ``rounds`` times, each round starting one method later, so a slow spell hits all of them."""
    return [m for r in range(rounds) for m in methods[r % len(methods):] + methods[: r % len(methods)]]


def run_driver(driver: str, spec: dict, tmp: Path, *, what: str, env: dict | None = None) -> dict:
    """Run ``driver`` (Python source) as ``python -c driver OUT SPEC`` from the repository root and return the
    JSON it wrote to OUT. glibc's default allocator settings, as users run: no inherited ``MALLOC_*``."""
    out = tmp / f"rec-{len(list(tmp.iterdir()))}.json"
    env = dict(os.environ, **(env or {}))
    for k in [k for k in env if k.startswith("MALLOC_")]:
        del env[k]
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    proc = subprocess.run([sys.executable, "-c", driver, str(out), json.dumps(spec)], capture_output=True,
                          text=True, env=env, cwd=str(REPO))
    if proc.returncode != 0:
        raise RuntimeError(f"{what} failed:\n{proc.stderr[-4000:]}")
    return json.loads(out.read_text())


def update_times(runs: list[dict], methods, *, base: str, warmup: int, updates: int) -> dict:
    """Per method, the timed updates of all its runs (each run's first ``warmup`` dropped), their medians of
    wall and CPU time, and the ratios to ``base``'s (keys ``ratio_to_<base>``, ``cpu_ratio_to_<base>``)."""
    per: dict[str, list[float]] = {m: [] for m in methods}
    cpu: dict[str, list[float]] = {m: [] for m in methods}
    for run in runs:
        per[run["method"]] += run["update_seconds"][warmup:]
        cpu[run["method"]] += run["update_cpu_seconds"][warmup:]
    if not all(per.values()):
        raise RuntimeError(f"too few updates timed ({updates} per run, {warmup} warm-up)")
    sec = {m: statistics.median(v) for m, v in per.items()}
    cpu_sec = {m: statistics.median(v) for m, v in cpu.items()}
    return {
        "seconds_per_update": sec,
        "update_seconds": per,
        f"ratio_to_{base}": {m: s / sec[base] for m, s in sec.items()},
        "cpu_seconds_per_update": cpu_sec,
        f"cpu_ratio_to_{base}": {m: s / cpu_sec[base] for m, s in cpu_sec.items()},
    }
