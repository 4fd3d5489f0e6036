#!/usr/bin/env python
"""The measured tables of README.md and docs/efficiency.md, rendered from the committed JSON.

Every number in these tables comes from one of two files: ``docs/bench.json`` (``make bench``: the
commit, command, machine and date are in it) and ``docs/efficiency-results.json`` (the cheaper-updates
study). Each table sits between two markers in the Markdown; ``--write`` puts the rendered tables there,
and ``tests/test_readme_numbers.py`` checks that the committed Markdown holds exactly what the JSON gives.

    python scripts/readme_numbers.py            # print the tables
    python scripts/readme_numbers.py --write    # rewrite them in README.md and docs/efficiency.md
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "docs" / "bench.json"
STUDY = ROOT / "docs" / "efficiency-results.json"
CORRELATION = ROOT / "docs" / "correlation-results.json"
# The study's three tasks where full ASAM's gain over SGD is >= 3 standard errors, in the table's order.
POWERED = ("mnist-mlp 40% noise", "mnist-mlp clean", "mnist-resnet 40% noise")


def _x(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}x"


def _m(n: int) -> str:
    return f"{n / 1e6:.1f}M" if n >= 1e5 else f"{n / 1e6:.2f}M"


def cost_table(bench: dict) -> str:
    """Whole-update CPU time over the base optimizer's, per front end (the headline cost ratio)."""
    s = bench["sections"]
    fq, vi = s["efficient"]["cpu"]["fairseq"], s["efficient"]["cpu"]["vision"]
    fq_params = s["fairseq"]["cpu"]["n_params"]
    hf, lt = s["hf"], s["lightning"]
    fr, vr = fq["cpu_ratio_to_adam"], vi["cpu_ratio_to_sgd"]
    rows = [
        (f"`fairseq-train`, transformer_iwslt_de_en layers on the benchmark's small vocabulary ({_m(fq_params)})",
         "adam", fr["sam_adam"], fr["asam_adam"], fr["asam_adam onepass-mom"]),
        (f"`asam-vision-train`, {vi['model']} ({_m(vi['n_params'])}), batch {vi['batch']}",
         "sgd", vr.get("sam"), vr["asam"], vr.get("onepass-mom")),
        (f"Hugging Face Trainer, {hf['model']} ({_m(hf['n_params'])})", "adamw", None,
         hf["cpu_ratio_to_adamw"]["asam"], hf["cpu_ratio_to_adamw"]["asam_one_pass"]),
        (f"PyTorch Lightning, {lt['model']} ({_m(lt['n_params'])}), batch {lt['batch']}", "adam", None,
         lt["cpu_ratio_to_adam"]["asam"], lt["cpu_ratio_to_adam"]["asam_one_pass"]),
    ]
    out = ["| front end, model | base optimizer | SAM | ASAM | ASAM, one pass (momentum) |",
           "|---|---|---|---|---|"]
    out += [f"| {name} | {base} 1.00x | {_x(sam)} | {_x(asam)} | {_x(one)} |" for name, base, sam, asam, one in rows]
    k = s["kernel"]["transformer_iwslt_de_en/cpu"]
    mem = s["fairseq"]["cpu"]["extra_memory_over_adam_in_param_bytes"]["asam_adam"]
    m = bench["machine"]
    out += ["", f"The ascent and the restore alone take {_x(k['ratio_to_adam'][k['default_kernel']])} one Adam step "
            f"on the full transformer_iwslt_de_en ({_m(k['n_params'])} parameters, its IWSLT'14 vocabulary); "
            f"`asam_adam`'s peak memory is {mem:+.2f}x the parameter bytes above Adam's (peak RSS, glibc's "
            f"default allocator). Measured on {m['cpu']}, {m['cpu_count']} cores, torch {m['torch']}, "
            f"{bench['date']}, commit {str(bench['commit'])[:10]}."]
    return "\n".join(out)


