"""data-prep/prepare-iwslt14.sh on a small archive in the real de-en.tgz layout (paper Section 5.3 data).

Checks the recipe's splits and counts, the cleaning, the tokenized text, the binarized output (read
back through fairseq), reuse on rerun, an interrupted run, and bad archives.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from iwslt_helpers import (
    HEADER_TAGS,
    SEGS_PER_SET,
    SPECIAL,
    SPECIAL_EN_TOKENIZED,
    TEST_SETS,
    expected_test_en,
    train_talks,
    write_archive,
)

from fairseq_asam.iwslt import prepare as prep

REPO = Path(__file__).resolve().parent.parent
N_PAIRS = 60
BPE_TOKENS = 200


def run_script(*args, cwd=None):
    env = dict(os.environ, PYTHONWARNINGS="ignore", PYTHON=sys.executable)
    return subprocess.run(["bash", str(REPO / "data-prep" / "prepare-iwslt14.sh"), *map(str, args)],
                          capture_output=True, text=True, cwd=cwd or REPO, env=env)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, warm_launches):  # fairseq-preprocess starts warm (tests/warm_python.py)
    root = tmp_path_factory.mktemp("iwslt")
    tgz = write_archive(root / "de-en.tgz", n_pairs=N_PAIRS)
    r = run_script("--tarball", tgz, "--dest", root / "bin", "--work-dir", root / "work", "--bpe-tokens", BPE_TOKENS,
                   "--workers", 1)
    assert r.returncode == 0, r.stdout + r.stderr
    return {"root": root, "tgz": tgz, "bin": root / "bin", "work": root / "work", "stdout": r.stdout,
            "stderr": r.stderr}


def run_main(capsys, *args):
    """prepare.py's CLI in this process (the shell script only execs it): exit code, stdout, stderr."""
    rc = prep.main([str(a) for a in args])
    out = capsys.readouterr()
    return subprocess.CompletedProcess(args, rc, out.out, out.err)


def lines(path: Path) -> list[str]:
    return path.read_text(encoding="utf-8").splitlines()


def expected_kept_pairs() -> int:
    talks = train_talks(N_PAIRS)
    n_text = sum(len(p) for _, p in talks) + 3 * len(talks)  # + speaker, title, description of each talk
    return n_text - sum(1 for *_, fate in SPECIAL if fate != "kept")


@pytest.mark.slow
def test_counts_and_splits(prepared):
    out, tmp = prepared["stdout"], prepared["work"] / "tmp"
    kept = expected_kept_pairs()
    read = kept + 3
    assert f"clean: {read} pairs read, {kept} kept, 3 dropped (1 empty, 1 length, 1 ratio)" in out
    n_valid = kept // 23
    assert f"split: train {kept - n_valid}, valid {n_valid} (every 23rd pair), test {5 * SEGS_PER_SET}" in out
    # valid = every 23rd cleaned pair (awk NR % 23 == 0), train = the rest, in order.
    for lang in ("de", "en"):
        cleaned = lines(tmp / f"train.tags.de-en.{lang}")
        assert len(cleaned) == kept
        assert lines(tmp / f"valid.{lang}") == cleaned[22::23]
        assert lines(tmp / f"train.{lang}") == [x for i, x in enumerate(cleaned, 1) if i % 23]
    # test = dev2010 + tedx.dev2012 + tst2010 + tst2011 + tst2012, tokenized and lowercased, ’ -> '.
    assert lines(tmp / "test.en") == expected_test_en()
    assert lines(tmp / "test.de")[0] == "marker dev2010 satz 1 ."


@pytest.mark.slow
def test_cleaning_and_tokenization(prepared):
    tmp = prepared["work"] / "tmp"
    de, en = lines(tmp / "train.tags.de-en.de"), lines(tmp / "train.tags.de-en.en")
    text = "\n".join(de + en)
    for tag in ("url", "keywords", "talkid"):
        assert f"{tag} &gt;" not in text and "http" not in text  # these header lines are dropped
    # title/description keep their text without the tags; <speaker> lines stay, as in the recipe.
    assert "speaker 1 : the story of the dog" in en and "ted talk 1" in en
    assert "&lt; speaker &gt; speaker 1 &lt; / speaker &gt;" in en
    assert not any(f"<{t}>" in x for t in HEADER_TAGS for x in de + en)
    for raw, tok in SPECIAL_EN_TOKENIZED.items():
        assert tok in en, raw
    assert "das ist ’ s &amp; mehr ." in de  # ’ is not alphanumeric: split off, unlike ' in English
    assert "yes , yes , yes , of course it is ." not in en  # ratio 10 / 2 > 1.5
    assert all(len(x.split()) <= 175 for x in de + en)
    assert all(x == x.lower() for x in de + en)
    # Every kept pair is aligned: the first generated pair of talk 1 follows the 3 header lines.
    first_de, first_en = train_talks(N_PAIRS)[0][1][0]
    i = de.index(prep.lowercase(prep.tokenize_lines([first_de], "de"))[0])
    assert en[i] == prep.lowercase(prep.tokenize_lines([first_en], "en"))[0]


