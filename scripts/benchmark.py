#!/usr/bin/env python
"""Side-by-side benchmark of SAM/ASAM against their base optimizers; prints markdown, writes JSON.

    python scripts/benchmark.py                       # every section, CPU (and CUDA when present)
    python scripts/benchmark.py --sections kernel --repeats 5
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

# benchmarks/ is a package of the repository (not installed): the repository root goes on the path.
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from provenance import commit, machine  # noqa: E402  (scripts/, beside this file)

from benchmarks import efficient_update, fairseq_update, hf_update, kernel, lightning_update, vision_update  # noqa: E402

SECTIONS = ["kernel", "fairseq", "vision", "efficient", "small", "hf", "lightning"]


def _mb(b):
    return f"{b / 2**20:.0f} MiB"


# Each section: a measure function (what the JSON keeps) and a table function (its Markdown, from that data
# alone, so that `--render` prints the tables of a saved JSON and the docs can be checked against it).


def kernel_section(args, devices):
    out = {}
    for dev in devices:
        for label, fn in [("transformer_iwslt_de_en", kernel.transformer_iwslt_params),
                          ("wrn28_10", kernel.wrn28_10_params)]:
            out[f"{label}/{dev}"] = kernel.bench_kernel(fn(), device=dev, repeats=args.repeats)
    return out


def kernel_table(out) -> list[str]:
    rows = []
    for key, r in out.items():
        label, dev = key.split("/")
        s, q = r["seconds"], r["ratio_to_adam"]
        rows.append(
            f"| {label} ({r['n_params'] / 1e6:.1f}M) | {dev} | {s['adam'] * 1e3:.1f} | "
            f"{s['loop'] * 1e3:.1f} ({q['loop']:.2f}x) | {s['foreach'] * 1e3:.1f} ({q['foreach']:.2f}x) | "
            f"{s['reference'] * 1e3:.1f} ({q['reference']:.2f}x) | {r['default_kernel']}"
            f"{'' if r['default_is_fastest_core_kernel'] else ' (slower here!)'} |"
        )
    return [
        "### Perturbation kernel: ascent + restore vs one fairseq Adam step (median ms, ratio to Adam)",
        "",
        "| parameters | device | Adam step | loop kernel | foreach kernel | reference per-param loop | default |",
        "|---|---|---|---|---|---|---|",
        *rows,
    ]


def fairseq_section(args, devices):
    return {dev: fairseq_update.bench_updates(rounds=args.rounds, updates=args.updates, device=dev, quick=args.quick)
            for dev in devices}


def fairseq_table(out) -> list[str]:
    rows, mem_rows, br_rows = [], [], []
    for dev, r in out.items():
        s, q, u = r["seconds_per_update"], r["ratio_to_adam"], r["updates_per_second"]
        for m in s:
            c = r.get("cpu_seconds_per_update", {}).get(m)
            cpu = f"{c * 1e3:.0f} | {r['cpu_ratio_to_adam'][m]:.3f}x" if c is not None else "- | -"
            rows.append(f"| {m} | {dev} | {cpu} | {s[m] * 1e3:.0f} | {u[m]:.2f} | {q[m]:.3f}x |")
            mem_rows.append(f"| {m} | {dev} | {_mb(r['peak_memory_bytes'][m])} | "
                            f"{r['extra_memory_over_adam_in_param_bytes'][m]:+.2f} |")
        b = r["asam_update_breakdown_seconds"]
        for k, v in b.items():
            if k != "total":
                br_rows.append(f"| {k} | {dev} | {v * 1e3:.1f} | {v / b['total'] * 100:.1f}% |")
        br_rows.append(f"| **total** | {dev} | {b['total'] * 1e3:.1f} | 100% |")
    n = next(iter(out.values()))
    return [
        f"### Whole fairseq update ({n['n_params'] / 1e6:.1f}M-parameter transformer, `fairseq-train` code path)",
        "",
        "| optimizer | device | CPU ms / update | CPU ratio to adam | wall ms / update | updates / s | wall ratio |",
        "|---|---|---|---|---|---|---|",
        *rows,
        "",
        f"### Peak memory ({n['memory_kind']}; parameters: {_mb(n['param_bytes'])})",
        "",
        "| optimizer | device | peak | extra over adam / parameter bytes |",
        "|---|---|---|---|",
        *mem_rows,
        "",
        "### Where one asam_adam update's time goes (median ms per phase, wall time)",
        "",
        "| phase | device | ms | share |",
        "|---|---|---|---|",
        *br_rows,
    ]


def vision_section(args, devices):
    return {dev: vision_update.bench_vision(model_name=args.vision_model, batch=16 if args.quick else 128,
                                            repeats=2 if args.quick else args.repeats, device=dev)
            for dev in devices}


def vision_table(out) -> list[str]:
    rows = [f"| {m} | {dev} | {s * 1e3:.0f} | {1 / s:.2f} | {r['ratio_to_sgd'][m]:.3f}x |"
            for dev, r in out.items() for m, s in r["seconds_per_update"].items()]
    r = next(iter(out.values()))
    return [
        f"### Whole update of the torchvision entry point ({r['model']}, {r['n_params'] / 1e6:.2f}M parameters, "
        f"batch {r['batch']}, wall time)",
        "",
        "| minimizer | device | ms / update | updates / s | ratio to sgd |",
        "|---|---|---|---|---|",
        *rows,
    ]


def efficient_section(args, devices):
    """The cheaper schedules' whole-update cost beside the base and the full update (fairseq and vision)."""
    return {dev: {"fairseq": efficient_update.bench_fairseq(rounds=args.rounds, device=dev, quick=args.quick),
                  "vision": efficient_update.bench_vision(model_name=args.vision_model, batch=16 if args.quick else 128,
                                                          rounds=1 if args.quick else 3, timed=10, device=dev)}
            for dev in devices}


