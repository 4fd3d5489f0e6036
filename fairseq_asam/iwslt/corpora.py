"""Real parallel corpora through the project's translation recipe: IWSLT'14, Multi30k, or any text files.

``asam-mt-prepare --corpus iwslt14`` is ``asam-iwslt-prepare`` (:mod:`fairseq_asam.iwslt.prepare`,
unchanged). The other two corpora take the same tokenization and BPE choices as that recipe:

1. Moses tokenization as ``tokenizer.perl -l $lang`` (:func:`prepare.tokenize_lines`: escaping on, no
   aggressive hyphen splitting);
2. case kept by default (``--lowercase`` lowercases as the IWSLT'14 recipe does): the field reports
   Multi30k with cased, detokenized sacreBLEU, which needs cased output;
3. no cleaning by default (``--clean`` applies the recipe's ``clean-corpus-n.perl -ratio 1.5 1 175`` to
   the training pairs): Multi30k's splits are used whole in the literature;
4. a joint BPE learned on train.src + train.tgt (subword-nmt merges or a SentencePiece BPE model);
5. ``fairseq-preprocess`` with separate source and target dictionaries, as the recipe.

The untokenized valid and test references are copied to ``<dest>/raw/`` so that
``asam-mt-evaluate`` scores detokenized output against the raw text, as sacreBLEU expects.

Multi30k Task 1 DE-EN (Elliott et al., 2016): the six gzip files of ``multi30k/dataset``
(``data/task1/raw/``), SHA-256 checked, from a local folder (``--from-dir``) or downloaded (each file to a
temporary name, checked, then renamed: a bad download never looks finished). Splits: train (29,000
pairs), val -> valid (1,014), test_2016_flickr -> test (1,000). Examples::

    asam-mt-prepare --corpus multi30k --from-dir ../shared/data/multi30k --bpe sentencepiece --bpe-tokens 8000
    asam-mt-prepare --corpus text --train corpus/train --valid corpus/dev --test corpus/test --src de --tgt en

Every input is checked before anything is written (a missing file, a wrong checksum, sides with different
line counts, an empty split): the error is one line naming the file.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import shutil
import sys
import urllib.error
import urllib.request
from pathlib import Path

from . import prepare as P
from .prepare import PrepareError

__all__ = [
    "MULTI30K_SHA256",
    "MULTI30K_SPLITS",
    "MULTI30K_URL",
    "fetch_multi30k",
    "main",
    "prepare_parallel",
    "read_parallel",
]

MULTI30K_URL = "https://github.com/multi30k/dataset/raw/master/data/task1/raw/"
# The files of multi30k/dataset at commit a3d2e0d26b56f3846f66a952536ffed4e401d05a, data/task1/raw/.
MULTI30K_SHA256 = {
    "train.de.gz": "726e39b2fa9eb9ffb6dc763fb35a179f80fae06ffc5d28b6ace5faa883de28a6",
    "train.en.gz": "d79cfa999dd4c51d2cb42499b6796d5a882c3a8a961923c25a898c90f8bbd56f",
    "val.de.gz": "f0cba2f995189cf5770f29a8a9a537a3ad3f51657ad873405082ff6863a5e75a",
    "val.en.gz": "14f7d25ddd868909a9213e361768460edcacdd6ab9d1e77b92560dc10c10dc28",
    "test_2016_flickr.de.gz": "9204244e408ccb38d2a55cfcd344df15005fc42a07a6e55ca6c52b6ababb8cc8",
    "test_2016_flickr.en.gz": "611d361c6334bc7246101d48097c13cf5c4413c5befc793cc629934359d532d9",
}
MULTI30K_SPLITS = {"train": "train", "valid": "val", "test": "test_2016_flickr"}
SPLITS = ("train", "valid", "test")
MT_PREP_VERSION = 1


def _print(msg: str) -> None:
    print(f"[asam-mt-prepare] {msg}", flush=True)


# ------------------------------------------------------------------------------------------------
# Getting and checking the files
# ------------------------------------------------------------------------------------------------


def _download_one(url: str, dest: Path, sha256: str, timeout: float, log) -> None:
    tmp = P._tmp(dest)
    log(f"download: {url}")
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r, open(tmp, "wb") as fh:
            size = r.headers.get("Content-Length")
            for block in iter(lambda: r.read(1 << 16), b""):
                fh.write(block)
        got = tmp.stat().st_size
        if size and size.isdigit() and got != int(size):
            raise OSError(f"the connection closed after {got} of {size} bytes")
        digest = P._sha256(tmp)
        if digest != sha256:
            raise PrepareError(f"{url}: SHA-256 {digest} is not the expected {sha256}; the download was discarded")
        os.replace(tmp, dest)
    except (urllib.error.URLError, OSError, ValueError) as e:
        raise PrepareError(
            f"could not download {url} ({e}); this machine may be offline: get the six files of "
            f"{MULTI30K_URL} elsewhere and run again with --from-dir FOLDER"
        ) from None
    finally:
        tmp.unlink(missing_ok=True)


def fetch_multi30k(from_dir: Path | None, orig: Path, *, url: str = MULTI30K_URL,
                   sums: dict[str, str] = MULTI30K_SHA256, timeout: float = 60.0, log=_print) -> Path:
    """The folder holding the six checked files: ``from_dir`` (checked in place, nothing written) or ``orig``,
    where missing files are downloaded from ``url`` (temporary name, SHA-256 checked, renamed)."""
    if from_dir is not None:
        from_dir = Path(from_dir)
        for name, sha in sums.items():
            f = from_dir / name
            if not f.is_file():
                raise PrepareError(f"--from-dir {from_dir}: {name} is missing (the Multi30k raw files are {url}{name})")
            digest = P._sha256(f)
            if digest != sha:
                raise PrepareError(f"{f}: SHA-256 {digest} is not Multi30k's {sha}")
        return from_dir
    orig = Path(orig)
    for name, sha in sums.items():
        f = orig / name
        if f.is_file() and P._sha256(f) == sha:
            log(f"download: reusing {f}")
            continue
        orig.mkdir(parents=True, exist_ok=True)
        _download_one(url.rstrip("/") + "/" + name, f, sha, timeout, log)
    return orig


def _read_text(path: Path) -> list[str]:
    opener = gzip.open if path.name.endswith(".gz") else open
    try:
        with opener(path, "rt", encoding="utf-8", newline="\n") as fh:
            return [line.rstrip("\n").rstrip("\r") for line in fh]
    except (OSError, EOFError, UnicodeDecodeError) as e:
        raise PrepareError(f"{path}: not readable {'gzip ' if opener is gzip.open else ''}UTF-8 text ({e})") from None


def _find(prefix: str, lang: str) -> Path:
    for cand in (Path(f"{prefix}.{lang}"), Path(f"{prefix}.{lang}.gz")):
        if cand.is_file():
            return cand
    raise PrepareError(f"{prefix}.{lang}: no such file (nor {prefix}.{lang}.gz)")


def _checked_pair(split: str, fs: Path, ft: Path) -> tuple[list[str], list[str]]:
    s, t = _read_text(fs), _read_text(ft)
    if len(s) != len(t):
        raise PrepareError(f"{split}: {fs} has {len(s)} lines but {ft} has {len(t)}; the sides are not aligned")
    if not any(x.strip() for x in s) or not any(x.strip() for x in t):
        raise PrepareError(f"{split}: {fs} / {ft} hold no sentences (an empty split)")
    return s, t


def read_parallel(prefixes: dict[str, str], src: str, tgt: str) -> dict[str, tuple[list[str], list[str]]]:
    """{split: (source lines, target lines)} from ``<prefix>.<lang>`` or ``<prefix>.<lang>.gz``; refuses a
    missing file, sides with different line counts and an empty split (nothing is written here)."""
    return {split: _checked_pair(split, _find(prefix, src), _find(prefix, tgt)) for split, prefix in prefixes.items()}


# ------------------------------------------------------------------------------------------------
# The recipe
# ------------------------------------------------------------------------------------------------


def prepare_parallel(pairs: dict[str, tuple[list[str], list[str]]], *, src: str, tgt: str, dest: Path, work: Path,
                     bpe: str = "subword-nmt", bpe_tokens: int = 10000, lowercase: bool = False, clean: bool = False,
                     workers: int = 1, corpus: str = "text", sources: dict | None = None, log=_print) -> dict:
    """Tokenize, (clean, lowercase,) joint BPE and binarize ``pairs`` (read_parallel's checked splits)."""
    if bpe not in ("subword-nmt", "sentencepiece"):
        raise ValueError(f"--bpe must be subword-nmt or sentencepiece, got {bpe!r}")
    if isinstance(bpe_tokens, bool) or not isinstance(bpe_tokens, int) or bpe_tokens < 1:
        raise ValueError(f"--bpe-tokens must be a positive integer, got {bpe_tokens!r}")
    if src == tgt:
        raise ValueError(f"--src and --tgt must differ, got {src!r} twice")
    dest, work = Path(dest), Path(work)
    if dest.exists() and not (dest / "prep-info.json").exists():
        raise PrepareError(f"--dest {dest} exists and was not written by this script; pick another --dest or remove it")
    text_sha = P._key("mt", MT_PREP_VERSION, src, tgt, lowercase, clean,
                      {k: [P._key(*v[0]), P._key(*v[1])] for k, v in pairs.items()})
    work.mkdir(parents=True, exist_ok=True)
    steps = P._Steps(work, log)
    tmp, tok = work / "tmp", work / "tokenized"
    langs = (src, tgt)
    split_out = {(s, lang): tmp / f"{s}.{lang}" for s in SPLITS for lang in langs}
    counts: dict = {}

    def tokenize(t):
        n = {}
        for s in SPLITS:
            side = {}
            for i, lang in enumerate(langs):
                side[lang] = P.tokenize_lines(pairs[s][i], lang, workers, log, progress=s == "train")
            if clean and s == "train":
                a, b, dropped = P.clean_corpus(side[src], side[tgt])
                side = {src: a, tgt: b}
                counts["clean_dropped"] = dropped
            for lang in langs:
                _lines = P.lowercase(side[lang]) if lowercase else side[lang]
                P._write(t[split_out[(s, lang)]], _lines)
            n[s] = len(side[src])
        return {**n, "_summary": ", ".join(f"{k} {v}" for k, v in n.items()) + " pairs tokenized"}

    counts["splits"] = steps.run("tokenize", text_sha, list(split_out.values()), tokenize)

    bpe_model = tok / ("code" if bpe == "subword-nmt" else "spm.model")
    bpe_out = {(s, lang): tok / f"{s}.{lang}" for s in SPLITS for lang in langs}

    def learn_apply(t):
        joint = t[bpe_model].with_name(t[bpe_model].name + f".train.{src}-{tgt}")
        P._write(joint, P._read(split_out[("train", src)]) + P._read(split_out[("train", tgt)]))
        try:
            learn = P._subword_nmt if bpe == "subword-nmt" else P._sentencepiece
            encode = learn(joint, t[bpe_model], bpe_tokens, log)
        finally:
            joint.unlink(missing_ok=True)
        for (s, lang), out in bpe_out.items():
            lines = P._read(split_out[(s, lang)])
            with P._bar(len(lines), f"apply {bpe} to {s}.{lang}") as bar:
                P._write(t[out], encode(lines, bar))
        return {"_summary": f"{bpe} with {bpe_tokens} {'merges' if bpe == 'subword-nmt' else 'pieces'} applied"}

    steps.run("bpe", P._key("bpe", text_sha, bpe, bpe_tokens), [bpe_model, *bpe_out.values()], learn_apply)

    info = {"corpus": corpus, "source_lang": src, "target_lang": tgt, "bpe": bpe, "bpe_tokens": bpe_tokens,
            "lowercase": lowercase, "clean": clean, "cased": not lowercase, "sources": sources or {},
            "remove_bpe": "subword_nmt" if bpe == "subword-nmt" else "sentencepiece", "counts": counts,
            "raw_references": {s: f"raw/{s}.{tgt}" for s in ("valid", "test")}}

    def binarize(t):
        out = t[dest]
        out.mkdir(parents=True)
        P.run_preprocess(tok, out, src=src, tgt=tgt, workers=workers, log=log)
        shutil.copy(bpe_model, out / bpe_model.name)
        (out / "raw").mkdir()
        # The untokenized references (in the binarized order: fairseq-preprocess keeps line order).
        for s in ("valid", "test"):
            P._write(out / "raw" / f"{s}.{tgt}", pairs[s][1])
            P._write(out / "raw" / f"{s}.{src}", pairs[s][0])
        dicts = {lang: sum(1 for _ in open(out / f"dict.{lang}.txt", encoding="utf-8")) for lang in langs}
        info["dict_sizes"] = dicts
        info["dict_sha256"] = {lang: P._sha256(out / f"dict.{lang}.txt") for lang in langs}
        (out / "prep-info.json").write_text(json.dumps(info, indent=1) + "\n")
        return {"dict_sizes": dicts, "_summary": f"dictionaries {src} {dicts[src]} / {tgt} {dicts[tgt]} types"}

    dest.parent.mkdir(parents=True, exist_ok=True)
    counts["dict_sizes"] = steps.run("binarize", P._key("bin", text_sha, bpe, bpe_tokens, str(dest.resolve())), [dest],
                                     binarize)["dict_sizes"]
    sp = counts["splits"]
    log(f"done: {dest} (train {sp['train']}, valid {sp['valid']}, test {sp['test']} pairs)")
    return json.loads((dest / "prep-info.json").read_text())


def prepare_multi30k(from_dir: Path | None, *, dest: Path, work: Path, url: str = MULTI30K_URL,
                     sums: dict[str, str] = MULTI30K_SHA256, log=_print, **kw) -> dict:
    """Multi30k Task 1 DE-EN: fetch/check the six files, read and check the splits, then the recipe."""
    if Path(dest).exists() and not (Path(dest) / "prep-info.json").exists():
        raise PrepareError(f"--dest {dest} exists and was not written by this script; pick another --dest or remove it")
    folder = fetch_multi30k(from_dir, Path(work) / "orig", url=url, sums=sums, log=log)
    pairs = {s: _checked_pair(s, folder / f"{f}.de.gz", folder / f"{f}.en.gz") for s, f in MULTI30K_SPLITS.items()}
    sources = {"url": url, "sha256": dict(sums), "splits": dict(MULTI30K_SPLITS)}
    return prepare_parallel(pairs, src="de", tgt="en", dest=dest, work=work, corpus="multi30k", sources=sources,
                            log=log, **kw)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(
        prog="asam-mt-prepare", allow_abbrev=False,
        description="Prepare a German-English (or any) parallel corpus with the project's recipe (Moses "
        "tokenization, joint BPE, fairseq-preprocess). --corpus iwslt14 is asam-iwslt-prepare (its options follow).")
    ap.add_argument("--corpus", choices=("iwslt14", "multi30k", "text"), required=True)
    ap.add_argument("--from-dir", type=Path, default=None,
                    help="multi30k: a folder with the six raw .gz files (default: download them)")
    ap.add_argument("--url", default=MULTI30K_URL, help="multi30k: where to download from (default: %(default)s)")
    ap.add_argument("--train", help="text: training prefix (files PREFIX.SRC and PREFIX.TGT, optionally .gz)")
    ap.add_argument("--valid", help="text: validation prefix")
    ap.add_argument("--test", help="text: test prefix")
    ap.add_argument("--src", default="de", help="text: source language suffix (default: %(default)s)")
    ap.add_argument("--tgt", default="en", help="text: target language suffix (default: %(default)s)")
    ap.add_argument("--dest", type=Path, default=None,
                    help="binarized output (default: data-bin/<corpus>.tokenized.<src>-<tgt>)")
    ap.add_argument("--work-dir", type=Path, default=None, help="tokenized/BPE text (default: data-bin/<corpus>-prep)")
    ap.add_argument("--bpe", choices=("subword-nmt", "sentencepiece"), default="subword-nmt",
                    help="joint BPE tool (default: %(default)s, as the IWSLT'14 recipe)")
    ap.add_argument("--bpe-tokens", type=int, default=10000,
                    help="BPE merges (subword-nmt) or vocabulary size (sentencepiece) (default: %(default)s)")
    ap.add_argument("--lowercase", action="store_true", help="lowercase as the IWSLT'14 recipe (default: keep case)")
    ap.add_argument("--clean", action="store_true",
                    help="drop training pairs as clean-corpus-n.perl -ratio 1.5 1 175 (default: keep all)")
    ap.add_argument("--workers", type=int, default=1, help="tokenizer / fairseq-preprocess processes (default: 1)")
    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    pre.add_argument("--corpus")
    known, rest = pre.parse_known_args(argv)
    if known.corpus == "iwslt14":
        return P.main(rest)
    args = ap.parse_args(argv)
    if args.bpe_tokens < 1:
        ap.error(f"--bpe-tokens must be >= 1, got {args.bpe_tokens}")
    if args.workers < 1:
        ap.error(f"--workers must be >= 1, got {args.workers}")
    try:
        if args.corpus == "multi30k":
            dest = args.dest or Path("data-bin/multi30k.tokenized.de-en")
            work = args.work_dir or Path("data-bin/multi30k-prep")
            prepare_multi30k(args.from_dir, dest=dest, work=work, url=args.url, bpe=args.bpe,
                             bpe_tokens=args.bpe_tokens, lowercase=args.lowercase, clean=args.clean, workers=args.workers)
        else:
            missing = [f"--{k}" for k in ("train", "valid", "test") if not getattr(args, k)]
            if missing:
                ap.error(f"--corpus text needs {', '.join(missing)}")
            pairs = read_parallel({"train": args.train, "valid": args.valid, "test": args.test}, args.src, args.tgt)
            dest = args.dest or Path(f"data-bin/text.tokenized.{args.src}-{args.tgt}")
            work = args.work_dir or Path("data-bin/text-prep")
            prepare_parallel(pairs, src=args.src, tgt=args.tgt, dest=dest, work=work, bpe=args.bpe,
                             bpe_tokens=args.bpe_tokens, lowercase=args.lowercase, clean=args.clean,
                             workers=args.workers, corpus="text",
                             sources={"train": args.train, "valid": args.valid, "test": args.test})
    except (PrepareError, ValueError) as e:
        print(f"asam-mt-prepare: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
