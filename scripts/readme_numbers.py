#!/usr/bin/env python
"""The measured tables of README.md and the guides, rendered from the committed JSON.

Every number in these tables comes from a file under docs/ that records the commit, command, machine and
date of its measurement: ``docs/bench.json`` (``make bench``), ``docs/efficiency-results.json`` (the
cheaper-updates study), ``docs/correlation-results.json`` (``scripts/correlation_study.py``),
``docs/toy-results.json`` (``scripts/toy_example.py``), ``docs/figure4-results.json`` (``scripts/figure4.py
--preset laptop``), ``docs/multi30k-results.json`` (``studies/multi30k.py``), ``docs/demo-results.json``
(``scripts/demo.sh --json``) and ``docs/quickstart-results.json`` (``scripts/quickstart.py``). Each table sits between two
markers in the Markdown; ``--write`` puts the rendered tables there, and ``tests/test_readme_numbers.py``
checks that the committed Markdown holds exactly what the JSON gives.

    python scripts/readme_numbers.py            # print the tables
    python scripts/readme_numbers.py --write    # rewrite them in README.md and docs/*.md
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "docs" / "bench.json"
STUDY = ROOT / "docs" / "efficiency-results.json"
CORRELATION = ROOT / "docs" / "correlation-results.json"
TOY = ROOT / "docs" / "toy-results.json"
FIGURE4 = ROOT / "docs" / "figure4-results.json"
MULTI30K = ROOT / "docs" / "multi30k-results.json"
DEMO = ROOT / "docs" / "demo-results.json"
QUICKSTART = ROOT / "docs" / "quickstart-results.json"
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


def toy_output(toy: dict) -> str:
    """What scripts/toy_example.py printed for its committed JSON, as an indented block (docs/sharpness.md)."""
    import toy_example

    return "\n".join("    " + line for line in toy_example.report_lines(toy))


def figure4_accuracy(fig4: dict) -> str:
    import figure4

    return figure4.accuracy_markdown(fig4)


def figure4_time(fig4: dict) -> str:
    import figure4

    return figure4.time_sentence(fig4)


# Two cells of the Figure 4 table differ when their means are further apart than this many points (5 of the
# laptop study's 360 test images) and than their two standard deviations over seeds added together.
FIGURE4_FLOOR = 1.5


def _cells(fig4: dict, factor: str) -> dict[float, tuple[float, float]]:
    """{rho: (mean, std)} over the seeds, as the table shows them (rounded to the table's digits)."""
    import figure4

    return {rho: (round(mean, 2), round(std, 2))
            for rho, mean, std, _ in figure4.aggregate(fig4["runs"], fig4["config"]["metric"])[factor]}


def _differ(a: tuple[float, float], b: tuple[float, float]) -> bool:
    return abs(a[0] - b[0]) > max(FIGURE4_FLOOR, a[1] + b[1])


def _p_inf_against_p_2(fig4: dict):
    """Each one's best (rho, mean, std), and the smallest rho where p = inf breaks (its mean below half its
    best; None where it does not)."""
    pinf, p2 = _cells(fig4, "elem-pinf"), _cells(fig4, "elem-p2")

    def best(cells):
        rho = max(cells, key=lambda r: (cells[r][0], -r))  # ties: the smaller rho
        return rho, *cells[rho]

    best_inf = best(pinf)
    broken = [rho for rho in sorted(pinf) if pinf[rho][0] < best_inf[1] / 2]
    return best_inf, best(p2), broken[0] if broken else None


def _p_verdict(fig4: dict) -> str:
    """'better', 'worse' or 'same': p = 2's best accuracy against p = inf's, by :func:`_differ`."""
    (_, mi, si), (_, m2, s2), _ = _p_inf_against_p_2(fig4)
    return "same" if not _differ((m2, s2), (mi, si)) else "better" if m2 > mi else "worse"


def figure4_findings(fig4: dict) -> str:
    """What the laptop study shows for each of Figure 4's three claims, with its numbers (docs/vision-figure4.md)."""
    pinf, p2, bn, filt = (_cells(fig4, f) for f in ("elem-pinf", "elem-p2", "elem-p2-bn", "filter-p2"))
    rhos = sorted(p2)
    (ri, mi, si), (r2, m2, s2), b = _p_inf_against_p_2(fig4)
    if b is not None:
        first = (f"- p = inf tolerates far smaller rho than p = 2: with p = inf every weight moves by rho (|w| + eta), "
                 f"so rho = {b:g} already wrecks training ({pinf[b][0]:.0f}%), while p = 2 spreads a norm-rho step "
                 f"over all the weights and keeps {p2[b][0]:.1f}% there.")
    else:
        first = f"- p = inf does not break down within the grid (rho up to {rhos[-1]:g})."
    bests = (f"p = 2's best is {m2:.2f} ± {s2:.2f} (rho = {r2:g}), p = inf's {mi:.2f} ± {si:.2f} (rho = {ri:g})")
    first += {"better": f" As in the paper, p = 2 gives the better accuracy: {bests}.",
              "worse": f" Unlike the paper, p = inf gives the better accuracy here: {bests}.",
              "same": f" The paper's finding that p = 2 gives the better accuracy does not show at this scale: {bests}, "
                      "within the seeds' spread." + (" What does show is p = inf's much narrower range." if b is not None else "")
              }[_p_verdict(fig4)]
    apart = [r for r in rhos if _differ(filt[r], p2[r])]
    upto = max((r for r in rhos if all(x not in apart for x in rhos if x <= r)), default=None)
    listed = ", ".join(f"{filt[r][0]:.1f} against {p2[r][0]:.1f} at rho = {r:g}" for r in apart)
    filter_wise = ("filter-wise ([T_w](glossary.md#t_w) = the filter's norm, larger than |w_i| for most entries) "
                   f"against element-wise: {listed}.")
    if not apart:
        second = "- Element-wise and filter-wise do not differ over the whole grid, as in the paper."
    elif upto is not None:
        second = (f"- Element-wise and filter-wise do not differ up to rho = {upto:g} (as in the paper); beyond, "
                  f"{filter_wise}")
    else:
        second = f"- Element-wise and filter-wise differ from rho = {rhos[0]:g} on: {filter_wise}"
    bn_apart = [r for r in rhos if _differ(bn[r], p2[r])]
    third = ("- Bias normalization makes no difference at any rho, as in the paper." if not bn_apart else
             "- Bias normalization differs " + ", ".join(
                 f"at rho = {r:g} ({bn[r][0]:.1f} against {p2[r][0]:.1f} without)" for r in bn_apart)
             + ("; the paper saw no improvement." if any(bn[r][0] > p2[r][0] for r in bn_apart) else "."))
    rule = (f"(Two cells differ when their means are more than {FIGURE4_FLOOR:g} points apart and more than their "
            "standard deviations added together.)")
    return "\n".join([first, second, third, "", rule])


def figure4_verdict(fig4: dict) -> str:
    """Does p = 2 beat p = inf (Figure 4's first claim)? Where p = inf breaks: its mean below half its best."""
    (_, best_inf, _), (_, best_2, _), b = _p_inf_against_p_2(fig4)
    breaks = f"p = inf breaks at rho >= {b:g} as in the paper" if b is not None else "p = inf does not break"
    verdict = _p_verdict(fig4)
    if verdict == "better":
        return f"reproduced: {breaks}, and p = 2's best accuracy ({best_2:.1f}%) is above p = inf's ({best_inf:.1f}%)"
    what = "within the seeds' spread of" if verdict == "same" else "above"
    return (f"partly: {breaks}, but its best accuracy ({best_inf:.1f}%) is {what} p = 2's ({best_2:.1f}%) at "
            "this scale")


def toy_verdict(toy: dict) -> str:
    """Figure 3: from the second start SAM does not move and ASAM reaches the valley."""
    w0 = tuple(toy["valley"][-1]["w0"])  # the paper's second start, where SAM's ascent lands on the dead ReLU
    by_method = {r["method"]: r for r in toy["runs"] if tuple(r["w0"]) == w0}
    sam, asam = by_method["sam"], by_method["asam"]
    stuck = tuple(sam["final_w"]) == w0
    verdict = "reproduced" if stuck and asam["final_loss"] < 1e-5 else "not reproduced"
    moved = "does not move" if stuck else f"moves to ({sam['final_w'][0]:.3f}, {sam['final_w'][1]:.3f})"
    return f"{verdict}: from ({w0[0]:g}, {w0[1]:g}) SAM {moved}, ASAM reaches L = {asam['final_loss']:.0e}".replace("e-0", "e-")


def correlation_verdict(corr: dict) -> str:
    st = corr["stats"]
    better = all(st[f"asharp_{p}"][k] > st[f"sharp_{p}"][k] for p in ("p2", "pinf") for k in ("tau", "Psi"))
    return ("reproduced: adaptive sharpness has the higher Kendall's tau and Psi for both p" if better else
            "not reproduced: adaptive sharpness does not have the higher Kendall's tau and Psi for both p")


def _unused_runs(m30k: dict) -> str:
    """The runs no comparison uses: started early (``--jobs``) on a seed beyond the grid's, at a rho that was
    then not chosen."""
    chosen = {m: (m30k.get("plan", {}).get(m) or {}).get("chosen") for m in m30k["settings"]["grids"]}
    unused = [r["key"] for r in m30k.get("runs", []) if chosen.get(r["method"]) is not None
              and r["seed"] not in m30k["settings"]["grid_seeds"] and r["rho"] != chosen[r["method"]]]
    return f"; {' and '.join(unused)} started early at a rho that was then not chosen, in no comparison" if unused else ""


def multi30k_status(m30k: dict, unused: bool = True) -> str:
    """Finished runs out of the planned ones (Adam on every seed; per method its rho grid on the grid seeds,
    then the chosen rho on the other seeds; a widened grid adds runs, which the count then includes)."""
    st, status = m30k["settings"], m30k["status"]
    if status["complete"]:
        return f"Multi30k study complete ({status['finished_runs']} runs{_unused_runs(m30k) if unused else ''})"
    seeds, grid_seeds = st["seeds"], st["grid_seeds"]
    widened = sum(len((m30k.get("plan", {}).get(m) or {}).get("widened", [])) for m in st["grids"])
    planned = len(seeds) + sum(len(g) * len(grid_seeds) + len(seeds) - len(grid_seeds) for g in st["grids"].values())
    return f"Multi30k study running: {status['finished_runs']} of {planned + widened * len(grid_seeds)} runs finished"


# Table 5 of the paper: test BLEU over 3 runs, each with a std under 0.01.
PAPER_IWSLT_TEST = {"adam": 34.86, "sam": 34.78, "asam": 35.02}


def multi30k_result(m30k: dict) -> str:
    """ASAM - Adam on Multi30k (test sacreBLEU, best checkpoint, paired over seeds) beside the paper's IWSLT'14
    gain, and how many paired seeds would resolve a gain of the paper's size at 3 SE with the measured spread."""
    p = (m30k.get("summary") or {}).get("power")
    if not p or p.get("se") is None:
        return ""
    paper = round(PAPER_IWSLT_TEST["asam"] - PAPER_IWSLT_TEST["adam"], 2)
    need = math.ceil((3 * p["paired_std"] / paper) ** 2)
    so_far = "" if m30k["status"]["complete"] else " so far"
    return (f"ASAM - Adam on Multi30k{so_far}: {p['gain']:+.2f} ± {p['se']:.2f} SE test sacreBLEU over "
            f"{len(p['seeds'])} paired seeds ({p['ratio']:+.1f} SE, "
            + ("powered" if p["powered"] else "not powered") + f"); the paper's IWSLT'14 gain, {paper:+.2f}, "
            f"would be {paper / p['se']:.1f} SE here: resolving it at 3 SE takes about {need} paired seeds")


def multi30k_page(m30k: dict) -> str:
    """docs/multi30k.md's results: the count, the table (so far), what it means beside the paper, then every
    finished run (all as the study wrote them)."""
    result = multi30k_result(m30k)
    when = "" if m30k["status"]["complete"] else " (as of the committed JSON)"
    return "\n\n".join([f"{multi30k_status(m30k)}{when}. Tokenized BLEU and sacreBLEU agree closely on these "
                         "captions:", m30k["markdown"]]
                        + ([result + "."] if result else [])
                        + ["Every finished run, in the order it finished:", m30k["status_markdown"]])


def multi30k_readme(m30k: dict) -> str:
    """The README's Multi30k block: the count, the Table 5 layout and what it means beside the paper."""
    result = multi30k_result(m30k)
    return "\n\n".join([f"{multi30k_status(m30k)}:", m30k["table5"]]
                         + ([result + "."] if result else []))


def _load_average(xs: list[float]) -> str:
    return " / ".join(f"{x:.1f}" for x in xs)


def _cores(n: int) -> str:
    return f"{n} core{'s' if n > 1 else ''}"


def _last_line(line: str) -> str:
    """A log line without its ``HH:MM:SS | LEVEL | `` prefix."""
    return re.sub(r"^\S+ \| [A-Z]+ \| ", "", line)


def demo_time(demo: dict) -> str:
    """How long ``make demo`` took, where, under what load (the README and docs/iwslt.md)."""
    if demo["reused"]:
        raise ValueError("docs/demo-results.json comes from a demo that reused earlier steps "
                         f"({', '.join(demo['reused'])}): its time is not the demo's; rerun into an empty --out")
    threads = demo["omp_num_threads"]
    how = (f"one thread per process (`OMP_NUM_THREADS={threads}`)" if threads == "1"
           else "torch's default threads per process" if threads is None else f"`OMP_NUM_THREADS={threads}`")
    return (f"{demo['wall_s'] / 60:.1f} minutes of wall time and {demo['cpu_s']:.0f} s of CPU time on "
            f"{_cores(demo['cores_allowed'])} of an {demo['machine']['cpu']} with {how}, load average "
            f"(1 / 5 / 15 min) {_load_average(demo['load_average_before'])} before and {_load_average(demo['load_average_after'])} "
            f"after (`{demo['command']}`, {demo['date']})")


def quickstart_time(qs: dict) -> str:
    """How long the README's CIFAR-10 quick start took as printed, and what it ended with."""
    where = f"{_cores(qs['cores_allowed'])} of an {qs['machine']['cpu']}"
    last = _last_line(qs["steps"][-1]["output_tail"][-1])
    return (f"The two commands take {qs['wall_s']:.0f} s of wall time and {qs['cpu_s']:.0f} s of CPU time on {where} "
            f"(`{qs['command']}`, {qs['date']}); the last line: `{last}`.")


def demo_page(demo: dict) -> str:
    """docs/iwslt.md's demo output: the time and the tables, as the demo printed them."""
    return f"The demo's last recorded run took {demo_time(demo)}. Its tables:\n\n{demo['markdown'].rstrip()}"


def label_noise_result(study: dict) -> str:
    pw = study["summary"]["mnist-mlp 40% noise"]["power"]
    powered = ">= 3 SE" if pw["powered"] else f"{pw['ratio']:.1f} SE, under the 3 SE the study asks for"
    return f"on the MNIST MLP with 40% noise ASAM gains {pw['gain']:.1f} points over SGD ({powered})"


def reproduced_table(d: dict) -> str:
    """The README's "What has been reproduced": the paper's claims, where each was checked, what it found."""
    rows = [
        ("Table 1, Figure 2: adaptive sharpness correlates with the generalization gap better than sharpness",
         "CPU, small: 81 MLPs on scikit-learn's digits ([sharpness](docs/sharpness.md))",
         correlation_verdict(d["correlation"]) + " ([the table](#sharpness-measures))"),
        ("Figure 3: the toy example, SAM stuck where ASAM reaches the valley",
         "CPU, exact ([sharpness](docs/sharpness.md#the-toy-example-section-51-figure-3))", toy_verdict(d["toy"])),
        ("Figure 4: p = 2 beats p = inf; element-wise ~ filter-wise; bias normalization does not help",
         f"CPU, small: ResNet-8 on digits, {len(d['figure4']['config']['seeds'])} seeds "
         "([figure 4](docs/vision-figure4.md))", figure4_verdict(d["figure4"])),
        ("Tables 2, 3: CIFAR-10/100, SGD < SAM < ASAM", "not yet (GPU): `bash scripts/reproduce-cifar.sh`",
         "WRN-28-10: about 3 GPU-hours per run, 15 runs per data set"),
        ("Table 4: ImageNet, ResNet-50", "not yet (GPU): `torchrun --nproc_per_node 4 -m fairseq_asam.vision "
         "--dataset imagenet --data-dir /data/imagenet --minimizer asam --m-sharpness 128 --amp bf16` "
         "([vision](docs/vision.md#several-gpus-resuming))", "about 30 GPU-hours per run, 9 runs"),
        ("Table 5: IWSLT'14 DE-EN, ASAM 35.02 vs Adam 34.86 test BLEU",
         "not yet (GPU): `asam-iwslt-train` ([IWSLT'14](docs/iwslt.md)); CPU: the pipeline on a generated corpus "
         "(`make demo`) and real text at small scale ([Multi30k](docs/multi30k.md))",
         f"about 1.5 GPU-hours per ASAM run, 9 runs; {multi30k_status(d['multi30k'], unused=False)}"
         + (f"; {multi30k_result(d['multi30k'])}" if multi30k_result(d["multi30k"]) else "")),
        ("Table 6: CIFAR-10 label noise, ResNet-32", "not yet (GPU): `LABEL_NOISE=0.4 MODELS=resnet32 bash "
         "scripts/reproduce-cifar.sh`; CPU, small: MNIST with 40% label noise ([efficiency](docs/efficiency.md))",
         f"under 1 GPU-hour per run; {label_noise_result(d['study'])}"),
    ]
    return "\n".join(["| paper | checked | result here |", "|---|---|---|"]
                     + [f"| {paper} | {where} | {found} |" for paper, where, found in rows])


# name: (render from the loaded JSON documents, the Markdown files that show it)
TABLES = {
    "cost": (lambda d: cost_table(d["bench"]), [ROOT / "README.md"]),
    "cheaper-updates": (lambda d: decision_table(d["study"], d["bench"]),
                        [ROOT / "README.md", ROOT / "docs" / "efficiency.md"]),
    "policy-cost": (lambda d: efficient_tables(d["bench"]), [ROOT / "docs" / "efficiency.md"]),
    "bench": (lambda d: bench_tables(d["bench"]), [ROOT / "docs" / "performance.md"]),
    "correlation": (lambda d: correlation_table(d["correlation"]), [ROOT / "docs" / "sharpness.md"]),
    "correlation-summary": (lambda d: correlation_summary(d["correlation"]), [ROOT / "README.md"]),
    "reproduced": (reproduced_table, [ROOT / "README.md"]),
    "toy-output": (lambda d: toy_output(d["toy"]), [ROOT / "docs" / "sharpness.md"]),
    "figure4": (lambda d: figure4_accuracy(d["figure4"]), [ROOT / "docs" / "vision-figure4.md"]),
    "figure4-time": (lambda d: figure4_time(d["figure4"]), [ROOT / "docs" / "vision-figure4.md"]),
    "demo-time": (lambda d: f"Measured: {demo_time(d['demo'])}.", [ROOT / "README.md"]),
    "quickstart-time": (lambda d: quickstart_time(d["quickstart"]), [ROOT / "README.md"]),
    "demo": (lambda d: demo_page(d["demo"]), [ROOT / "docs" / "iwslt.md"]),
    "multi30k": (lambda d: multi30k_page(d["multi30k"]), [ROOT / "docs" / "multi30k.md"]),
    "multi30k-summary": (lambda d: multi30k_readme(d["multi30k"]), [ROOT / "README.md"]),
    "figure4-findings": (lambda d: figure4_findings(d["figure4"]), [ROOT / "docs" / "vision-figure4.md"]),
}


def markers(name: str) -> tuple[str, str]:
    return (f"<!-- {name} table: generated by scripts/readme_numbers.py from docs/*.json; do not edit -->",
            f"<!-- end of {name} table -->")


SOURCES = {"bench": BENCH, "study": STUDY, "correlation": CORRELATION, "toy": TOY, "figure4": FIGURE4,
           "multi30k": MULTI30K, "demo": DEMO, "quickstart": QUICKSTART}


def render(**docs: dict) -> dict[str, str]:
    """Every table; a document passed by name (``bench=...``, ``toy=...``) replaces the committed file's."""
    unknown = set(docs) - set(SOURCES)
    if unknown:
        raise TypeError(f"render() got unknown documents {sorted(unknown)}; expected some of {sorted(SOURCES)}")
    d = {name: docs[name] if name in docs else json.loads(path.read_text()) for name, path in SOURCES.items()}
    return {name: fn(d) for name, (fn, _) in TABLES.items()}


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
    ap.add_argument("--write", action="store_true", help="rewrite the tables in README.md and docs/*.md")
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
