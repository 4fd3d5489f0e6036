"""IWSLT'14 German-English preparation: the steps and splits of fairseq's prepare-iwslt14.sh, in Python.

The paper's machine-translation experiment (Section 5.3, Table 5) uses IWSLT'14 DE-EN as prepared by
fairseq's ``examples/translation/prepare-iwslt14.sh``. This module repeats that recipe step by step so
BLEU stays comparable with published numbers, with sacremoses and subword-nmt from PyPI in place of
git clones of the Moses and subword-nmt scripts:

1. train: drop the ``<url>``, ``<talkid>``, ``<keywords>`` lines of ``train.tags.de-en.{de,en}``, strip
   the ``<title>``/``<description>`` tags, Moses-tokenize (``tokenizer.perl -l $lang``: escaping on,
   no aggressive hyphen splitting), clean like ``clean-corpus-n.perl -ratio 1.5 ... 1 175``, lowercase;
2. dev/test: the ``<seg id="N">`` lines of ``IWSLT14.TED*.de-en.$lang.xml`` (``’`` -> ``'``), tokenized
   and lowercased, not cleaned;
3. valid = every 23rd cleaned training pair, train = the rest; test = dev2010 + tedx.dev2012 + tst2010
   + tst2011 + tst2012;
4. joint BPE with 10,000 merges learned on train.de + train.en (``--bpe sentencepiece``: a joint
   SentencePiece BPE model with that vocabulary size instead);
5. ``fairseq-preprocess`` with separate source and target dictionaries (the recipe does not join them).

Every step writes to temporary names and renames when finished, then records a ``<step>.done`` file
holding a fingerprint of its inputs; a rerun with the same inputs reuses finished steps, and an
interrupted step is simply redone. Example::

    bash data-prep/prepare-iwslt14.sh --tarball ~/Downloads/de-en.tgz
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import time
import urllib.error
import urllib.request
import zlib
from collections.abc import Callable, Iterable
from pathlib import Path

__all__ = [
    "ARCHIVE_URL",
    "PrepareError",
    "REQUIRED_MEMBERS",
    "clean_corpus",
    "prepare",
    "seg_lines",
    "strip_train_tags",
    "tokenize_lines",
]

ARCHIVE_URL = "http://dl.fbaipublicfiles.com/fairseq/data/iwslt14/de-en.tgz"
SRC, TGT = "de", "en"
TEST_SETS = (
    "IWSLT14.TED.dev2010",
    "IWSLT14.TEDX.dev2012",
    "IWSLT14.TED.tst2010",
    "IWSLT14.TED.tst2011",
    "IWSLT14.TED.tst2012",
)
REQUIRED_MEMBERS = tuple(
    [f"de-en/train.tags.de-en.{lang}" for lang in (SRC, TGT)]
    + [f"de-en/{name}.de-en.{lang}.xml" for name in TEST_SETS for lang in (SRC, TGT)]
)
# Bump when a step's output would change for the same inputs, so old .done files stop matching.
PREP_VERSION = 1
VALID_EVERY = 23  # the recipe: awk 'NR % 23 == 0' -> valid
CLEAN_MIN, CLEAN_MAX, CLEAN_RATIO = 1, 175, 1.5


class PrepareError(Exception):
    """A problem with the inputs, reported to the user as one clear message."""


Log = Callable[[str], None]


def _print(msg: str) -> None:
    print(f"[prepare-iwslt14] {msg}", flush=True)


def _bar(total: int | None, desc: str, unit: str = "line", **kw):
    """A tqdm bar on stderr for one long step (the log lines stay on stdout); gone when the step ends."""
    from tqdm import tqdm

    return tqdm(total=total, desc=f"  {desc}", unit=unit, leave=False, mininterval=0.5, file=sys.stderr,
                dynamic_ncols=True, **kw)


# ------------------------------------------------------------------------------------------------
# Text steps (pure functions over lines, tested one by one)
# ------------------------------------------------------------------------------------------------

_DROP_TAGS = ("<url>", "<talkid>", "<keywords>")
_STRIP_TAGS = re.compile(r"</?(title|description)>")


def strip_train_tags(lines: Iterable[str]) -> list[str]:
    """``grep -v '<url>' | grep -v '<talkid>' | grep -v '<keywords>'`` then remove the title/description tags.

    Other header lines (``<speaker>`` ...) are kept, as in the recipe.
    """
    return [_STRIP_TAGS.sub("", line) for line in lines if not any(t in line for t in _DROP_TAGS)]


_SEG_OPEN = re.compile(r'<seg id="[0-9]*">\s*')
_SEG_CLOSE = re.compile(r"\s*</seg>\s*")


def seg_lines(lines: Iterable[str]) -> list[str]:
    """The recipe's ``grep '<seg id' | sed 's/<seg id="[0-9]*">\\s*//g' | sed 's/\\s*<\\/seg>\\s*//g' | sed "s/’/'/g"``."""
    out = []
    for line in lines:
        if "<seg id" in line:
            line = _SEG_CLOSE.sub("", _SEG_OPEN.sub("", line))
            out.append(line.replace("\u2019", "'"))
    return out


