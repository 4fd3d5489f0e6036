"""``make demo``: the whole IWSLT'14 pipeline of paper Section 5.3 on the embedded synthetic corpus, on CPU.

No download, no GPU. The synthetic German-English corpus in ``data-prep/demo-de-en`` (made by
``studies/demo_corpus.py`` from a small grammar and lexicon; not natural text) is packed into an archive with
the layout of the real ``de-en.tgz`` and goes through the same code as the real data:

1. ``prepare.py`` (the prepare-iwslt14 recipe: tokenize, clean, lowercase, split, BPE, fairseq-preprocess);
2. ``train.py`` for Adam, Adam+SAM (rho 0.1) and Adam+ASAM (rho 0.2), i.e. the paper's settings, and
   the cheap mode, ASAM with one pass per update along Adam's momentum (rho 0.2), with a small
   Transformer and a short schedule (the overrides in ``DEMO_TRAIN_ARGS``) so it runs in minutes;
3. ``evaluate.py`` (fairseq-generate, beam 5; tokenized BLEU and detokenized sacreBLEU);
4. the adaptive sharpness (paper Eq. 4) of each evaluated checkpoint on a few training batches, by
   ``asam-sharpness`` (:func:`fairseq_asam.sharpness.measure_sharpness`) with the settings in
   ``DEMO_SHARPNESS``; the report goes to ``<run>/sharpness.json``;
5. ``summarize.py``: ``demo-out/table5.md``, ``table5.csv`` and ``curves.png``; the table, with each
   method's passes and milliseconds per update (from its training log) and the sharpness, is printed.

``demo-out/demo.json`` records the tables, the demo's wall and CPU time (its own and its processes'), the
load average before and after, which steps an earlier run had already done, and the commit, command,
machine and date; ``--json PATH`` writes a copy (``docs/demo-results.json`` is the one the docs show).

Everything lands in ``demo-out/``; a second ``make demo`` reuses finished steps and runs::

    make demo
    bash scripts/demo.sh --max-update 60    # quicker, lower BLEU
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

from fairseq_asam.iwslt import evaluate, prepare, summarize, train
from scripts.provenance import conditions, cpu_seconds, stamp, write_json
from studies.demo_corpus import DEMO_BPE_TOKENS, DEMO_DIR, DEMO_TRAIN_ARGS, pack_archive

__all__ = ["DEMO_SHARPNESS", "DEMO_TRAIN_ARGS", "measure_run_sharpness", "pack_archive", "run_demo"]

# Adaptive sharpness (Eq. 4) of each final model: ASAM's own radius and eta, on a fixed random sample of
# the training batches (fairseq's own order sorts by length), in the batch size the runs trained with.
# 5 ascent steps: on these models the value grows by about 10% from the first step to the tenth (0.018 to
# 0.020 on Adam's), and each step is a forward and backward pass over the 4 batches.
DEMO_SHARPNESS = ["--split", "train", "--rho", "0.2", "--eta", "0.01", "--p", "2", "--steps", "5", "--seed", "0",
                  "--max-batches", "4", "--batch-seed", "0", "--max-tokens", "1024"]


def _train(method: str, seed: int, data: Path, run_dir: Path, extra: list[str], log) -> None:
    """train.py's command in a subprocess, with fairseq's output condensed to one line per validation."""
    # cuda=False: the demo's recipe is the same on any machine (no --amp added where a GPU is seen).
    args = train.fairseq_train_args(method, seed, data=data, run_dir=run_dir, max_update=10**9, extra=extra, cuda=False)
    run_dir.mkdir(parents=True, exist_ok=True)
    meta = {"method": method, "seed": seed, "data": str(data), "rho": train.DEFAULT_RHO.get(method),
            "fairseq_train_args": args}
    tmp = run_dir / f"run.json.tmp-{os.getpid()}"
    tmp.write_text(json.dumps(meta, indent=1) + "\n")
    os.replace(tmp, run_dir / "run.json")
    cmd = [sys.executable, "-m", "fairseq_cli.train", *args]
    t0 = time.time()
    with open(run_dir / "stdout.log", "a", encoding="utf-8") as raw:
        # Unbuffered, so that progress lines arrive when fairseq logs them rather than in bursts.
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        for line in proc.stdout:
            raw.write(line)
            if "| valid |" in line:
                rec = json.loads(line.split("| valid |", 1)[1])
                bleu = f", BLEU {float(rec['valid_bleu']):.2f}" if "valid_bleu" in rec else ""
                log(f"  {method}: update {rec['valid_num_updates']:>4}  valid loss {float(rec['valid_loss']):.3f}{bleu}"
                    f"  [{time.time() - t0:.0f}s]")
            elif "| train_inner |" in line:
                rec = json.loads(line.split("| train_inner |", 1)[1])
                log(f"  {method}: update {rec['num_updates']:>4}  train loss {float(rec['loss']):.3f}"
                    f"  [{time.time() - t0:.0f}s]")
        rc = proc.wait()
    if rc != 0:
        raise RuntimeError(f"fairseq-train ({method}) failed with exit code {rc}; see {run_dir / 'stdout.log'}")


def measure_run_sharpness(run_dir: Path, data: Path, *, checkpoint: str = "checkpoint_best.pt",
                          settings: list[str] = DEMO_SHARPNESS) -> dict:
    """``asam-sharpness fairseq <run>/checkpoints/<checkpoint> --data DATA <settings>``, in this process;
    the report is written to ``<run>/sharpness.json`` as the command's ``--out`` writes it, and returned."""
    import torch

    from fairseq_asam import sharpness_cli

    run_dir = Path(run_dir)
    args = sharpness_cli.build_parser().parse_args(
        ["fairseq", str(run_dir / "checkpoints" / checkpoint), "--data", str(data), "--no-progress", *settings])
    # One thread: the model is tiny, and on 2 cores shared with other work two threads made each pass
    # up to 50 times slower (measured); it also makes the value independent of the machine's core count.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        report = sharpness_cli.run(args)
    finally:
        torch.set_num_threads(threads)
    sharpness_cli._write_json_atomic(str(run_dir / "sharpness.json"), report)  # what its --out writes
    return report


