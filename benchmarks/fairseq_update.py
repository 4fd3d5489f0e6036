"""Benchmark sections 2, 3 and 5: whole fairseq updates (adam vs sam_adam vs asam_adam), peak memory,
and where the time of one asam_adam update goes.

Every run is a real ``fairseq-train`` process (``fairseq_cli.train``) on the same binarized corpus and
model; the only instrumentation is a timer around ``Trainer.train_step`` (one whole update: every
micro-batch's forward/backward and the optimizer step, both passes for SAM/ASAM) and the process's
peak memory, written to a JSON file when the process exits. The methods are run alternately, round
after round, so that a slow spell of a shared machine hits all of them.

    python scripts/benchmark.py --sections fairseq
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import fairseq_asam

from .tiny_corpus import make_tiny_corpus

REPO = Path(__file__).resolve().parents[1]
# --user-dir: wherever the package is imported from (an editable clone or an installed wheel).
USER_DIR = str(Path(fairseq_asam.__file__).resolve().parent)

# Runs inside each fairseq-train process: times Trainer.train_step and records peak memory.
_DRIVER = r"""
import atexit, json, resource, sys, time
import torch
import fairseq.trainer as _t

out_path = sys.argv.pop(1)
rec = {"update_seconds": [], "update_cpu_seconds": [], "param_bytes": None}
_orig = _t.Trainer.train_step

def _timed(self, samples, raise_oom=False):
    cuda = torch.cuda.is_available() and next(self.model.parameters()).is_cuda
    if rec["param_bytes"] is None:
        rec["param_bytes"] = sum(p.numel() * p.element_size() for p in self.model.parameters())
        rec["n_params"] = sum(p.numel() for p in self.model.parameters())
        if cuda:
            torch.cuda.reset_peak_memory_stats()
    if cuda:
        torch.cuda.synchronize()
    t0, c0 = time.perf_counter(), time.process_time()
    r = _orig(self, samples, raise_oom)
    if cuda:
        torch.cuda.synchronize()
    rec["update_seconds"].append(time.perf_counter() - t0)
    # This process's CPU time: with one thread, the work done even when other jobs share the cores.
    rec["update_cpu_seconds"].append(time.process_time() - c0)
    return r

_t.Trainer.train_step = _timed

@atexit.register
def _write():
    # VmHWM, not getrusage's ru_maxrss: Linux keeps ru_maxrss across execve, so a child of a big
    # parent process would report the parent's peak.
    with open("/proc/self/status") as f:
        hwm = [line for line in f if line.startswith("VmHWM:")]
    rec["peak_rss_bytes"] = int(hwm[0].split()[1]) * 1024 if hwm else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    if torch.cuda.is_available():
        rec["cuda_max_allocated_bytes"] = torch.cuda.max_memory_allocated()
    with open(out_path, "w") as f:
        json.dump(rec, f)