_TOKENIZERS: dict = {}
_FINAL_PERIOD = re.compile(r"^(\S+)\.$")


def _moses_tokenizer(lang: str):
    from sacremoses import MosesTokenizer

    class _PerlMosesTokenizer(MosesTokenizer):
        # tokenizer.perl splits the period off the last word unconditionally ("split last words
        # independently as they are unlikely to be non-breaking prefixes"); sacremoses 0.2 does not,
        # and keeps e.g. the German "... 1." whole because "1" is a German non-breaking prefix.
        def handles_nonbreaking_prefixes(self, text):
            words = text.split()
            if words and (m := _FINAL_PERIOD.match(words[-1])):
                words[-1] = m.group(1) + " ."
            return super().handles_nonbreaking_prefixes(" ".join(words))

    return _PerlMosesTokenizer(lang=lang)


def _tokenize_one(lang: str, line: str) -> str:
    tok = _TOKENIZERS.get(lang)
    if tok is None:
        tok = _TOKENIZERS[lang] = _moses_tokenizer(lang)
    if not line.strip():
        return line  # tokenizer.perl prints blank lines unchanged
    # tokenizer.perl -l $lang: escaping on (&apos; ...), no -a (aggressive hyphen splitting).
    return tok.tokenize(line, aggressive_dash_splits=False, return_str=True, escape=True)


def _tokenize_chunk(args) -> list[str]:
    lang, chunk = args
    return [_tokenize_one(lang, line) for line in chunk]


def tokenize_lines(lines: list[str], lang: str, workers: int = 1, log: Log | None = None,
                   progress: bool = True) -> list[str]:
    """Moses tokenization as ``tokenizer.perl -threads N -l lang`` (line for line, order kept).

    ``progress``: a bar over the lines (the training side, about 160k lines per language; the
    dev/test files take a second and go without one).
    """
    chunk = 5000
    chunks = [(lang, lines[i : i + chunk]) for i in range(0, len(lines), chunk)]
    out: list[str] = []
    with _bar(len(lines), f"tokenize {lang}", disable=not progress) as bar:
        if workers > 1 and len(chunks) > 1:
            import multiprocessing as mp

            with mp.get_context("fork").Pool(workers) as pool:
                for part in pool.imap(_tokenize_chunk, chunks):
                    out += part
                    bar.update(len(part))
                    if log and len(out) % (chunk * 10) == 0:
                        log(f"  tokenized {len(out)}/{len(lines)} {lang} lines")
        else:
            for c in chunks:
                part = _tokenize_chunk(c)
                out += part
                bar.update(len(part))
    return out


def _norm_space(s: str) -> str:
    return re.sub(r"\s+", " ", s).strip(" ")