def run_demo(out: Path = Path("demo-out"), *, corpus: Path = DEMO_DIR, methods=train.METHODS, seeds=(1,),
             max_update: int = 400, validate_every: int = 50, bpe_tokens: int = DEMO_BPE_TOKENS,
             extra: list[str] = (), log=print, json_out: Path | None = None,
             command: str = "make demo") -> dict:
    """Run the demo; returns summarize.write_summary's result (markdown, rows, runs)."""
    if max_update < 1 or validate_every < 1:
        raise ValueError(f"--max-update and --validate-every must be >= 1, got {max_update} and {validate_every}")
    t_start, cpu_start, load_start = time.time(), cpu_seconds(), os.getloadavg()
    reused: list[str] = []
    out = Path(out)
    log(f"[demo] 1/5 corpus: synthetic German-English pairs from {corpus} (generated by a grammar, not IWSLT)")
    tgz = pack_archive(corpus, out / "de-en.tgz")
    log(f"[demo] 2/5 preparation: the prepare-iwslt14 recipe on {tgz}")
    data = out / "data-bin"
    prepare.prepare(tgz, dest=data, work=out / "prep", bpe_tokens=bpe_tokens, workers=1,
                    log=lambda m: log(f"  {m}"))
    sched = ["--max-update", str(max_update), "--validate-interval-updates", str(validate_every),
             "--save-interval-updates", str(validate_every)]
    runs_root = out / "runs"
    for seed in seeds:
        for method in methods:
            run_dir = runs_root / f"{method}-seed{seed}"
            rho = f" (rho {train.DEFAULT_RHO[method]})" if method in train.DEFAULT_RHO else ""
            log(f"[demo] 3/5 training {method}{rho}, seed {seed}, {max_update} updates -> {run_dir}")
            t0 = time.time()
            args = [*DEMO_TRAIN_ARGS, *sched, *extra]
            if train.finished_updates(run_dir) >= max_update:
                log(f"  {method}: already trained to {max_update} updates, reused")
                reused.append(f"train {run_dir.name}")
            else:
                _train(method, seed, data, run_dir, args, log)
                log(f"  {method}: trained in {time.time() - t0:.0f}s")
            ev, best = run_dir / "eval.json", run_dir / "checkpoints" / "checkpoint_best.pt"
            if ev.exists() and ev.stat().st_mtime >= best.stat().st_mtime:
                log(f"  {method}: already evaluated, reused {ev}")
                reused.append(f"evaluate {run_dir.name}")
            else:
                evaluate.evaluate_run(run_dir, data=data, log=lambda m: log(f"  {m}"))
            sh = run_dir / "sharpness.json"
            if sh.exists() and sh.stat().st_mtime >= best.stat().st_mtime:
                log(f"  {method}: adaptive sharpness already measured, reused {sh}")
                reused.append(f"sharpness {run_dir.name}")
            else:
                t0 = time.time()
                rep = measure_run_sharpness(run_dir, data)
                log(f"[demo] 4/5 {method}: adaptive sharpness (Eq. 4, rho {rep['rho']:g}) on {rep['num_batches']} "
                    f"training batches: {rep['value']:.4f} (loss {rep['loss']:.3f} -> {rep['max_loss']:.3f}) "
                    f"[{time.time() - t0:.0f}s]")
    log("[demo] 5/5 summary")
    res = summarize.write_summary([runs_root], out)
    log("")
    log(res["markdown"])
    wall, cpu = time.time() - t_start, cpu_seconds() - cpu_start
    record = {**stamp(command), "max_update": max_update, "validate_every": validate_every, "methods": list(methods),
              "seeds": list(seeds), "extra_fairseq_args": list(extra),
              **conditions(), "wall_s": round(wall, 1), "cpu_s": round(cpu, 1),
              "load_average_before": [round(x, 2) for x in load_start],
              "load_average_after": [round(x, 2) for x in os.getloadavg()],
              "reused": reused, "markdown": res["markdown"], "rows": res["rows"]}
    for path in [out / "demo.json", *([Path(json_out)] if json_out else [])]:
        write_json(record, str(path))
    log(f"[demo] wrote {out / 'table5.md'}, {out / 'table5.csv'}, {out / 'curves.png'}, {out / 'demo.json'} "
        f"in {wall / 60:.1f} min ({cpu:.0f} s of CPU time)")
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="The IWSLT'14 pipeline (prepare, train Adam/SAM/ASAM/ASAM one-pass, BLEU, "
                                 "sharpness, Table 5) "
                                 "on the embedded synthetic corpus. Unknown arguments go to fairseq-train.",
                                 allow_abbrev=False)
    ap.add_argument("--out", type=Path, default=Path("demo-out"), help="output folder (default: %(default)s)")
    ap.add_argument("--corpus", type=Path, default=DEMO_DIR, help="folder holding de-en/ (default: the embedded corpus)")
    ap.add_argument("--methods", default=",".join(train.METHODS), help="comma-separated (default: %(default)s)")
    ap.add_argument("--seeds", default="1", help="comma-separated seeds (default: %(default)s)")
    ap.add_argument("--max-update", type=int, default=int(os.environ.get("DEMO_MAX_UPDATE", 400)),
                    help="updates per run (env DEMO_MAX_UPDATE; default: %(default)s)")
    ap.add_argument("--validate-every", type=int, default=50, help="updates between validations (default: %(default)s)")
    ap.add_argument("--json", type=Path, default=None,
                    help="also write the demo's record (demo-out/demo.json) here, e.g. docs/demo-results.json")
    args, extra = ap.parse_known_args(argv)
    methods = [m for m in args.methods.split(",") if m]
    bad = [m for m in methods if m not in train.METHODS]
    if bad or not methods:
        ap.error(f"--methods must be a comma-separated subset of {','.join(train.METHODS)}; got {args.methods!r}")
    try:
        seeds = [int(s) for s in args.seeds.split(",") if s]
    except ValueError:
        ap.error(f"--seeds must be comma-separated integers, got {args.seeds!r}")
    if not seeds or any(s < 0 for s in seeds):
        ap.error(f"--seeds must be comma-separated integers >= 0, got {args.seeds!r}")
    if args.max_update < 1:
        ap.error(f"--max-update must be >= 1, got {args.max_update}")
    if args.validate_every < 1:
        ap.error(f"--validate-every must be >= 1, got {args.validate_every}")
    try:
        run_demo(args.out, corpus=args.corpus, methods=methods, seeds=seeds, max_update=args.max_update,
                 validate_every=args.validate_every, extra=extra, json_out=args.json,
                 command=shlex.join(["bash", "scripts/demo.sh", *(sys.argv[1:] if argv is None else argv)]))
    except (prepare.PrepareError, ValueError, RuntimeError) as e:
        print(f"demo: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