def efficient_table(out) -> list[str]:
    frows, vrows = [], []
    for dev, both in out.items():
        f, v = both["fairseq"], both["vision"]
        for m, s in f["seconds_per_update"].items():
            cpu = (f"{f['cpu_seconds_per_update'][m] * 1e3:.0f} | {f['cpu_ratio_to_adam'][m]:.2f}x"
                   if "cpu_seconds_per_update" in f else "- | -")
            frows.append(f"| {m} | {dev} | {cpu} | {s * 1e3:.0f} | {f['ratio_to_adam'][m]:.2f}x | "
                         f"{f['ratio_to_asam_adam'][m]:.2f}x |")
        for m, s in v["seconds_per_update"].items():
            cpu = (f"{v['cpu_seconds_per_update'][m] * 1e3:.0f} | {v['cpu_ratio_to_sgd'][m]:.2f}x"
                   if "cpu_seconds_per_update" in v else "- | -")
            vrows.append(f"| {m} | {dev} | {cpu} | {s * 1e3:.0f} | {v['ratio_to_sgd'][m]:.2f}x | "
                         f"{v['ratio_to_asam'][m]:.2f}x |")
    v = next(iter(out.values()))["vision"]
    return [
        "### Cheaper updates: whole-update cost (mean over 10 consecutive updates, side by side; CPU: one thread,",
        "CPU time of the process, and wall time)",
        "",
        "| fairseq optimizer | device | CPU ms / update | CPU ratio to adam | wall ms / update | wall ratio to adam "
        "| wall ratio to asam_adam |",
        "|---|---|---|---|---|---|---|",
        *frows,
        "",
        f"| vision minimizer ({v['model']}, batch {v['batch']}) | device | CPU ms / update | CPU ratio to sgd | "
        "wall ms / update | wall ratio to sgd | wall ratio to asam |",
        "|---|---|---|---|---|---|---|",
        *vrows,
    ]