def clean_corpus(src: list[str], tgt: list[str], *, min_len: int = CLEAN_MIN, max_len: int = CLEAN_MAX,
                 ratio: float = CLEAN_RATIO, max_word_length: int = 1000):
    """``clean-corpus-n.perl -ratio R corpus de en out MIN MAX``: returns (src, tgt, dropped-by-reason).

    As the Perl script: whitespace runs collapse to one space, ``|`` is removed unless the first line
    holds one (factored corpus), and a pair is dropped if a side is empty, has fewer than MIN or more
    than MAX words, the length ratio exceeds R either way, or a word is longer than 1000 characters.
    """
    if len(src) != len(tgt):
        raise PrepareError(f"the training files have different line counts: {len(src)} de vs {len(tgt)} en")
    factored = bool(src) and ("|" in src[0] or "|" in tgt[0])
    long_word = re.compile(r"[^\s|]{" + str(max_word_length + 1) + "}")
    out_s, out_t = [], []
    dropped = {"empty": 0, "length": 0, "ratio": 0, "long_word": 0}
    for f, e in zip(src, tgt):
        if not factored:
            f, e = f.replace("|", ""), e.replace("|", "")
        f, e = _norm_space(f), _norm_space(e)
        if not f or not e:
            dropped["empty"] += 1
            continue
        fc, ec = len(f.split(" ")), len(e.split(" "))
        if ec > max_len or fc > max_len or ec < min_len or fc < min_len:
            dropped["length"] += 1
            continue
        if ec / fc > ratio or fc / ec > ratio:
            dropped["ratio"] += 1
            continue
        if long_word.search(e) or long_word.search(f):
            dropped["long_word"] += 1
            continue
        out_s.append(f)
        out_t.append(e)
    return out_s, out_t, dropped


def lowercase(lines: Iterable[str]) -> list[str]:
    """``lowercase.perl`` (Perl's lc on UTF-8 text)."""
    return [line.lower() for line in lines]


# ------------------------------------------------------------------------------------------------
# Files and steps
# ------------------------------------------------------------------------------------------------


def _read(path: Path) -> list[str]:
    # newline="\n": keep a stray \r inside a line, as the shell tools do.
    with open(path, encoding="utf-8", newline="\n") as fh:
        return [line.rstrip("\n") for line in fh]


def _write(path: Path, lines: Iterable[str]) -> None:
    with open(path, "w", encoding="utf-8", newline="\n") as fh:
        for line in lines:
            fh.write(line + "\n")


def _tmp(path: Path) -> Path:
    return path.with_name(f"{path.name}.tmp-{os.getpid()}")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _key(*parts) -> str:
    return hashlib.sha256(json.dumps([PREP_VERSION, *parts], sort_keys=True).encode()).hexdigest()[:16]


class _Steps:
    """Runs named steps once: outputs go to temporary names, are renamed, then ``<name>.done`` is written."""

    def __init__(self, work: Path, log: Log):
        self.work = work
        self.log = log

    def run(self, name: str, key: str, outputs: list[Path], fn: Callable[[dict[Path, Path]], dict]) -> dict:
        done = self.work / f"{name}.done"
        if done.exists() and all(p.exists() for p in outputs):
            info = json.loads(done.read_text())
            if info.get("key") == key:
                self.log(f"{name}: reused ({info.get('summary', 'done')})")
                return info.get("counts", {})
        done.unlink(missing_ok=True)
        self.log(f"{name}: running")
        t0 = time.time()
        tmps = {p: _tmp(p) for p in outputs}
        for t in tmps.values():
            t.parent.mkdir(parents=True, exist_ok=True)
        try:
            counts = fn(tmps) or {}
            for p, t in tmps.items():
                if p.is_dir():
                    shutil.rmtree(p)
                os.replace(t, p)
        finally:
            for t in tmps.values():  # an error or Ctrl-C leaves no temporary files behind
                if t.is_dir():
                    shutil.rmtree(t, ignore_errors=True)
                elif t.exists():
                    t.unlink()
        summary = counts.pop("_summary", "done")
        tmp_done = _tmp(done)
        tmp_done.write_text(json.dumps({"key": key, "counts": counts, "summary": summary}, indent=1))
        os.replace(tmp_done, done)
        self.log(f"{name}: {summary} [{time.time() - t0:.1f}s]")
        return counts


def _open_archive(tarball: Path) -> tarfile.TarFile:
    try:
        return tarfile.open(tarball, "r:*")
    except (tarfile.TarError, EOFError, OSError, zlib.error) as e:
        raise PrepareError(
            f"{tarball} is not a readable .tgz archive ({e}); the IWSLT'14 archive is {ARCHIVE_URL}"
        ) from None


