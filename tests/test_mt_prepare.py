"""asam-mt-prepare (issue 25): Multi30k from a folder or a download (SHA-256 checked), generic parallel text,
and every bad corpus refused with one line before anything is written. Never downloads: the download path
is tested against a local HTTP server on 127.0.0.1 serving small files in Multi30k's layout."""

from __future__ import annotations

import functools
import gzip
import http.server
import json
import threading
from pathlib import Path

import pytest
from mt_helpers import FILES, pairs, write_multi30k

from fairseq_asam.iwslt import corpora
from fairseq_asam.iwslt.prepare import PrepareError


def test_the_known_sums_are_multi30ks_six_files():
    assert set(corpora.MULTI30K_SHA256) == {f"{stem}.{lang}.gz" for stem in FILES.values() for lang in ("de", "en")}
    assert all(len(v) == 64 and int(v, 16) >= 0 for v in corpora.MULTI30K_SHA256.values())
    assert corpora.MULTI30K_SPLITS == {"train": "train", "valid": "val", "test": "test_2016_flickr"}
    assert corpora.MULTI30K_URL == "https://github.com/multi30k/dataset/raw/master/data/task1/raw/"


def _nothing_written(*paths: Path) -> bool:
    return not any(p.exists() for p in paths)


@pytest.fixture
def sums_of(monkeypatch):
    """Make the test's files the 'known' Multi30k files for main(), which uses the module's table."""
    def use(table):
        for k, v in table.items():
            monkeypatch.setitem(corpora.MULTI30K_SHA256, k, v)
    return use


@pytest.mark.parametrize("case", ["missing", "checksum", "line_counts", "empty"])
def test_bad_multi30k_folder_is_refused_in_one_line_before_anything_is_written(tmp_path, case, sums_of, capsys):
    src = tmp_path / "m30k"
    override = {"line_counts": {"val.en.gz": [p[1] for p in pairs(7, 12)]},
                "empty": {"test_2016_flickr.de.gz": [], "test_2016_flickr.en.gz": []}}.get(case)
    sums = write_multi30k(src, override=override)
    if case == "missing":
        (src / "train.en.gz").unlink()
    sums_of(sums)
    if case == "checksum":
        (src / "val.de.gz").write_bytes(gzip.compress(b"Ein anderer Satz.\n" * 8))
    dest, work = tmp_path / "bin", tmp_path / "work"
    rc = corpora.main(["--corpus", "multi30k", "--from-dir", str(src), "--dest", str(dest), "--work-dir", str(work)])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and err.startswith("asam-mt-prepare: error: ")
    assert {"missing": "train.en.gz is missing", "checksum": "val.de.gz: SHA-256",
            "line_counts": "has 8 lines but", "empty": "an empty split"}[case] in err
    assert _nothing_written(dest, work)


@pytest.mark.parametrize("case", ["missing", "line_counts", "empty_split"])
def test_bad_text_corpus_is_refused_before_anything_is_written(tmp_path, case, capsys):
    d = tmp_path / "c"
    d.mkdir()
    for split, n in (("train", 10), ("dev", 3), ("test", 3)):
        ps = pairs(n, 3)
        (d / f"{split}.de").write_text("".join(p[0] + "\n" for p in ps), encoding="utf-8")
        (d / f"{split}.en").write_text("".join(p[1] + "\n" for p in ps), encoding="utf-8")
    if case == "missing":
        (d / "dev.en").unlink()
    elif case == "line_counts":
        (d / "train.en").write_text("Only one.\n", encoding="utf-8")
    else:
        (d / "test.de").write_text("\n\n\n", encoding="utf-8")
    dest, work = tmp_path / "bin", tmp_path / "work"
    rc = corpora.main(["--corpus", "text", "--train", str(d / "train"), "--valid", str(d / "dev"), "--test",
                       str(d / "test"), "--dest", str(dest), "--work-dir", str(work)])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1
    assert {"missing": "dev.en: no such file", "line_counts": "has 10 lines but",
            "empty_split": "an empty split"}[case] in err
    assert _nothing_written(dest, work)


def test_iwslt14_is_the_old_command(tmp_path, capsys):
    rc = corpora.main(["--corpus", "iwslt14", "--tarball", str(tmp_path / "nope.tgz"), "--dest", str(tmp_path / "b")])
    err = capsys.readouterr().err
    assert rc == 2 and "asam-iwslt-prepare: error: --tarball" in err and "no such file" in err
    assert not (tmp_path / "b").exists()


