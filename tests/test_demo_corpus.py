"""The embedded demo corpus: reproducible from its generator, in the real archive's layout, and a fair test."""

from __future__ import annotations

import tarfile

from fairseq_asam.iwslt import prepare
from scripts import demo
from studies.demo_corpus import DEMO_DIR, NOUNS, generate_pairs, write_corpus


def test_committed_corpus_is_what_the_generator_writes(tmp_path):
    d = write_corpus(tmp_path)
    committed = sorted(p.name for p in (DEMO_DIR / "de-en").iterdir())
    assert sorted(p.name for p in d.iterdir()) == committed
    for name in committed:
        assert (d / name).read_bytes() == (DEMO_DIR / "de-en" / name).read_bytes(), name


def test_layout_matches_the_archive_and_packs_reproducibly(tmp_path):
    a = demo.pack_archive(DEMO_DIR, tmp_path / "a.tgz")
    b = demo.pack_archive(DEMO_DIR, tmp_path / "b.tgz")
    assert a.read_bytes() == b.read_bytes()  # same bytes -> prepare.py reuses its finished steps
    with tarfile.open(a) as tar:
        names = set(tar.getnames())
    assert set(prepare.REQUIRED_MEMBERS) <= names


def test_pairs_are_varied_and_test_sentences_are_unseen():
    pairs = generate_pairs(8200, 1234)
    train, test = pairs[:8000], pairs[8000:]
    seen = {de for de, _ in train}
    assert len(seen) >= 7990
    assert sum(de in seen for de, _ in test) <= 2  # BLEU measures generalisation, not recall
    assert generate_pairs(50, 1234) == pairs[:50] and generate_pairs(50, 99) != pairs[:50]


def test_grammar_agreement():
    # German case and verb-second / verb-final order, checked on a few fixed draws.
    by_kind = {}
    for de, en in generate_pairs(3000, 5):
        if de.startswith("Heute "):
            by_kind.setdefault("front", (de, en))
        if ", dass " in de:
            by_kind.setdefault("dass", (de, en))
        if " nicht." in de:
            by_kind.setdefault("neg", (de, en))
    de, en = by_kind["front"]
    assert en.startswith("Today ")
    de, en = by_kind["dass"]
    assert " that " in en and de.endswith(".")
    de, en = by_kind["neg"]
    assert "n't " in en
    words = " ".join(de for de, _ in generate_pairs(3000, 5)).split()
    for i, w in enumerate(words[:-1]):
        if w == "den" and words[i + 1][0].isupper():
            nxt = words[i + 1].rstrip(".?,")
            # "den" + noun: a masculine accusative singular or a dative plural (ends in -n or -s).
            assert nxt in {n[0] for n in NOUNS if n[2] == "m"} or nxt.endswith(("n", "s")), (w, nxt)