def _extract(tarball: Path, dest: Path) -> dict:
    """Copy the members the recipe needs into dest/de-en/ (only those: no paths from the archive are trusted)."""
    tar = _open_archive(tarball)
    try:
        try:
            members = {m.name[2:] if m.name.startswith("./") else m.name: m for m in tar.getmembers()}
        except (tarfile.TarError, EOFError, OSError, zlib.error) as e:
            raise PrepareError(f"{tarball} is corrupt or truncated ({e}); download it again from {ARCHIVE_URL}") from None
        missing = [m for m in REQUIRED_MEMBERS if m not in members or not members[m].isfile()]
        if missing:
            raise PrepareError(
                f"{tarball} is not the IWSLT'14 de-en archive: missing member(s) {', '.join(missing)} "
                f"(expected the layout of {ARCHIVE_URL})"
            )
        (dest / "de-en").mkdir(parents=True)
        for name in REQUIRED_MEMBERS:
            try:
                data = tar.extractfile(members[name]).read()
            except (tarfile.TarError, EOFError, OSError, zlib.error) as e:
                raise PrepareError(f"{tarball}: cannot read member {name} ({e}); the archive is corrupt") from None
            try:
                data.decode("utf-8")
            except UnicodeDecodeError as e:
                raise PrepareError(f"{tarball}: member {name} is not UTF-8 text ({e})") from None
            (dest / name).write_bytes(data)
    finally:
        tar.close()
    return {"_summary": f"{len(REQUIRED_MEMBERS)} files extracted"}


def download(url: str, dest: Path, log: Log, timeout: float = 60.0) -> Path:
    """Fetch the archive to dest (atomically); an offline machine gets a message saying what to do."""
    if dest.exists():
        log(f"download: reusing {dest}")
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp(dest)
    log(f"download: {url} -> {dest}")
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r, open(tmp, "wb") as fh:
            size = r.headers.get("Content-Length")
            with _bar(int(size) if size and size.isdigit() else None, "download", unit="B", unit_scale=True,
                      unit_divisor=1024) as bar:
                for block in iter(lambda: r.read(1 << 16), b""):
                    fh.write(block)
                    bar.update(len(block))
        got = tmp.stat().st_size
        if size and size.isdigit() and got != int(size):
            raise OSError(f"the connection closed after {got} of {size} bytes")
        os.replace(tmp, dest)
    except (urllib.error.URLError, OSError, ValueError) as e:
        tmp.unlink(missing_ok=True)
        raise PrepareError(
            f"could not download {url} ({e}).\n"
            "This machine may be offline. Get the archive on a machine with internet access, e.g.\n"
            f"    wget {ARCHIVE_URL}\n"
            "copy it here, and run again with --tarball PATH/de-en.tgz"
        ) from None
    return dest


def _check_lines(path: Path, n_src: int, n_tgt: int, what: str) -> None:
    if n_src != n_tgt:
        raise PrepareError(f"{what}: {n_src} German vs {n_tgt} English lines in {path}; the archive is not aligned")