@pytest.mark.slow
def test_binarized_output_reads_back(prepared):
    from fairseq.data import Dictionary, data_utils

    bin_dir, tok = prepared["bin"], prepared["work"] / "tokenized"
    info = json.loads((bin_dir / "prep-info.json").read_text())
    assert info["bpe"] == "subword-nmt" and info["remove_bpe"] == "subword_nmt"
    assert (bin_dir / "code").exists() and len(lines(tok / "code")) > 1
    for split in ("train", "valid", "test"):
        for lang in ("de", "en"):
            d = Dictionary.load(str(bin_dir / f"dict.{lang}.txt"))
            ds = data_utils.load_indexed_dataset(str(bin_dir / f"{split}.de-en.{lang}"), d)
            bpe_lines = lines(tok / f"{split}.{lang}")
            assert len(ds) == len(bpe_lines) == len(lines(prepared["work"] / "tmp" / f"{split}.{lang}"))
            for i in (0, len(ds) - 1):
                # valid/test words the small training set never saw read back as <unk>.
                known = " ".join(w if d.index(w) != d.unk() else d.unk_word for w in bpe_lines[i].split())
                assert d.string(ds[i]) == known
    # Removing the BPE gives back the tokenized text exactly.
    for x, y in zip(lines(tok / "valid.en"), lines(prepared["work"] / "tmp" / "valid.en")):
        assert (x + " ").replace("@@ ", "").rstrip() == y
    # Separate dictionaries, as fairseq's recipe (no --joined-dictionary).
    assert lines(bin_dir / "dict.de.txt") != lines(bin_dir / "dict.en.txt")


@pytest.mark.slow
def test_rerun_reuses_every_step(prepared, capsys):
    before = {p: p.read_bytes() for p in prepared["bin"].iterdir()}
    r = run_main(capsys, "--tarball", prepared["tgz"], "--dest", prepared["bin"], "--work-dir", prepared["work"],
                   "--bpe-tokens", BPE_TOKENS, "--workers", 1)
    assert r.returncode == 0, r.stderr
    for step in ("extract", "tokenize-train", "clean", "dev-test", "split", "bpe", "binarize"):
        assert f"{step}: reused" in r.stdout
    assert "running" not in r.stdout
    assert {p: p.read_bytes() for p in prepared["bin"].iterdir()} == before


def _tree(d: Path) -> dict:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()
            and not p.name.endswith(".done") and p.name not in ("preprocess.log", "preprocess-output.log")}