def decision_table(study: dict, bench: dict) -> str:
    """Which update to use: passes, measured cost, and what the study found each keeps of full ASAM's gain."""
    fq = bench["sections"]["efficient"]["cpu"]["fairseq"]["cpu_ratio_to_adam"]
    rows = study["summary"]
    verdicts = study["recommendation"]["verdicts"]

    def kept(name: str) -> str:
        return ", ".join(f"{rows[t]['rows'][name]['gain_kept'] * 100:.0f}%" for t in POWERED)

    def passes(name: str) -> str:
        return "2" if name == "asam" else f"{verdicts[name]['passes']:.2f}"

    ema = study["ema_decay"]
    table = [
        ("full update (default)", "`Full()`; fairseq and vision: no flag", "asam", "the paper's update: the whole gain",
         fq["asam_adam"]),
        ("one pass along the momentum, and an EMA of the weights",
         f"`OnePass(\"momentum\")`, evaluate `torch.optim.swa_utils.AveragedModel` (decay {ema})", "onepass-mom+ema",
         "about the base optimizer's cost, most of the gain", fq["asam_adam onepass-mom"]),
        ("one pass along the momentum", "`OnePass(\"momentum\")`; `--asam-one-pass momentum`, `--one-pass momentum`",
         "onepass-mom", "models without BatchNorm", fq["asam_adam onepass-mom"]),
        ("one pass along the previous gradient", "`OnePass(\"previous\")`; `--asam-one-pass previous`",
         "onepass-prev", "a base optimizer without momentum, no BatchNorm", fq["asam_adam onepass-prev"]),
        ("the full update every 10th step", "`EveryK(10)`; `--asam-every 10`, `--every 10`", "every10",
         "not recommended", None),
    ]
    out = ["| update | how | use it for | passes / update (with the BatchNorm recompute) | CPU cost, fairseq (base 1.00x) | kept of full ASAM's gain: "
           "MLP 40% noise, MLP clean, ResNet+BN 40% noise |",
           "|---|---|---|---|---|---|"]
    out += [f"| {what} | {how} | {use} | {passes(name)} | {_x(cost)} | {kept(name)} |"
            for what, how, name, use, cost in table]
    return "\n".join(out)


def efficient_tables(bench: dict) -> str:
    """The cheaper policies' whole-update cost in fairseq, vision and on the small MLP (CPU time, one thread)."""
    s = bench["sections"]
    fq, vi, sm = s["efficient"]["cpu"]["fairseq"], s["efficient"]["cpu"]["vision"], s["small"]["cpu"]
    fq_params = s["fairseq"]["cpu"]["n_params"]
    out = [f"| fairseq optimizer ({_m(fq_params)} parameters) | CPU ms / update | CPU ratio to adam | wall ratio to adam |",
           "|---|---|---|---|"]
    out += [f"| {m} | {fq['cpu_seconds_per_update'][m] * 1e3:.0f} | {_x(fq['cpu_ratio_to_adam'][m])} | "
            f"{_x(fq['ratio_to_adam'][m])} |" for m in fq["cpu_seconds_per_update"]]
    out += ["", f"| vision minimizer ({vi['model']}, batch {vi['batch']}) | CPU ms / update | CPU ratio to sgd | "
            "wall ratio to sgd |", "|---|---|---|---|"]
    out += [f"| {m} | {vi['cpu_seconds_per_update'][m] * 1e3:.0f} | {_x(vi['cpu_ratio_to_sgd'][m])} | "
            f"{_x(vi['ratio_to_sgd'][m])} |" for m in vi["cpu_seconds_per_update"]]
    out += ["", f"| small model ({sm['model']}, {_m(sm['n_params'])} parameters, batch {sm['batch']}) | CPU ms / update | "
            "CPU ratio to sgd | wall ratio to sgd |", "|---|---|---|---|"]
    out += [f"| {m} | {sm['cpu_seconds_per_update'][m] * 1e3:.2f} | {_x(sm['cpu_ratio_to_sgd'][m])} | "
            f"{_x(sm['ratio_to_sgd'][m])} |" for m in sm["cpu_seconds_per_update"]]
    return "\n".join(out)