def prepare(tarball: Path | None = None, *, dest: Path = Path("data-bin/iwslt14.tokenized.de-en"),
            work: Path = Path("data-bin/iwslt14-prep"), bpe: str = "subword-nmt", bpe_tokens: int = 10000,
            workers: int | None = None, url: str = ARCHIVE_URL, log: Log = _print) -> dict:
    """Run the whole recipe; returns the counts (pairs per split, dropped pairs, dictionary sizes)."""
    if bpe not in ("subword-nmt", "sentencepiece"):
        raise ValueError(f"--bpe must be subword-nmt or sentencepiece, got {bpe!r}")
    if isinstance(bpe_tokens, bool) or not isinstance(bpe_tokens, int) or bpe_tokens < 1:
        raise ValueError(f"--bpe-tokens must be a positive integer, got {bpe_tokens!r}")
    workers = workers if workers is not None else min(8, os.cpu_count() or 1)
    if workers < 1:
        raise ValueError(f"--workers must be >= 1, got {workers}")
    dest, work = Path(dest), Path(work)
    if dest.exists() and not (dest / "prep-info.json").exists():
        raise PrepareError(f"--dest {dest} exists and was not written by this script; pick another --dest or remove it")
    if tarball is not None:
        tarball = Path(tarball)
        if not tarball.is_file():
            raise PrepareError(
                f"--tarball {tarball}: no such file. The IWSLT'14 archive is {ARCHIVE_URL} "
                "(wget it on a machine with internet access)"
            )
        # Check the archive before anything is written, so bad input leaves no half-made folders.
        _open_archive(tarball).close()
    else:
        tarball = download(url, work / "orig" / "de-en.tgz", log)
    work.mkdir(parents=True, exist_ok=True)
    steps = _Steps(work, log)
    sha = _sha256(tarball)
    orig, tmp, tok = work / "orig", work / "tmp", work / "tokenized"
    log(f"archive {tarball} (sha256 {sha[:12]}...), work dir {work}, output {dest}")

    steps.run("extract", _key("extract", sha), [orig / "de-en"], lambda t: _extract_into(tarball, t[orig / "de-en"]))

    counts: dict = {}

    # 1. train: strip XML, tokenize (one step: the tokenized files of both languages).
    tok_out = {lang: tmp / f"train.tags.de-en.tok.{lang}" for lang in (SRC, TGT)}

    def tokenize_train(t):
        n = {}
        for lang in (SRC, TGT):
            raw = _read(orig / "de-en" / f"train.tags.de-en.{lang}")
            text = strip_train_tags(raw)
            log(f"  {lang}: {len(raw)} lines, {len(raw) - len(text)} header lines dropped, tokenizing {len(text)}")
            _write(t[tok_out[lang]], tokenize_lines(text, lang, workers, log))
            n[lang] = len(text)
        if n[SRC] != n[TGT]:
            raise PrepareError(f"train.tags.de-en.de and .en differ after removing headers: {n[SRC]} vs {n[TGT]} lines")
        return {"lines": n[SRC], "_summary": f"{n[SRC]} sentence pairs tokenized"}

    steps.run("tokenize-train", _key("tok", sha), list(tok_out.values()), tokenize_train)

    # 2. clean (ratio 1.5, 1-175 words), then lowercase.
    lc_out = {lang: tmp / f"train.tags.de-en.{lang}" for lang in (SRC, TGT)}

    def clean(t):
        s, e, dropped = clean_corpus(_read(tok_out[SRC]), _read(tok_out[TGT]))
        n_in = len(s) + sum(dropped.values())
        _write(t[lc_out[SRC]], lowercase(s))
        _write(t[lc_out[TGT]], lowercase(e))
        why = ", ".join(f"{v} {k}" for k, v in dropped.items() if v) or "none"
        return {"read": n_in, "kept": len(s), "dropped": dropped,
                "_summary": f"{n_in} pairs read, {len(s)} kept, {n_in - len(s)} dropped ({why})"}

    counts["clean"] = steps.run("clean", _key("clean", sha), list(lc_out.values()), clean)

    # 3. dev/test sets from the <seg> lines.
    seg_out = {(name, lang): tmp / f"{name}.de-en.{lang}" for name in TEST_SETS for lang in (SRC, TGT)}

    def dev_test(t):
        n = {}
        for name in TEST_SETS:
            per = {}
            for lang in (SRC, TGT):
                src_file = orig / "de-en" / f"{name}.de-en.{lang}.xml"
                segs = seg_lines(_read(src_file))
                _write(t[seg_out[(name, lang)]], lowercase(tokenize_lines(segs, lang, 1, progress=False)))
                per[lang] = len(segs)
            _check_lines(orig / "de-en" / f"{name}.de-en.*.xml", per[SRC], per[TGT], name)
            if per[SRC] == 0:
                raise PrepareError(f"{name}.de-en.de.xml has no <seg id=...> lines")
            n[name] = per[SRC]
        return {"segments": n, "_summary": ", ".join(f"{k} {v}" for k, v in n.items()) + " segments"}

    counts["test_sets"] = steps.run("dev-test", _key("devtest", sha), list(seg_out.values()), dev_test)["segments"]

    # 4. splits.
    split_out = {(s, lang): tmp / f"{s}.{lang}" for s in ("train", "valid", "test") for lang in (SRC, TGT)}

    def split(t):
        n = {}
        for lang in (SRC, TGT):
            lines = _read(lc_out[lang])
            valid = [x for i, x in enumerate(lines, 1) if i % VALID_EVERY == 0]
            train = [x for i, x in enumerate(lines, 1) if i % VALID_EVERY != 0]
            test = [x for name in TEST_SETS for x in _read(seg_out[(name, lang)])]
            _write(t[split_out[("train", lang)]], train)
            _write(t[split_out[("valid", lang)]], valid)
            _write(t[split_out[("test", lang)]], test)
            n = {"train": len(train), "valid": len(valid), "test": len(test)}
        return {**n, "_summary": f"train {n['train']}, valid {n['valid']} (every {VALID_EVERY}rd pair), test {n['test']}"}

    counts["splits"] = steps.run("split", _key("split", sha), list(split_out.values()), split)

    # 5. joint BPE.
    bpe_model = tok / ("code" if bpe == "subword-nmt" else "spm.model")
    bpe_out = {(s, lang): tok / f"{s}.{lang}" for s in ("train", "valid", "test") for lang in (SRC, TGT)}

    def learn_apply(t):
        joint = t[bpe_model].with_name(t[bpe_model].name + ".train.en-de")
        _write(joint, _read(split_out[("train", SRC)]) + _read(split_out[("train", TGT)]))
        try:
            if bpe == "subword-nmt":
                encode = _subword_nmt(joint, t[bpe_model], bpe_tokens, log)
            else:
                encode = _sentencepiece(joint, t[bpe_model], bpe_tokens, log)
        finally:
            joint.unlink(missing_ok=True)
        for (s, lang), out in bpe_out.items():
            lines = _read(split_out[(s, lang)])
            with _bar(len(lines), f"apply {bpe} to {s}.{lang}") as bar:
                _write(t[out], encode(lines, bar))
        return {"_summary": f"{bpe} with {bpe_tokens} {'merges' if bpe == 'subword-nmt' else 'pieces'} applied to 6 files"}

    steps.run("bpe", _key("bpe", sha, bpe, bpe_tokens), [bpe_model, *bpe_out.values()], learn_apply)

    # 6. binarize.
    info = {"bpe": bpe, "bpe_tokens": bpe_tokens, "archive_sha256": sha, "counts": counts,
            "remove_bpe": "subword_nmt" if bpe == "subword-nmt" else "sentencepiece"}

    def binarize(t):
        out = t[dest]
        out.mkdir(parents=True)
        run_preprocess(tok, out, src=SRC, tgt=TGT, workers=workers, log=log)
        shutil.copy(bpe_model, out / bpe_model.name)
        dicts = {lang: sum(1 for _ in open(out / f"dict.{lang}.txt", encoding="utf-8")) for lang in (SRC, TGT)}
        info["dict_sizes"] = dicts
        (out / "prep-info.json").write_text(json.dumps(info, indent=1) + "\n")
        return {"dict_sizes": dicts, "_summary": f"dictionaries de {dicts[SRC]} / en {dicts[TGT]} types (+4 specials)"}

    dest.parent.mkdir(parents=True, exist_ok=True)
    counts["dict_sizes"] = steps.run("binarize", _key("bin", sha, bpe, bpe_tokens, str(dest.resolve())), [dest],
                                     binarize)["dict_sizes"]
    sp = counts["splits"]
    log(f"done: {dest} (train {sp['train']}, valid {sp['valid']}, test {sp['test']} pairs)")
    return counts