@pytest.mark.slow
def test_interrupted_run_is_redone_not_reused(prepared, tmp_path):
    tgz, work, dest = prepared["tgz"], tmp_path / "work", tmp_path / "bin"

    def interrupt_mid_tokenization(msg):
        if msg.startswith("  en: "):  # the German side is written to its temporary file by now
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        prep.prepare(tgz, dest=dest, work=work, bpe_tokens=BPE_TOKENS, workers=1, log=interrupt_mid_tokenization)
    assert (work / "extract.done").exists()
    assert not (work / "tokenize-train.done").exists()
    assert not list(work.rglob("*.tmp-*")) and not (work / "tmp" / "train.tags.de-en.tok.de").exists()
    assert not dest.exists()

    # A process killed between renaming its outputs and writing <step>.done: the step is redone.
    log: list[str] = []
    prep.prepare(tgz, dest=dest, work=work, bpe_tokens=BPE_TOKENS, workers=1, log=log.append)
    assert "extract: reused (12 files extracted)" in log and "tokenize-train: running" in log
    clean_de = work / "tmp" / "train.tags.de-en.de"
    good = clean_de.read_bytes()
    (work / "clean.done").unlink()
    clean_de.write_bytes(good[: len(good) // 2])  # half-written
    log.clear()
    prep.prepare(tgz, dest=dest, work=work, bpe_tokens=BPE_TOKENS, workers=1, log=log.append)
    assert "clean: running" in log and "tokenize-train: reused" in " ".join(log)
    assert clean_de.read_bytes() == good
    # The result equals the uninterrupted run's, byte for byte.
    assert _tree(work / "tmp") == _tree(prepared["work"] / "tmp")
    assert _tree(work / "tokenized") == _tree(prepared["work"] / "tokenized")
    assert _tree(dest) == _tree(prepared["bin"])  # fairseq's own logs (they name the folders) left out


def test_missing_tarball_is_a_clear_error(tmp_path, capsys):
    r = run_main(capsys, "--tarball", tmp_path / "nope.tgz", "--dest", tmp_path / "bin", "--work-dir", tmp_path / "work")
    assert r.returncode == 2
    assert "--tarball" in r.stderr and "no such file" in r.stderr and prep.ARCHIVE_URL in r.stderr
    assert not (tmp_path / "bin").exists() and not (tmp_path / "work").exists()


def test_offline_without_tarball_says_how_to_get_it(tmp_path, capsys):
    # Port 9 (discard) on localhost: the connection is refused at once, as on an offline machine.
    r = run_main(capsys, "--url", "http://127.0.0.1:9/de-en.tgz", "--dest", tmp_path / "bin", "--work-dir", tmp_path / "work")
    assert r.returncode == 2
    assert "could not download" in r.stderr and "offline" in r.stderr and "--tarball" in r.stderr
    assert f"wget {prep.ARCHIVE_URL}" in r.stderr
    assert not (tmp_path / "bin").exists()
    assert not list((tmp_path / "work").rglob("*.tgz*")) if (tmp_path / "work").exists() else True


@pytest.mark.parametrize("kind", ["garbage", "truncated", "missing-member"])
def test_corrupt_or_wrong_archive(tmp_path, kind, capsys):
    tgz = tmp_path / "de-en.tgz"
    if kind == "garbage":
        tgz.write_bytes(b"this is not a tar archive\n" * 100)
        expect = "is not a readable .tgz archive"
    elif kind == "truncated":
        data = write_archive(tmp_path / "full.tgz").read_bytes()
        tgz.write_bytes(data[: len(data) // 2])
        expect = "corrupt"
    else:
        write_archive(tgz, omit=("de-en/IWSLT14.TED.tst2012.de-en.en.xml",))
        expect = "missing member(s) de-en/IWSLT14.TED.tst2012.de-en.en.xml"
    r = run_main(capsys, "--tarball", tgz, "--dest", tmp_path / "bin", "--work-dir", tmp_path / "work")
    assert r.returncode == 2, r.stdout
    assert expect in r.stderr, r.stderr
    assert not (tmp_path / "bin").exists()
    assert not list((tmp_path / "work").rglob("*.done")) if (tmp_path / "work").exists() else True
    assert not list(tmp_path.rglob("*.tmp-*"))


@pytest.mark.slow
def test_sentencepiece_alternative(prepared, tmp_path):
    import sentencepiece as spm

    counts = prep.prepare(prepared["tgz"], dest=tmp_path / "bin", work=tmp_path / "work", bpe="sentencepiece",
                          bpe_tokens=300, workers=1, log=lambda m: None)
    info = json.loads((tmp_path / "bin" / "prep-info.json").read_text())
    assert info["remove_bpe"] == "sentencepiece" and counts["splits"]["test"] == 5 * SEGS_PER_SET
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "bin" / "spm.model"))
    pieces = lines(tmp_path / "work" / "tokenized" / "test.en")
    assert [sp.decode(p.split()) for p in pieces] == expected_test_en()


# -- the text steps one by one -------------------------------------------------------------------


def test_clean_corpus_thresholds():
    def words(n):
        return " ".join(["w"] * n)

    src = [words(2), words(2), words(175), words(176), "", "a  |b", words(3)]
    tgt = [words(3), words(4), words(175), words(176), "x", "a b", "x" * 1001 + " y z"]
    s, t, dropped = prep.clean_corpus(src, tgt)
    assert s == [words(2), words(175), "a b"] and t == [words(3), words(175), "a b"]  # "|" removed, spaces collapsed
    assert dropped == {"empty": 1, "length": 1, "ratio": 1, "long_word": 1}
    with pytest.raises(prep.PrepareError, match="different line counts"):
        prep.clean_corpus(["a"], [])


def test_xml_steps_match_the_recipe():
    raw = ["<url>http://x</url>", "<keywords>a, b</keywords>", "<talkid>3</talkid>", "<title>A: B</title>",
           "<description>C</description>", "<speaker>D</speaker>", "Text <url> inline", "Plain"]
    assert prep.strip_train_tags(raw) == ["A: B", "C", "<speaker>D</speaker>", "Plain"]
    xml = ['<doc docid="1">', '<seg id="12">  It’s  here. </seg>', "<title>x</title>", '<seg id="13"></seg>']
    assert prep.seg_lines(xml) == ["It's  here.", ""]


def test_tokenizer_splits_the_final_period_like_tokenizer_perl():
    assert prep.tokenize_lines(["Geschichte 1.", "Am 1. Mai."], "de") == ["Geschichte 1 .", "Am 1. Mai ."]
    assert prep.tokenize_lines(["   "], "en") == ["   "]  # blank lines pass unchanged


def test_bad_arguments(capsys):
    with pytest.raises(ValueError, match="--bpe must be"):
        prep.prepare(Path("x.tgz"), bpe="wordpiece")
    with pytest.raises(ValueError, match="--bpe-tokens must be a positive integer"):
        prep.prepare(Path("x.tgz"), bpe_tokens=0)
    with pytest.raises(SystemExit) as e:
        prep.main(["--bpe-tokens", "-3"])
    assert e.value.code == 2 and "--bpe-tokens must be >= 1" in capsys.readouterr().err


def test_dest_not_ours_is_refused(tmp_path):
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "precious.txt").write_text("keep me")
    with pytest.raises(prep.PrepareError, match="--dest .* was not written by this script"):
        prep.prepare(tmp_path / "x.tgz", dest=tmp_path / "bin", work=tmp_path / "work")
    assert (tmp_path / "bin" / "precious.txt").read_text() == "keep me"


def test_required_members_match_fairseqs_recipe():
    recipe = Path(sys.prefix) / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / \
        "site-packages" / "fairseq" / "examples" / "translation" / "prepare-iwslt14.sh"
    if not recipe.exists():
        pytest.skip(f"fairseq's recipe is not installed at {recipe}")
    text = recipe.read_text()
    assert prep.ARCHIVE_URL in text
    assert re.findall(r"\$tmp/(IWSLT14\.TEDX?\.\w+)\.de-en\.\$l", text) == list(TEST_SETS)
    assert "NR%23 == 0" in text and "-ratio 1.5" in text and "1 175" in text and "BPE_TOKENS=10000" in text


@pytest.mark.slow
def test_long_steps_show_progress(prepared):
    # tqdm bars on stderr: tokenization, BPE learning (subword-nmt's own bar over the merges) and
    # application; fairseq-preprocess's log lines are passed on to stdout while it binarizes.
    err, out = prepared["stderr"], prepared["stdout"]
    assert "tokenize de" in err and "tokenize en" in err
    assert f"/{BPE_TOKENS} " in err  # learn_bpe: i/200 merges
    for split in ("train", "valid", "test"):
        assert f"apply subword-nmt to {split}.de" in err
    assert "fairseq-preprocess: [de] Dictionary:" in out and "fairseq-preprocess: [en] " in out


def test_download_shows_bytes_and_keeps_them(tmp_path, capsys):
    import functools
    import http.server
    import threading

    payload = bytes(range(256)) * 2000  # 512,000 bytes
    (tmp_path / "srv").mkdir()
    (tmp_path / "srv" / "de-en.tgz").write_bytes(payload)
    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    handler = functools.partial(Quiet, directory=str(tmp_path / "srv"))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/de-en.tgz"
        logged = []
        dest = prep.download(url, tmp_path / "work" / "de-en.tgz", logged.append)
    finally:
        server.shutdown()
        server.server_close()
    assert dest.read_bytes() == payload
    err = capsys.readouterr().err
    assert "download" in err and "/500k" in err and "B/s" in err, err  # bytes of the total, in KiB
    assert logged == [f"download: {url} -> {dest}"]