def small_section(args, devices):
    """The cheaper schedules on a small model (CPU, one thread), beside the floor of any exact-restore update."""
    return {"cpu": efficient_update.bench_small(rounds=1 if args.quick else 5, timed=5 if args.quick else 50)}


def small_table(out) -> list[str]:
    small = out["cpu"]
    rows = [f"| {m} | {small['cpu_seconds_per_update'][m] * 1e3:.2f} | {small['cpu_ratio_to_sgd'][m]:.2f}x | "
            f"{s * 1e3:.2f} | {small['ratio_to_sgd'][m]:.2f}x |" for m, s in small["seconds_per_update"].items()]
    return [
        "### Cheaper updates on a small model (MLP 784-256-256-10, 270k parameters, batch 128, cpu, one thread, "
        "`opt.step(closure)`; floor-*: SGD plus only the memory passes of an exact-restore perturbation)",
        "",
        "| update | CPU ms / update | CPU ratio to sgd | wall ms / update | wall ratio to sgd |",
        "|---|---|---|---|---|",
        *rows,
    ]


def hf_section(args, devices):
    """Hugging Face Trainer: plain AdamW vs ASAM vs one-pass ASAM on a Marian-size model (CPU, one thread)."""
    return hf_update.bench_trainer(rounds=1 if args.quick else max(args.rounds, 3), quick=args.quick,
                                   memory_reps=1 if args.quick else 3)


def hf_table(r) -> list[str]:
    sec, cpu, q, qc = (r["seconds_per_update"], r["cpu_seconds_per_update"], r["ratio_to_adamw"],
                       r["cpu_ratio_to_adamw"])
    extra, span = r["extra_memory_over_adamw_in_param_bytes"], r["extra_memory_range_in_param_bytes"]
    heap = r.get("extra_heap_in_use_over_adamw_in_param_bytes")
    rows = [f"| {m} | {cpu[m] * 1e3:.0f} | {qc[m]:.3f}x | {sec[m] * 1e3:.0f} | {q[m]:.3f}x | "
            f"{_mb(r['peak_rss_bytes'][m])} | {extra[m]:+.2f} ({span[m][0]:+.2f} to {span[m][1]:+.2f}) | "
            f"{f'{heap[m]:+.2f}' if heap else '-'} |" for m in sec]
    return [
        f"### Hugging Face Trainer update ({r['model']}, {r['n_params'] / 1e6:.1f}M parameters, batch {r['batch']} x "
        f"{r['src_len']}/{r['tgt_len']} tokens, cpu, {r['threads']} thread)",
        "",
        "| update | CPU ms / update | CPU ratio to adamw | wall ms / update | wall ratio | peak RSS (median) | "
        "extra peak RSS over adamw / parameter bytes (median, range) | extra peak of live allocations / "
        "parameter bytes |",
        "|---|---|---|---|---|---|---|---|",
        *rows,
    ]


def lightning_section(args, devices):
    """PyTorch Lightning: plain Adam vs ASAM vs one-pass ASAM through the mixin, ResNet-18 (CPU, one thread)."""
    return lightning_update.bench_lightning(rounds=1 if args.quick else max(args.rounds, 3), quick=args.quick)


def lightning_table(r) -> list[str]:
    sec, cpu, q, qc = (r["seconds_per_update"], r["cpu_seconds_per_update"], r["ratio_to_adam"],
                       r["cpu_ratio_to_adam"])
    extra = r["extra_memory_over_adam_in_param_bytes"]
    rows = [f"| {m} | {cpu[m] * 1e3:.0f} | {qc[m]:.3f}x | {sec[m] * 1e3:.0f} | {q[m]:.3f}x | "
            f"{_mb(r['peak_rss_bytes'][m])} | {extra[m]:+.2f} |" for m in sec]
    return [
        f"### PyTorch Lightning update ({r['model']}, {r['n_params'] / 1e6:.1f}M parameters, batch {r['batch']} x "
        f"{r['size']}x{r['size']} images, cpu, {r['threads']} thread)",
        "",
        "| update | CPU ms / update | CPU ratio to adam | wall ms / update | wall ratio | peak RSS | "
        "extra peak RSS over adam / parameter bytes |",
        "|---|---|---|---|---|---|---|",
        *rows,
    ]