def run_preprocess(tok: Path, out: Path, *, src: str, tgt: str, workers: int, log) -> None:
    """``fairseq-preprocess`` of ``tok``/{train,valid,test}.{src,tgt} into ``out`` (separate dictionaries).

    Its log lines (dictionaries built, sentences and unknown words per split) are passed to ``log`` as they
    come, so a long binarization shows where it is; all its output is kept in ``out``/preprocess-output.log.
    A failure raises :class:`PrepareError` with the end of that output.
    """
    cmd = [sys.executable, "-m", "fairseq_cli.preprocess", "--source-lang", src, "--target-lang", tgt,
           "--trainpref", str(tok / "train"), "--validpref", str(tok / "valid"), "--testpref", str(tok / "test"),
           "--destdir", str(out), "--workers", str(workers)]
    text = []
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          env=dict(os.environ, PYTHONUNBUFFERED="1")) as proc:
        for line in proc.stdout:
            text.append(line)
            # "INFO:fairseq_cli.preprocess:msg" or "... | INFO | fairseq_cli.preprocess | msg";
            # the Namespace dump of every option is left to the log file.
            m = re.search(r"fairseq_cli\.preprocess(?::| \| )(.*)", line)
            if m and not m.group(1).startswith("Namespace("):
                log(f"  fairseq-preprocess: {m.group(1).strip()}")
        rc = proc.wait()
    (out / "preprocess-output.log").write_text("".join(text))
    if rc != 0:
        raise PrepareError(f"fairseq-preprocess failed (exit {rc}):\n{''.join(text)[-3000:]}")