def bench_tables(bench: dict) -> str:
    """Every section of the benchmark JSON, as ``scripts/benchmark.py --render`` prints it."""
    import benchmark  # scripts/, beside this file

    return benchmark.render(bench)


def correlation_table(corr: dict) -> str:
    """The correlation study's whole table (docs/sharpness.md), as scripts/correlation_study.py writes it."""
    import correlation_study

    ranked = sum(1 for n in corr["networks"] if n["converged"])
    return correlation_study.table_markdown(corr["stats"], ranked, len(corr["networks"])).rstrip("\n")


def correlation_summary(corr: dict) -> str:
    """tau and Psi of the four measures (the README)."""
    import correlation_study

    stats, cols = corr["stats"], [k for k, _, _ in correlation_study.MEASURES]
    return "\n".join([
        "| | sharpness p = 2 | adaptive p = 2 | sharpness p = inf | adaptive p = inf |",
        "|---|---|---|---|---|",
        "| tau | " + " | ".join(f"{stats[c]['tau']:.3f}" for c in cols) + " |",
        "| Psi | " + " | ".join(f"{stats[c]['Psi']:.3f}" for c in cols) + " |",
    ])


TABLES = {
    "cost": (lambda b, s, c: cost_table(b), [ROOT / "README.md"]),
    "cheaper-updates": (lambda b, s, c: decision_table(s, b), [ROOT / "README.md", ROOT / "docs" / "efficiency.md"]),
    "policy-cost": (lambda b, s, c: efficient_tables(b), [ROOT / "docs" / "efficiency.md"]),
    "bench": (lambda b, s, c: bench_tables(b), [ROOT / "docs" / "performance.md"]),
    "correlation": (lambda b, s, c: correlation_table(c), [ROOT / "docs" / "sharpness.md"]),
    "correlation-summary": (lambda b, s, c: correlation_summary(c), [ROOT / "README.md"]),
}


def markers(name: str) -> tuple[str, str]:
    return (f"<!-- {name} table: generated by scripts/readme_numbers.py from docs/*.json; do not edit -->",
            f"<!-- end of {name} table -->")


def render(bench: dict | None = None, study: dict | None = None) -> dict[str, str]:
    bench = bench if bench is not None else json.loads(BENCH.read_text())
    study = study if study is not None else json.loads(STUDY.read_text())
    corr = json.loads(CORRELATION.read_text())
    return {name: fn(bench, study, corr) for name, (fn, _) in TABLES.items()}


def between(text: str, name: str) -> str | None:
    """The text between ``name``'s markers, or None when the markers are not there."""
    start, end = markers(name)
    m = re.search(re.escape(start) + r"\n(.*?)" + re.escape(end), text, flags=re.S)
    return None if m is None else m.group(1).rstrip("\n")


def write(tables: dict[str, str]) -> list[Path]:
    changed = []
    for name, (_, paths) in TABLES.items():
        start, end = markers(name)
        for path in paths:
            text = path.read_text()
            if between(text, name) is None:
                raise SystemExit(f"{path}: no {name!r} markers ({start} ... {end}); add them where the table goes")
            block = f"{start}\n{tables[name]}\n{end}"
            new = re.sub(re.escape(start) + r"\n.*?" + re.escape(end), lambda _m, b=block: b, text, flags=re.S)
            if new != text:
                path.write_text(new)
                changed.append(path)
    return changed


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--write", action="store_true", help="rewrite the tables in README.md and docs/efficiency.md")
    a = ap.parse_args(argv)
    tables = render()
    if a.write:
        for p in write(tables):
            print(f"rewrote {p.relative_to(ROOT)}")
    else:
        for name, t in tables.items():
            print(f"## {name}\n\n{t}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
