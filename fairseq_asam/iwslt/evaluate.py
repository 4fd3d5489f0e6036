"""BLEU of a trained translation run (IWSLT'14, Multi30k, ...) on valid and test (paper Table 5).

``fairseq-generate`` (beam 5, BPE removed) translates each subset; then three numbers per subset:

- ``bleu_tokenized``: the number the paper and most IWSLT'14 papers report, i.e. fairseq-generate's
  own ``BLEU4`` line: corpus BLEU on the Moses-tokenized, lowercased text after BPE removal;
- ``bleu_tokenized_sacrebleu``: the same text scored by sacreBLEU with ``tokenize="none"``, a second
  code path that must agree with the first (it does, to the printed two decimals, unless an n-gram
  order has no match at all, where sacreBLEU smooths);
- ``bleu_detok``: sacreBLEU (default 13a tokenization) on the hypotheses detokenized with sacremoses'
  Moses detokenizer, against the raw references where the corpus keeps them (``asam-mt-prepare``
  writes ``<data>/raw/``: Multi30k and other text corpora, cased) and otherwise against the tokenized
  references detokenized the same way (IWSLT'14, lowercased as its recipe prepares it). Reported with
  its signature; ``detok_references`` says which references were used.

Results go to ``<run>/eval.json`` (written atomically) next to the generate outputs::

    bash scripts/evaluate-iwslt14.sh runs/iwslt14/asam-seed1
    asam-mt-evaluate runs/multi30k/asam-seed1 --data data-bin/multi30k.tokenized.de-en
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

__all__ = ["evaluate_run", "generate", "generate_in_process", "parse_generate", "score", "scores"]

_BLEU_LINE = re.compile(r"^Generate (\S+) with beam=(\d+): BLEU4 = ([0-9.]+),")
_PROGRESS = re.compile(r"(\d+) / (\d+) wps=")  # fairseq's SimpleProgressBar: "<prefix>:  i / n wps=..."
_JOB_LINE = re.compile(r"^\[generate\] job (\d+)/(\d+): (\S+)$")
USER_DIR = str(Path(__file__).resolve().parent.parent)


def parse_generate(text: str) -> dict:
    """Hypotheses and references by sentence id, and fairseq's BLEU4, from fairseq-generate's stdout."""
    hyps, refs = {}, {}
    bleu = None
    for line in text.splitlines():
        if line.startswith("H-"):
            sid, _score, hyp = (line.split("\t") + ["", ""])[:3]
            hyps[int(sid[2:])] = hyp
        elif line.startswith("T-"):
            sid, ref = (line.split("\t") + [""])[:2]
            refs[int(sid[2:])] = ref
        else:
            m = _BLEU_LINE.match(line)
            if m:
                bleu = float(m.group(3))
    if set(hyps) != set(refs):
        raise ValueError(f"fairseq-generate output has {len(hyps)} hypotheses but {len(refs)} references")
    ids = sorted(hyps)
    return {"hyps": [hyps[i] for i in ids], "refs": [refs[i] for i in ids], "fairseq_bleu4": bleu}


def hypothesis_ids(text: str) -> list[int]:
    """The sentence ids of fairseq-generate's hypotheses, in parse_generate's order (the line numbers of the
    binarized subset: fairseq-preprocess keeps the order of the text)."""
    return sorted(int(line.split("\t", 1)[0][2:]) for line in text.splitlines() if line.startswith("H-"))


def score(hyps: list[str], refs: list[str], raw_refs: list[str] | None = None, lang: str = "en") -> dict:
    """Tokenized BLEU (sacreBLEU, tokenize none) and detokenized sacreBLEU with their signatures.

    ``raw_refs``: the untokenized references (``asam-mt-prepare`` keeps them in ``<data>/raw/``); the
    detokenized hypotheses are scored against them, as sacreBLEU is meant to be used. Without them, the
    tokenized references are detokenized (the IWSLT'14 recipe keeps no raw text).
    """
    import sacrebleu
    from sacremoses import MosesDetokenizer

    tok = sacrebleu.metrics.BLEU(tokenize="none", force=True)
    tok_score = tok.corpus_score(hyps, [refs])
    md = MosesDetokenizer(lang=lang)
    dh = [md.detokenize(h.split()) for h in hyps]
    if raw_refs is not None and len(raw_refs) != len(refs):
        raise ValueError(f"{len(raw_refs)} raw references for {len(refs)} sentences")
    dr = list(raw_refs) if raw_refs is not None else [md.detokenize(r.split()) for r in refs]
    detok = sacrebleu.metrics.BLEU()
    detok_score = detok.corpus_score(dh, [dr])
    return {
        "bleu_tokenized_sacrebleu": round(tok_score.score, 2),
        "bleu_tokenized_sacrebleu_signature": str(tok.get_signature()),
        "bleu_detok": round(detok_score.score, 2),
        "bleu_detok_signature": str(detok.get_signature()),
        "sentences": len(hyps),
        "detok_references": "raw" if raw_refs is not None else "detokenized",
    }


def data_info(data: Path) -> dict:
    """prep-info.json of a prepared corpus (languages, BPE flavour, raw references); IWSLT'14's defaults
    where a file or a key is missing."""
    info_file = Path(data) / "prep-info.json"
    info = json.loads(info_file.read_text()) if info_file.exists() else {}
    return {"source_lang": info.get("source_lang", "de"), "target_lang": info.get("target_lang", "en"),
            "remove_bpe": info.get("remove_bpe", "subword_nmt"), "raw_references": info.get("raw_references", {})}


def raw_references(data: Path, subset: str, ids: list[int] | None = None) -> list[str] | None:
    """The untokenized references of ``subset`` in sentence-id order (None where the corpus keeps none)."""
    rel = data_info(data)["raw_references"].get(subset)
    if not rel:
        return None
    with open(Path(data) / rel, encoding="utf-8", newline="\n") as fh:
        lines = [line.rstrip("\n") for line in fh]
    return lines if ids is None else [lines[i] for i in ids]


def generation_args(data: Path, checkpoint: Path, subset: str, *, beam: int = 5, batch_size: int = 128,
                    extra=()) -> list[str]:
    """fairseq-generate's arguments for one (checkpoint, subset): beam search, BPE removed as the data was
    prepared, one progress line per batch."""
    info = data_info(data)
    return [str(data), "--user-dir", USER_DIR, "--task", "translation", "--source-lang", info["source_lang"],
            "--target-lang", info["target_lang"], "--path", str(checkpoint), "--gen-subset", subset,
            "--beam", str(beam), "--batch-size", str(batch_size), "--remove-bpe", info["remove_bpe"],
            # fairseq-fixed 0.12.3.1's compiled batch_by_size drops the last (n mod 8) sentences with the
            # default multiple of 8: the test set would silently lose up to 7 sentences.
            "--required-batch-size-multiple", "1",
            # One progress line per batch on stderr (fairseq's form when stderr is not a terminal), turned
            # into a progress bar by generate(); a --log-interval in extra comes later and wins.
            "--log-interval", "1", *extra]


def generate_in_process(data: Path, jobs, *, beam: int = 5, batch_size: int = 128, extra=()):
    """fairseq-generate for each (checkpoint, subset) of ``jobs`` in this process, one after the other
    (fairseq is imported once); yields each job's output, the text fairseq-generate prints. Before each job,
    one line ``[generate] job i/n: <subset>`` on stderr."""
    import contextlib
    import io

    from fairseq import options
    from fairseq_cli import generate as fairseq_generate

    # fairseq-generate's main configures logging onto the stream it prints hypotheses to (here the buffer)
    # unless the root logger has a handler already: its messages and progress lines go to stderr instead.
    if not logging.getLogger().handlers:
        logging.basicConfig(format="%(asctime)s | %(levelname)s | %(name)s | %(message)s",
                            datefmt="%Y-%m-%d %H:%M:%S", level=os.environ.get("LOGLEVEL", "INFO").upper(),
                            stream=sys.stderr)
    jobs = list(jobs)
    for i, (ckpt, subset) in enumerate(jobs):
        print(f"[generate] job {i + 1}/{len(jobs)}: {subset}", file=sys.stderr, flush=True)
        args = options.parse_args_and_arch(options.get_generation_parser(),
                                           generation_args(data, ckpt, subset, beam=beam, batch_size=batch_size,
                                                           extra=extra))
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            fairseq_generate.main(args)
        yield buf.getvalue()


def _generate_child(spec_file: str) -> int:
    """The body of generate()'s child process: the jobs of the spec, each output written to its file."""
    s = json.loads(Path(spec_file).read_text())
    jobs = [(Path(c), sub) for c, sub in s["jobs"]]
    for text, out in zip(generate_in_process(Path(s["data"]), jobs, beam=s["beam"], batch_size=s["batch_size"],
                                             extra=s["extra"]), s["outputs"]):
        Path(out).write_text(text, encoding="utf-8")
    return 0


def generate(data: Path, jobs, *, beam: int = 5, batch_size: int = 128, extra=(), env: dict | None = None,
             progress: bool = True) -> list[str]:
    """fairseq-generate for each (checkpoint, subset) of ``jobs``, all in one child process (fairseq is
    imported once, not once per job); each job's output text, in order. With ``progress``, fairseq's
    per-batch lines move a progress bar per job on stderr; its other messages are shown only if it fails."""
    jobs = [(Path(c), s) for c, s in jobs]
    if not jobs:
        return []
    with tempfile.TemporaryDirectory(prefix="asam-generate-") as tmp:
        outputs = [str(Path(tmp) / f"job{i}.txt") for i in range(len(jobs))]
        spec = Path(tmp) / "spec.json"
        spec.write_text(json.dumps({"data": str(data), "jobs": [[str(c), s] for c, s in jobs], "beam": beam,
                                    "batch_size": batch_size, "extra": list(extra), "outputs": outputs}))
        cmd = [sys.executable, "-c", "import sys; from fairseq_asam.iwslt.evaluate import _generate_child; "
               "sys.exit(_generate_child(sys.argv[1]))", str(spec)]
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
        from tqdm import tqdm

        tail: list[str] = []
        current, bar = jobs[0][1], None
        try:
            for line in proc.stderr:
                job = _JOB_LINE.match(line)
                m = _PROGRESS.search(line)
                if job:
                    current = job.group(3)
                    if bar is not None:
                        bar.close()
                    bar = tqdm(desc=f"  fairseq-generate {current}", unit="batch", leave=False, file=sys.stderr,
                               mininterval=0.5, dynamic_ncols=True, disable=not progress)
                elif m and bar is not None:
                    bar.total = int(m.group(2))
                    bar.update(int(m.group(1)) - bar.n)
                else:
                    tail.append(line)
                    del tail[:-200]
        except BaseException:
            proc.kill()
            raise
        finally:
            if bar is not None:
                bar.close()
            rc = proc.wait()
        if rc != 0:
            raise RuntimeError(f"fairseq-generate failed on {current} (exit {rc}):\n{''.join(tail)[-3000:]}")
        return [Path(o).read_text(encoding="utf-8") for o in outputs]


def scores(text: str, data: Path, subset: str) -> dict:
    """The three BLEU numbers of one fairseq-generate output (see the module's docstring)."""
    parsed = parse_generate(text)
    if parsed["fairseq_bleu4"] is None:
        raise RuntimeError(f"no 'Generate {subset} with beam=...: BLEU4 = ...' line in fairseq-generate's output")
    raw = raw_references(data, subset, hypothesis_ids(text))
    return {"bleu_tokenized": parsed["fairseq_bleu4"],
            **score(parsed["hyps"], parsed["refs"], raw, data_info(data)["target_lang"])}


def evaluate_run(run_dir: Path, *, data: Path | None = None, checkpoint: str = "checkpoint_best.pt",
                 subsets=("valid", "test"), beam: int = 5, batch_size: int = 128, extra: list[str] = (),
                 log=print) -> dict:
    run_dir = Path(run_dir)
    meta_file = run_dir / "run.json"
    meta = json.loads(meta_file.read_text()) if meta_file.exists() else {}
    data = Path(data or meta.get("data") or "")
    if not str(data) or not data.is_dir():
        raise ValueError(f"--data: no binarized data directory (got {str(data)!r}); pass --data or use a run made by "
                         "train-iwslt14.sh (its run.json names the data)")
    ckpt = Path(checkpoint) if os.sep in checkpoint else run_dir / "checkpoints" / checkpoint
    if not ckpt.is_file():
        raise ValueError(f"--checkpoint {ckpt}: no such file (train first: bash scripts/train-iwslt14.sh ...)")
    if beam < 1:
        raise ValueError(f"--beam must be >= 1, got {beam}")
    remove_bpe = data_info(data)["remove_bpe"]
    result = {"run_dir": str(run_dir), "method": meta.get("method"), "seed": meta.get("seed"), "rho": meta.get("rho"),
              "checkpoint": str(ckpt), "data": str(data), "beam": beam, "remove_bpe": remove_bpe}
    log(f"[evaluate-iwslt14] {run_dir.name}: fairseq-generate on {', '.join(subsets)} (beam {beam})")
    outputs = generate(data, [(ckpt, subset) for subset in subsets], beam=beam, batch_size=batch_size, extra=extra)
    for subset, out in zip(subsets, outputs):
        gen_file = run_dir / f"generate-{subset}.txt"
        tmp = gen_file.with_name(gen_file.name + f".tmp-{os.getpid()}")
        tmp.write_text(out, encoding="utf-8")
        os.replace(tmp, gen_file)
        res = {**scores(out, data, subset), "generate_output": str(gen_file)}
        result[subset] = res
        log(f"[evaluate-iwslt14] {run_dir.name} {subset}: tokenized BLEU {res['bleu_tokenized']:.2f} "
            f"(sacreBLEU tok=none {res['bleu_tokenized_sacrebleu']:.2f}), detokenized sacreBLEU {res['bleu_detok']:.2f} "
            f"({res['bleu_detok_signature']})")
    out_file = run_dir / "eval.json"
    tmp = out_file.with_name(f"eval.json.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(result, indent=1) + "\n")
    os.replace(tmp, out_file)
    log(f"[evaluate-iwslt14] wrote {out_file}")
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="asam-iwslt-evaluate", allow_abbrev=False,
                                 description="fairseq-generate (beam 5, remove BPE) on valid and test, then "
                                 "tokenized BLEU and detokenized sacreBLEU, written to RUN_DIR/eval.json. "
                                 "Unknown arguments go to fairseq-generate.")
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--data", type=Path, default=None, help="binarized data (default: the one in RUN_DIR/run.json)")
    ap.add_argument("--checkpoint", default=os.environ.get("CHECKPOINT", "checkpoint_best.pt"),
                    help="file name in RUN_DIR/checkpoints or a path (env CHECKPOINT; default: %(default)s)")
    ap.add_argument("--subsets", default="valid,test", help="comma-separated (default: %(default)s)")
    ap.add_argument("--beam", type=int, default=5, help="beam size (default: %(default)s, as the paper)")
    ap.add_argument("--batch-size", type=int, default=128, help="sentences per batch (default: %(default)s)")
    args, extra = ap.parse_known_args(argv)
    if not args.run_dir.is_dir():
        ap.error(f"RUN_DIR {args.run_dir}: no such directory")
    subsets = [s for s in args.subsets.split(",") if s]
    bad = [s for s in subsets if s not in ("train", "valid", "test")]
    if bad or not subsets:
        ap.error(f"--subsets must be a comma-separated list of valid, test, train; got {args.subsets!r}")
    if args.beam < 1:
        ap.error(f"--beam must be >= 1, got {args.beam}")
    try:
        evaluate_run(args.run_dir, data=args.data, checkpoint=args.checkpoint, subsets=subsets, beam=args.beam,
                     batch_size=args.batch_size, extra=extra)
    except (ValueError, RuntimeError) as e:
        print(f"asam-iwslt-evaluate: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