class _Handler(http.server.SimpleHTTPRequestHandler):
    truncate: set = set()

    def log_message(self, *a):  # quiet
        pass

    def do_GET(self):
        name = self.path.rsplit("/", 1)[-1]
        f = Path(self.directory) / name
        if not f.is_file():
            self.send_error(404)
            return
        data = f.read_bytes()
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        # a connection that closes early: the header promised more bytes than come
        self.wfile.write(data[: len(data) // 2] if name in self.truncate else data)


@pytest.fixture
def server(tmp_path):
    root = tmp_path / "served"
    root.mkdir()
    handler = type("H", (_Handler,), {"truncate": set()})
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(handler, directory=str(root)))
    t = threading.Thread(target=httpd.serve_forever, daemon=True)
    t.start()
    yield root, f"http://127.0.0.1:{httpd.server_address[1]}/data/task1/raw/", handler
    httpd.shutdown()
    httpd.server_close()


@pytest.mark.slow
def test_download_checks_every_file_and_leaves_nothing_that_looks_finished(server, tmp_path):
    root, url, handler = server
    sums = write_multi30k(root)
    orig = tmp_path / "orig"
    log: list[str] = []
    # a wrong checksum: refused, and no file under the final name (nor a temporary one) is left
    bad = dict(sums, **{"val.en.gz": "0" * 64})
    with pytest.raises(PrepareError, match="val.en.gz: SHA-256 .* is not the expected 0{64}"):
        corpora.fetch_multi30k(None, orig, url=url, sums=bad, log=log.append)
    assert not (orig / "val.en.gz").exists() and not list(orig.glob("*.tmp-*"))
    # a partial download (the connection closes early): refused the same way
    handler.truncate.add("test_2016_flickr.de.gz")
    with pytest.raises(PrepareError, match="closed after"):
        corpora.fetch_multi30k(None, orig, url=url, sums=sums, log=log.append)
    assert not (orig / "test_2016_flickr.de.gz").exists() and not list(orig.glob("*.tmp-*"))
    # the good files: downloaded, checked, kept; a rerun reuses them without asking the server
    handler.truncate.clear()
    assert corpora.fetch_multi30k(None, orig, url=url, sums=sums, log=log.append) == orig
    assert {f.name: corpora.P._sha256(f) for f in orig.iterdir()} == sums
    for f in root.iterdir():
        f.unlink()
    log.clear()
    corpora.fetch_multi30k(None, orig, url=url, sums=sums, log=log.append)
    assert len([m for m in log if m.startswith("download: reusing")]) == 6


@pytest.mark.slow
def test_offline_folder_prepared_cased_with_raw_references(tmp_path, sums_of, warm_launches):
    src = tmp_path / "m30k"
    sums_of(write_multi30k(src))
    dest, work = tmp_path / "bin", tmp_path / "work"
    rc = corpora.main(["--corpus", "multi30k", "--from-dir", str(src), "--dest", str(dest), "--work-dir", str(work),
                       "--bpe-tokens", "200"])
    assert rc == 0
    info = json.loads((dest / "prep-info.json").read_text())
    assert info["counts"]["splits"] == {"train": 60, "valid": 8, "test": 8}
    assert info["cased"] and info["source_lang"] == "de" and info["remove_bpe"] == "subword_nmt"
    for split in ("train", "valid", "test"):
        for lang in ("de", "en"):
            assert (dest / f"{split}.de-en.{lang}.bin").is_file()
    raw_test = (dest / "raw" / "test.en").read_text(encoding="utf-8").splitlines()
    assert raw_test == [p[1] for p in pairs(8, 13)]
    # Moses-tokenized, case kept (the IWSLT'14 recipe's tokenizer, without its lowercasing)
    tok = (work / "tmp" / "test.en").read_text(encoding="utf-8").splitlines()
    assert tok[0] == raw_test[0][:-1] + " ." and tok[0][0].isupper()
    # a rerun reuses every step
    log: list[str] = []
    corpora.prepare_multi30k(src, dest=dest, work=work, bpe_tokens=200, log=log.append)
    assert [m for m in log if m.endswith(": running")] == []