MEASURE = {"kernel": kernel_section, "fairseq": fairseq_section, "vision": vision_section,
           "efficient": efficient_section, "small": small_section, "hf": hf_section, "lightning": lightning_section}
TABLE = {"kernel": kernel_table, "fairseq": fairseq_table, "vision": vision_table, "efficient": efficient_table,
         "small": small_table, "hf": hf_table, "lightning": lightning_table}


def render(result: dict) -> str:
    """Every section's tables of a saved benchmark JSON, in the order the sections ran."""
    return "\n\n".join("\n".join(TABLE[name](data)) for name, data in result["sections"].items())


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {SECTIONS}")
    ap.add_argument("--repeats", type=int, default=10, help="timed repetitions per contender (alternating)")
    ap.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                    help="auto: CPU, plus CUDA when available")
    ap.add_argument("--rounds", type=int, default=2, help="whole-update sections: alternating rounds per method")
    ap.add_argument("--updates", type=int, default=20, help="whole-update sections: updates per run (4 warm-up)")
    ap.add_argument("--vision-model", default="resnet20", help="vision section: a CIFAR model of the entry point")
    ap.add_argument("--quick", action="store_true", help="tiny models: checks that the benchmark runs, not speed")
    ap.add_argument("--out", default="docs/bench.json",
                    help="where the JSON results go (default docs/bench.json, the numbers the README shows)")
    ap.add_argument("--render", metavar="JSON", default=None,
                    help="print the tables of a saved benchmark JSON (e.g. docs/bench.json) and exit; measures nothing")
    args = ap.parse_args(argv)
    if args.render:
        with open(args.render) as f:
            print(render(json.load(f)))
        return
    sections = [s for s in args.sections.split(",") if s]
    unknown = [s for s in sections if s not in SECTIONS]
    if unknown:
        ap.error(f"--sections: unknown {unknown}; choose from {SECTIONS}")
    if args.updates < 6:
        ap.error(f"--updates must be >= 6 (the first 4 are warm-up), got {args.updates}")
    if args.rounds < 1:
        ap.error(f"--rounds must be >= 1, got {args.rounds}")
    if args.repeats < 1:
        ap.error(f"--repeats must be >= 1, got {args.repeats}")
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device is available")
    devices = ["cpu"] + (["cuda"] if args.device != "cpu" and torch.cuda.is_available() else [])
    if args.device == "cuda":
        devices = ["cuda"]

    result = {"machine": machine(), "commit": commit(), "command": "python scripts/benchmark.py " + " ".join(
        argv if argv is not None else sys.argv[1:]), "date": time.strftime("%Y-%m-%d", time.gmtime()), "sections": {}}
    # Each table is printed (and flushed) as soon as its section is measured: a full run takes many
    # minutes, and the first numbers should not wait for the last section.
    print(f"Machine: {result['machine']['cpu']}, {result['machine']['cpu_count']} cores, "
          f"torch {result['machine']['torch']}, GPU: {result['machine']['cuda'] or 'none'}\n", flush=True)
    for name in sections:
        print(f"[bench] measuring section {name} ...", file=sys.stderr, flush=True)
        data = MEASURE[name](args, devices)
        table = TABLE[name](data)
        result["sections"][name] = data
        _write_json(result, args.out)  # after every section: an interrupted run keeps what it measured
        print("\n".join(table) + "\n", flush=True)
    print(f"wrote {args.out}")


def _write_json(result: dict, out: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    tmp = out + ".tmp"
    with open(tmp, "w") as f:
        json.dump(result, f, indent=2)
    os.replace(tmp, out)


if __name__ == "__main__":
    main()