from fairseq_cli.train import cli_main
sys.argv[0] = "fairseq-train"
cli_main()
"""

METHODS = {
    "adam": ["--optimizer", "adam"],
    "sam_adam": ["--optimizer", "sam_adam", "--asam-rho", "0.1"],
    "asam_adam": ["--optimizer", "asam_adam", "--asam-rho", "0.2"],
}

# The transformer_iwslt_de_en shape (512-dim, 6+6 layers, 1024 FFN, 4 heads) on a small vocabulary.
MEDIUM = ["--arch", "transformer_iwslt_de_en", "--share-decoder-input-output-embed"]
TINY = [
    "--arch", "transformer", "--encoder-layers", "1", "--decoder-layers", "1",
    "--encoder-embed-dim", "32", "--decoder-embed-dim", "32",
    "--encoder-ffn-embed-dim", "64", "--decoder-ffn-embed-dim", "64",
    "--encoder-attention-heads", "2", "--decoder-attention-heads", "2",
]  # fmt: skip


def make_corpus(tmp: Path) -> str:
    return make_tiny_corpus(tmp / "corpus", n_train=600, n_valid=8, n_test=8)


def _env(threads: int | None) -> dict:
    env = dict(os.environ)
    # glibc's default allocator settings, as users run: no MALLOC_* variable of our own, and none inherited.
    for k in [k for k in env if k.startswith("MALLOC_")]:
        del env[k]
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    return env


def run_once(data_bin: str, method: str, arch: list[str], *, updates: int, device: str, tmp: Path,
             max_tokens: int, phase_times: bool = False, threads: int | None = None,
             method_flags: list[str] | None = None) -> dict:
    out = tmp / f"rec-{method}-{os.getpid()}-{len(list(tmp.iterdir()))}.json"
    args = [
        data_bin, "--user-dir", USER_DIR, "--task", "translation_sam", *arch,
        *(METHODS[method] if method_flags is None else method_flags), "--adam-betas", "(0.9, 0.98)", "--lr", "5e-4", "--weight-decay", "1e-4",
        "--lr-scheduler", "inverse_sqrt", "--warmup-updates", "4000", "--dropout", "0.3",
        "--criterion", "label_smoothed_cross_entropy", "--label-smoothing", "0.1",
        "--max-tokens", str(max_tokens), "--max-update", str(updates), "--seed", "1",
        "--save-dir", str(tmp / "ckpt"), "--no-save", "--disable-validation", "--num-workers", "0",
        "--log-format", "json", "--log-interval", "1", "--no-progress-bar",
    ]  # fmt: skip
    if device == "cpu":
        args.append("--cpu")
    env = _env(threads)
    if phase_times:
        env["FAIRSEQ_ASAM_PHASE_TIMES"] = "1"
    proc = subprocess.run([sys.executable, "-c", _DRIVER, str(out), *args], capture_output=True, text=True,
                          env=env, cwd=str(REPO))
    if proc.returncode != 0:
        raise RuntimeError(f"fairseq-train ({method}) failed:\n{proc.stderr[-4000:]}")
    rec = json.loads(out.read_text())
    # fairseq's json log lines look like "... | INFO | train_inner | {...}" or "INFO:train_inner:{...}".
    rec["log"] = [json.loads(line[line.index("{"):]) for line in (proc.stdout + proc.stderr).splitlines()
                  if "train_inner" in line and "{" in line]
    return rec


def bench_updates(*, rounds: int = 2, updates: int = 20, warmup: int = 4, device: str = "cpu",
                  quick: bool = False, threads: int | None = None) -> dict:
    arch = TINY if quick else MEDIUM
    max_tokens = 400 if quick else 1200
    with tempfile.TemporaryDirectory(prefix="asam-bench-") as d:
        tmp = Path(d)
        data_bin = make_corpus(tmp)
        per_method: dict[str, list[float]] = {m: [] for m in METHODS}
        cpu_method: dict[str, list[float]] = {m: [] for m in METHODS}
        mem: dict[str, list[int]] = {m: [] for m in METHODS}
        param_bytes = n_params = None
        methods = list(METHODS)
        for r in range(rounds):
            order = methods[r % len(methods):] + methods[: r % len(methods)]
            for m in order:
                rec = run_once(data_bin, m, arch, updates=updates, device=device, tmp=tmp,
                               max_tokens=max_tokens, threads=threads)
                times = rec["update_seconds"][warmup:]
                if not times:
                    raise RuntimeError(f"{m}: only {len(rec['update_seconds'])} updates ran; raise --updates")
                per_method[m].append(statistics.median(times))
                cpu_method[m].append(statistics.median(rec["update_cpu_seconds"][warmup:]))
                mem[m].append(rec["cuda_max_allocated_bytes"] if device == "cuda" else rec["peak_rss_bytes"])
                param_bytes, n_params = rec["param_bytes"], rec["n_params"]
        # The breakdown of one asam_adam update, from the task's own phase timers.
        rec = run_once(data_bin, "asam_adam", arch, updates=updates, device=device, tmp=tmp,
                       max_tokens=max_tokens, phase_times=True, threads=threads)
    sec = {m: statistics.median(v) for m, v in per_method.items()}
    cpu = {m: statistics.median(v) for m, v in cpu_method.items()}
    peak = {m: min(v) for m, v in mem.items()}
    phases = {}
    for key in ("t_first", "t_ascent", "t_second", "t_restore", "t_reduce_clip", "t_base_step"):
        vals = [row[key] for row in rec["log"][warmup:] if key in row]
        if vals:
            phases[key[2:]] = statistics.median(float(v) for v in vals) / 1000.0
    total = statistics.median(rec["update_seconds"][warmup:])
    phases["other"] = max(0.0, total - sum(phases.values()))
    return {
        "device": device,
        "n_params": n_params,
        "param_bytes": param_bytes,
        "seconds_per_update": sec,
        "updates_per_second": {m: 1.0 / s for m, s in sec.items()},
        "ratio_to_adam": {m: s / sec["adam"] for m, s in sec.items()},
        # The process's CPU time: on one thread, the work done whatever else shares the cores.
        "cpu_seconds_per_update": cpu,
        "cpu_ratio_to_adam": {m: c / cpu["adam"] for m, c in cpu.items()},
        "peak_memory_bytes": peak,
        "memory_kind": "cuda max allocated" if device == "cuda" else "peak RSS",
        "extra_memory_over_adam_in_param_bytes": {m: (peak[m] - peak["adam"]) / param_bytes for m in METHODS},
        "asam_update_breakdown_seconds": {"total": total, **phases},
    }