def _extract_into(tarball: Path, out: Path) -> dict:
    # out is the temporary name of orig/de-en; _extract writes <root>/de-en/, so extract to a scratch
    # root next to it and move the folder into place.
    root = out.with_name(out.name + ".root")
    shutil.rmtree(root, ignore_errors=True)
    try:
        counts = _extract(tarball, root)
        os.replace(root / "de-en", out)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return counts


def _subword_nmt(joint: Path, codes: Path, merges: int, log: Log):
    from subword_nmt.apply_bpe import BPE
    from subword_nmt.learn_bpe import learn_bpe

    # learn_bpe draws its own tqdm bar over the merges on stderr.
    log(f"  learn_bpe -s {merges} on {sum(1 for _ in open(joint, encoding='utf-8'))} lines")
    with open(joint, encoding="utf-8") as fin, open(codes, "w", encoding="utf-8") as fout:
        learn_bpe(fin, fout, merges)
    with open(codes, encoding="utf-8") as fh:
        enc = BPE(fh)

    def encode(lines, bar):
        out = []
        for line in lines:
            out.append(enc.process_line(line))
            bar.update(1)
        return out

    return encode


def _sentencepiece(joint: Path, model: Path, vocab: int, log: Log):
    import sentencepiece as spm

    prefix = str(model) + ".spm"  # model is a temporary name; sentencepiece appends .model/.vocab
    log(f"  sentencepiece BPE, vocabulary {vocab}")
    # hard_vocab_limit=False: a small corpus may not have `vocab` pieces; take what there is.
    spm.SentencePieceTrainer.train(input=str(joint), model_prefix=prefix, vocab_size=vocab, model_type="bpe",
                                   character_coverage=1.0, hard_vocab_limit=False, minloglevel=2)
    Path(prefix + ".vocab").unlink(missing_ok=True)
    os.replace(prefix + ".model", model)
    sp = spm.SentencePieceProcessor(model_file=str(model))

    def encode(lines, bar):
        out = []
        for line in lines:
            out.append(" ".join(sp.encode(line, out_type=str)))
            bar.update(1)
        return out

    return encode


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="asam-iwslt-prepare",
        description="Prepare IWSLT'14 DE-EN as fairseq's examples/translation/prepare-iwslt14.sh does, "
        "then binarize it with fairseq-preprocess.",
    )
    ap.add_argument("--tarball", type=Path, help=f"local copy of de-en.tgz (default: download {ARCHIVE_URL})")
    ap.add_argument("--url", default=ARCHIVE_URL, help="where to download the archive from (default: %(default)s)")
    ap.add_argument("--dest", type=Path, default=Path("data-bin/iwslt14.tokenized.de-en"),
                    help="binarized output for fairseq-train (default: %(default)s)")
    ap.add_argument("--work-dir", type=Path, default=Path("data-bin/iwslt14-prep"),
                    help="extracted, tokenized and BPE text; finished steps are reused (default: %(default)s)")
    ap.add_argument("--bpe", choices=("subword-nmt", "sentencepiece"), default="subword-nmt",
                    help="joint BPE tool (default: %(default)s, as fairseq's recipe)")
    ap.add_argument("--bpe-tokens", type=int, default=10000,
                    help="BPE merges (subword-nmt) or vocabulary size (sentencepiece) (default: %(default)s)")
    ap.add_argument("--workers", type=int, default=None, help="tokenizer / fairseq-preprocess processes")
    args = ap.parse_args(argv)
    if args.bpe_tokens < 1:
        ap.error(f"--bpe-tokens must be >= 1, got {args.bpe_tokens}")
    if args.workers is not None and args.workers < 1:
        ap.error(f"--workers must be >= 1, got {args.workers}")
    try:
        prepare(args.tarball, dest=args.dest, work=args.work_dir, bpe=args.bpe, bpe_tokens=args.bpe_tokens,
                workers=args.workers, url=args.url)
    except PrepareError as e:
        print(f"asam-iwslt-prepare: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
