#!/usr/bin/env python
"""Issue 15's GPU check, in one go on one CUDA GPU (planned for well under 10 minutes); prints one table.

Every CUDA path of the project was written without a GPU. This runs, in order, each section timed:

1. gpu tests: every test marked ``gpu`` (``pytest -m gpu``); none may be skipped;
2. kernels: the foreach kernel on CUDA against the per-tensor loop kernel in float64 on the CPU, for
   fp32/fp16/bf16 weights, p = 2 and inf, element/filter/no normalization, channels_last convolutions
   (``fairseq_asam.core.perturbation``);
3. sync + restore: exactly one host sync per ascent (``torch.cuda.set_sync_debug_mode``), none in the
   restore, and the restore bit for bit (``ASAM.ascent_step`` / ``restore``), per dtype;
4. precision: items 1-2 (cos(eps fp16, eps fp32); ||w_eps - w|| / ||eps|| per weight dtype) on the GPU,
   and item 3 (a skipped vision update backs the CUDA GradScaler off as torch does);
5. fairseq: ``asam_adam`` with fp16, AMP and bf16 on the tiny corpus of tests/fairseq_helpers.py, in a
   fresh process each: every logged loss finite, and the loss falls;
6. hf fsdp: ``ASAMSeq2SeqTrainer`` with ``fsdp=True`` through Accelerate's own FSDP2 path on the GPUs (one
   or two) against one unsharded process on the union of their batches;
7. bench: ``scripts/benchmark.py --quick --device cuda`` (all sections, CUDA only).

    bash scripts/gpu_check.sh                     # on the GPU machine, from the repository root
    bash scripts/gpu_check.sh --out $OUT/gpu_check.json
    bash scripts/gpu_check.sh --cpu-dry-run       # what runs without a GPU, fast (tests/test_gpu_check.py)

A section that fails does not stop the others; the exit status is 1 when any check failed.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))  # fairseq_helpers: the tiny corpus and the Trainer builder

import torch  # noqa: E402

from fairseq_asam.core import ASAM, SAM, perturbation, resolve_params  # noqa: E402

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# ||eps_device - eps_float64|| / ||eps_float64||: the kernels round once per operation in the weights' dtype.
KERNEL_TOL = {"fp32": 1e-5, "fp16": 1e-2, "bf16": 5e-2}


class Report:
    def __init__(self):
        self.rows: list[dict] = []

    def add(self, section: str, check: str, ok, detail: str = "") -> None:
        """ok: True (pass), False (FAIL) or None (skipped, with the reason in detail)."""
        self.rows.append({"section": section, "check": check, "ok": ok, "detail": detail})
        mark = {True: "ok", False: "FAIL", None: "skip"}[ok]
        print(f"[{section}] {check}: {mark} {detail}", flush=True)

    def failed(self) -> bool:
        return any(r["ok"] is False for r in self.rows)

    def table(self) -> str:
        lines = ["| section | check | result | detail |", "|---|---|---|---|"]
        for r in self.rows:
            mark = {True: "ok", False: "**FAIL**", None: "skipped"}[r["ok"]]
            lines.append(f"| {r['section']} | {r['check']} | {mark} | {r['detail'].replace('|', '/')} |")
        return "\n".join(lines)


def _run_section(report, label, fn, *args):
    t0 = time.perf_counter()
    try:
        fn(report, *args)
    except Exception as e:  # one broken section must not hide the others' results
        report.add(label, "section raised", False, f"{type(e).__name__}: {e}".splitlines()[0][:300])
        traceback.print_exc()
    report.add(label, "time", True, f"{time.perf_counter() - t0:.1f} s")


# ---- 1. the gpu tests --------------------------------------------------------------------------------


def gpu_tests(report, dry: bool) -> None:
    # Only the files that hold gpu tests: collecting the whole suite imports everything (half a minute on a CPU).
    files = sorted(str(f) for f in (ROOT / "tests").glob("test_*.py") if "mark.gpu" in f.read_text())
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-rs", "-p", "no:cacheprovider", *files]
    if dry:
        cmd.insert(3, "--collect-only")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=420)
    out = p.stdout + p.stderr
    if dry:
        m = re.search(r"(\d+)/\d+ tests collected", out)
        n = int(m.group(1)) if m else 0
        report.add("gpu tests", "collected (not run: no GPU)", p.returncode == 0 and n > 0, f"{n} tests marked gpu")
        return
    counts = {k: int(v) for v, k in re.findall(r"(\d+) (passed|failed|skipped|error|errors)", out.splitlines()[-1] if out else "")}
    ok = p.returncode == 0 and counts.get("skipped", 0) == 0 and counts.get("passed", 0) > 0
    report.add("gpu tests", "pytest -m gpu", ok, ", ".join(f"{v} {k}" for k, v in counts.items()) or out[-300:])
    if not ok:
        print(out[-6000:])


# ---- 2. the kernels ----------------------------------------------------------------------------------


def _conv_net():
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.BatchNorm2d(16), torch.nn.ReLU(),
        torch.nn.Conv2d(16, 32, 3, padding=1), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
        torch.nn.Linear(32, 10),
    )  # fmt: skip


def _named_on(device, dtype, seed=0):
    """(name, tensor) of a small conv net in ``dtype`` on ``device``, convs channels_last, and random grads."""
    torch.manual_seed(seed)
    net = _conv_net().to(device=device, dtype=dtype).to(memory_format=torch.channels_last)
    gen = torch.Generator().manual_seed(seed + 1)
    named = list(net.named_parameters())
    grads = [(torch.randn(p.shape, generator=gen) * 1e-2).to(device=device, dtype=dtype) for _, p in named]
    grads = [g.contiguous(memory_format=torch.channels_last) if g.dim() == 4 else g for g in grads]
    return net, named, grads


def kernels(report, device: str) -> None:
    for label, dtype in DTYPES.items():
        worst, where, layout_ok = 0.0, "", True
        for p in (2, math.inf):
            for norm in ("element", "filter", "none"):
                _, named, grads = _named_on(device, dtype)
                specs = resolve_params(named, adaptive=norm != "none", normalization="element" if norm == "none" else norm,
                                       normalize_bias=False)
                kinds = [s.kind for _, s in specs]
                W = [t.detach() for _, t in named]
                got = perturbation(W, grads, rho=0.5, eta=0.01, p=p, kinds=kinds, foreach=True)
                want = perturbation([w.cpu().double() for w in W], [g.cpu().double() for g in grads], rho=0.5,
                                    eta=0.01 if norm != "none" else 0.0, p=p, kinds=kinds, foreach=False)
                diff = math.sqrt(sum(float((a.cpu().double() - b).square().sum()) for a, b in zip(got, want)))
                ref = math.sqrt(sum(float(b.square().sum()) for b in want))
                err = diff / ref
                if err > worst:
                    worst, where = err, f"p={'inf' if p == math.inf else 2} {norm}"
                layout_ok &= all(e.is_contiguous(memory_format=torch.channels_last) for e in got if e.dim() == 4)
        report.add("kernels", f"foreach on {device} vs float64 loop, {label}", worst <= KERNEL_TOL[label],
                   f"worst rel err {worst:.2e} ({where}), tol {KERNEL_TOL[label]:.0e}")
        report.add("kernels", f"channels_last kept, {label}", layout_ok, "eps of the 4-D conv weights")


# ---- 3. host syncs and the restore -------------------------------------------------------------------


def _count_syncs(fn):
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            out = fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    return out, sum("synchronizing CUDA operation" in str(w.message) for w in caught)


def sync_restore(report, device: str) -> None:
    for label, dtype in DTYPES.items():
        for cls in (ASAM, SAM):
            net, named, grads = _named_on(device, dtype)
            base = torch.optim.SGD(net.parameters(), lr=0.1)
            opt = cls(named, base, rho=0.5) if cls is SAM else cls(named, base, rho=0.5, eta=0.01)
            saved = [p.detach().clone() for p in net.parameters()]
            views = [p.data for p in net.parameters()]
            for p, g in zip(net.parameters(), grads):
                p.grad = g.clone()
            if device == "cuda":
                ok, n_ascent = _count_syncs(opt.ascent_step)
                _, n_restore = _count_syncs(opt.restore)
                syncs = f"{n_ascent} sync(s) in the ascent, {n_restore} in the restore"
                sync_ok = n_ascent == 1 and n_restore == 0
            else:
                ok = opt.ascent_step()
                opt.restore()
                syncs, sync_ok = "syncs not counted on the CPU", True
            exact = all(torch.equal(p.detach(), s) for p, s in zip(net.parameters(), saved))
            same_views = all(torch.equal(v, s) for v, s in zip(views, saved))
            report.add("sync+restore", f"{cls.__name__} {label} on {device}", bool(ok and exact and same_views and sync_ok),
                       f"{syncs}; restore bit for bit: {exact}; old .data views see w: {same_views}")


# ---- 4. items 1-3 on the device ----------------------------------------------------------------------


def precision(report, device: str, dry: bool) -> None:
    if dry:
        report.add("precision", "items 1-2 on transformer_iwslt_de_en", None,
                   "dry run: tests/test_precision.py measures them on the CPU (about a minute)")
    else:
        from benchmarks.precision import format_tables, measure

        res = measure(device)
        print("\n".join(format_tables(res)))
        after = {k: v for k, v in res["cosine"].items() if k.startswith("after")}
        worst = min(after.values())
        report.add("precision", f"item 1: cos(eps fp16, eps fp32) on {device}", worst >= 0.999,
                   "; ".join(f"{k.split(' | ')[1]} {v:.6f}" for k, v in after.items()))
        for key, r in res["applied"].items():
            if "ASAM" in key:
                report.add("precision", f"item 2: {key.split(' | ')[0]}", r["restored"],
                           f"||w_eps - w|| / ||eps|| {r['ratio']:.4f}, cos {r['cos']:.4f}, "
                           f"{100 * r['unchanged_fraction']:.1f}% unchanged, restore exact {r['restored']}")
    # Item 3: good, overflow, good with growth_interval 2 ends where torch's own handling ends.
    from fairseq_asam.vision.step import train_step

    def final_scale(two_pass):
        torch.manual_seed(0)
        net = _conv_net().to(device)
        base = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
        opt = ASAM(net.named_parameters(), base, rho=0.5) if two_pass else base
        scaler = torch.amp.GradScaler(device, init_scale=1024.0, growth_interval=2)
        gen = torch.Generator().manual_seed(1)
        x, y = torch.randn(8, 3, 8, 8, generator=gen).to(device), torch.randint(0, 10, (8,), generator=gen).to(device)
        bad = x.clone()
        bad[0, 0, 0, 0] = float("inf")
        crit = torch.nn.CrossEntropyLoss()
        for xb in (x, bad, x):
            train_step(net, opt, crit, xb, y, scaler=scaler, autocast=lambda: torch.autocast(device, dtype=torch.float16))
        return scaler.get_scale()

    ref, got = final_scale(False), final_scale(True)
    report.add("precision", f"item 3: GradScaler after good/overflow/good on {device}", ref == got == 512.0,
               f"ASAM {got:g}, torch's own handling {ref:g}")


# ---- 5. fairseq in each precision mode ---------------------------------------------------------------

FAIRSEQ_MODES = {
    "fp32": ([], None),
    "fp16": (["--fp16"], None),
    "amp": (["--amp"], None),
    "bf16": ([], "bf16"),  # fairseq's command line turns --bf16 into --tpu; its Trainer runs bf16 on CUDA
}


def fairseq_worker(mode: str, data: str, save: str, device: str, updates: int) -> dict:
    """Runs in its own process: ``updates`` asam_adam updates on the tiny corpus; returns the logged losses."""
    from fairseq import metrics
    from fairseq_helpers import build_trainer, train_batches

    flags, edit = FAIRSEQ_MODES[mode]

    def cfg_edit(cfg):
        cfg.common.cpu = device == "cpu"
        if edit == "bf16":
            cfg.common.bf16 = True

    trainer, task, cfg = build_trainer(data, save, "--task", "translation_sam", "--optimizer", "asam_adam",
                                       "--asam-rho", "0.2", *flags, cfg_edit=cfg_edit)
    n_batches = len(list(task.get_batch_iterator(dataset=task.dataset("train"), max_tokens=cfg.dataset.max_tokens,
                                                 seed=1, num_workers=0, epoch=1).next_epoch_itr(shuffle=False)))
    batches = train_batches(task, cfg, n_batches)
    losses, eps_norms, calls = [], [], 0
    while trainer.get_num_updates() < updates and calls < 3 * updates:
        b = batches[calls % len(batches)]
        calls += 1
        with metrics.aggregate(new_root=True) as agg:
            out = trainer.train_step([b])
        if out is not None and "loss" in agg:
            losses.append(float(agg["loss"].avg))
            eps_norms.append(float(agg["eps_norm"].avg) if "eps_norm" in agg else float("nan"))
    dtype = str(next(trainer.model.parameters()).dtype)
    return {"mode": mode, "updates": trainer.get_num_updates(), "calls": calls, "losses": losses,
            "eps_norms": eps_norms, "dtype": dtype, "device": str(next(trainer.model.parameters()).device)}


def fairseq_runs(report, device: str, dry: bool) -> None:
    from fairseq_helpers import make_tiny_corpus

    tmp = Path(tempfile.mkdtemp(prefix="gpu-check-fairseq-"))
    data = make_tiny_corpus(tmp)
    modes = ["fp32"] if dry else ["fp16", "amp", "bf16"]
    updates = 12 if dry else 60
    for mode in modes:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--fairseq-worker", mode, "--data", data,
               "--save", str(tmp / f"save-{mode}"), "--device", device, "--updates", str(updates)]
        env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
        p = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
        line = [s for s in p.stdout.splitlines() if s.startswith("{")]
        if p.returncode != 0 or not line:
            report.add("fairseq", f"asam_adam --{mode} on {device}", False, (p.stderr or p.stdout)[-300:].replace("\n", " "))
            continue
        r = json.loads(line[-1])
        ls = r["losses"]
        k = max(1, min(5, len(ls) // 3))
        first, last = sum(ls[:k]) / k, sum(ls[-k:]) / k
        finite = all(math.isfinite(v) for v in ls + r["eps_norms"])
        learns = last < first - (0.2 if dry else 0.5)
        report.add("fairseq", f"asam_adam {mode} on {device}", bool(finite and learns and r["updates"] >= updates),
                   f"{r['updates']} updates in {r['calls']} steps, weights {r['dtype']}, loss {first:.2f} -> {last:.2f}, "
                   f"finite {finite}, eps_norm {r['eps_norms'][-1] if r['eps_norms'] else float('nan'):.3g}")


# ---- 6. the Hugging Face Trainer under FSDP2 ---------------------------------------------------------


def hf_fsdp(report, dry: bool, out_dir: Path) -> None:
    """ASAMSeq2SeqTrainer with fsdp=True (Accelerate's own FSDP2 path: on a GPU it needs no help) on every GPU
    (NCCL), against one unsharded process on the same GPU with the union of the workers' batches, as
    tests/test_transformers_fsdp.py does on the CPU with two gloo workers."""
    if dry:
        report.add("hf fsdp", "FSDP2 Trainer vs one unsharded process", None,
                   "dry run: tests/test_transformers_fsdp.py runs it on the CPU (2 gloo workers)")
        return
    import socket

    import torch.multiprocessing as mp
    from hf_helpers import fsdp_worker, reference_worker

    world = max(1, min(2, torch.cuda.device_count()))
    kw = dict(use_cpu=False, per_device_train_batch_size=1, gradient_accumulation_steps=2, max_steps=3, optim="sgd",
              learning_rate=0.1, average_tokens_across_devices=False, logging_strategy="steps", logging_steps=1,
              max_grad_norm=0.5, n_examples=6 * world)
    work = out_dir / "hf-fsdp"
    work.mkdir(parents=True, exist_ok=True)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(fsdp_worker, args=(world, port, str(work), kw, None, False), nprocs=world, join=True,
                       start_method="spawn")
    mp.start_processes(reference_worker, args=(str(work), dict(kw, per_device_train_batch_size=world)), nprocs=1,
                       join=True, start_method="spawn")
    got = torch.load(work / "rank0.pt", weights_only=True)
    ref = torch.load(work / "reference.pt", weights_only=True)
    diff = max((got["params"][n] - ref["params"][n]).abs().max().item() for n in ref["params"])
    ok = got["fsdp"] and got["dtensor_params"] and got["shares_groups"] and diff < 1e-5
    report.add("hf fsdp", f"FSDP2 Trainer on {world} GPU(s) vs one unsharded process", bool(ok),
               f"max |w diff| {diff:.2e} after {got['schedule']['updates']} ASAM updates; model {got['model']}, "
               f"DTensor params {got['dtensor_params']}, grad norms {got['grad_norm']} vs {ref['grad_norm']}")


# ---- 7. the benchmark --------------------------------------------------------------------------------


def bench(report, dry: bool, out_dir: Path) -> None:
    if dry:
        report.add("bench", "benchmark.py --quick --device cuda", None, "dry run: tests/test_benchmark.py covers the CPU")
        return
    cmd = [sys.executable, str(ROOT / "scripts" / "benchmark.py"), "--quick", "--device", "cuda", "--repeats", "3",
           "--rounds", "1", "--updates", "6", "--out", str(out_dir / "benchmark.json")]
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300)
    print(p.stdout[-8000:])
    report.add("bench", "benchmark.py --quick --device cuda", p.returncode == 0,
               f"exit {p.returncode}; tables above" if p.returncode == 0 else p.stderr[-300:].replace("\n", " "))


def _preflight(report) -> None:
    """Which of the project's dependencies import here: on a bare GPU image fairseq and its config
    libraries are missing (see scripts/gpu_check.sh), and every fairseq section would fail for that reason."""
    import importlib

    found, missing = [], []
    for mod in ("fairseq", "hydra", "omegaconf", "bitarray", "sacrebleu", "torchvision", "transformers", "accelerate"):
        try:
            m = importlib.import_module(mod)
            found.append(f"{mod} {getattr(m, '__version__', '?')}")
        except Exception as e:  # an ImportError, or a broken build of a compiled extension
            missing.append(f"{mod} ({type(e).__name__})")
    report.add("environment", "imports", not missing,
               ", ".join(found) + (f"; MISSING: {', '.join(missing)} (see scripts/gpu_check.sh)" if missing else ""))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cpu-dry-run", action="store_true",
                    help="run what needs no GPU, on the CPU, with small sizes (checks that the script works)")
    ap.add_argument("--out", default="gpu-check-out/gpu_check.json", help="the results as JSON, and the table beside it")
    ap.add_argument("--sections", default="tests,kernels,sync,precision,fairseq,hf-fsdp,bench",
                    help="comma-separated subset of tests,kernels,sync,precision,fairseq,hf-fsdp,bench")
    # internal: one fairseq run in a fresh process (fairseq keeps global state between runs)
    ap.add_argument("--fairseq-worker", choices=sorted(FAIRSEQ_MODES), help=argparse.SUPPRESS)
    ap.add_argument("--data", help=argparse.SUPPRESS)
    ap.add_argument("--save", help=argparse.SUPPRESS)
    ap.add_argument("--device", default="cuda", help=argparse.SUPPRESS)
    ap.add_argument("--updates", type=int, default=60, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.fairseq_worker:
        print(json.dumps(fairseq_worker(args.fairseq_worker, args.data, args.save, args.device, args.updates)))
        return 0
    dry = args.cpu_dry_run
    if not dry and not torch.cuda.is_available():
        ap.error("no CUDA device: run on the GPU machine, or pass --cpu-dry-run")
    known = {"tests", "kernels", "sync", "precision", "fairseq", "hf-fsdp", "bench"}
    sections = [s for s in args.sections.split(",") if s]
    if set(sections) - known:
        ap.error(f"--sections: unknown {sorted(set(sections) - known)}; choose from {sorted(known)}")
    device = "cpu" if dry else "cuda"
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    report = Report()
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    print(f"gpu_check: torch {torch.__version__}, GPU {gpu}, {'CPU dry run' if dry else 'CUDA'}", flush=True)
    t0 = time.perf_counter()
    _preflight(report)
    plan = {
        "tests": ("gpu tests", gpu_tests, dry),
        "kernels": ("kernels", kernels, device),
        "sync": ("sync+restore", sync_restore, device),
        "precision": ("precision", precision, device, dry),
        "fairseq": ("fairseq", fairseq_runs, device, dry),
        "hf-fsdp": ("hf fsdp", hf_fsdp, dry, out.parent),
        "bench": ("bench", bench, dry, out.parent),
    }
    for name in sections:
        label, fn, *fargs = plan[name]
        _run_section(report, label, fn, *fargs)
    report.add("all", "total time", True, f"{time.perf_counter() - t0:.0f} s")
    table = report.table()
    header = f"GPU check (issue 15): torch {torch.__version__}, GPU {gpu}{', CPU dry run' if dry else ''}"
    print("\n" + header + "\n\n" + table)
    out.write_text(json.dumps({"header": header, "rows": report.rows}, indent=1) + "\n")
    out.with_suffix(".md").write_text(header + "\n\n" + table + "\n")
    return 1 if report.failed() else 0


if __name__ == "__main__":
    sys.exit(main())
