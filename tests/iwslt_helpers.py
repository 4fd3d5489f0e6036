"""A small archive in exactly the layout and formats of IWSLT'14's de-en.tgz, for the iwslt tests.

Members (as in the real archive): ``de-en/train.tags.de-en.{de,en}`` (talks, each after its
``<url>``/``<keywords>``/``<speaker>``/``<talkid>``/``<title>``/``<description>`` header lines) and
``de-en/IWSLT14.TED{,X}.<set>.de-en.{de,en}.xml`` (``<mteval>``/``<doc>`` with ``<seg id="N">`` lines).
The sentences come from the demo grammar plus hand-made pairs that the cleaning step must drop or keep.
"""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

from studies.demo_corpus import generate_pairs, xml_lines

TEST_SETS = ("IWSLT14.TED.dev2010", "IWSLT14.TEDX.dev2012", "IWSLT14.TED.tst2010", "IWSLT14.TED.tst2011",
             "IWSLT14.TED.tst2012")
SET_TAG = {"IWSLT14.TED.dev2010": "dev2010", "IWSLT14.TEDX.dev2012": "tedx2012", "IWSLT14.TED.tst2010": "tst2010",
           "IWSLT14.TED.tst2011": "tst2011", "IWSLT14.TED.tst2012": "tst2012"}
SEGS_PER_SET = 3

LONG = " ".join(["wort"] * 180)
# (German, English, what clean-corpus-n.perl -ratio 1.5 ... 1 175 does with it)
SPECIAL = [
    ("Ja.", "Yes, yes, yes, of course it is.", "ratio"),        # 2 vs 10 tokens
    ("   ", "Something is here.", "empty"),                      # a blank German side
    (LONG, LONG, "length"),                                      # 180 tokens > 175
    ("Das ist’s & mehr.", "He doesn't know [this] | that.", "kept"),
    ("Hallo Welt", "Hello there world", "kept"),                 # ratio exactly 1.5: kept
]
SPECIAL_EN_TOKENIZED = {
    "He doesn't know [this] | that.": "he doesn &apos;t know &#91; this &#93; &#124; that .",
    "Hello there world": "hello there world",
}
HEADER_TAGS = ("url", "keywords", "speaker", "talkid", "title", "description")


def header(talk: int, lang: str) -> list[str]:
    title = "Die Geschichte vom Hund" if lang == "de" else "The story of the dog"
    return [
        f"<url>http://www.ted.com/talks/lang/{lang}/talk_{talk}.html</url>",
        "<keywords>talks, test</keywords>",
        f"<speaker>Speaker {talk}</speaker>",
        f"<talkid>{talk}</talkid>",
        f"<title>Speaker {talk}: {title}</title>",
        f"<description>TED Talk {talk}</description>",
    ]


def train_talks(n_pairs: int, seed: int = 7):
    """[(talk id, [(de, en), ...])]: two talks of generated pairs, the special pairs in the middle of the first."""
    pairs = generate_pairs(n_pairs, seed)
    half = n_pairs // 2
    first = pairs[:10] + [(d, e) for d, e, _ in SPECIAL] + pairs[10:half]
    return [(1, first), (2, pairs[half:])]


def test_pairs(name: str) -> list[tuple[str, str]]:
    tag = SET_TAG[name]
    # The curly apostrophe must become ' (the recipe's sed "s/’/'/g" on dev/test).
    return [(f"Marker {tag} Satz {k}.", f"Marker {tag} sentence {k}, it’s fine.") for k in range(1, SEGS_PER_SET + 1)]


def expected_test_en() -> list[str]:
    return [f"marker {SET_TAG[n]} sentence {k} , it &apos;s fine ." for n in TEST_SETS for k in range(1, SEGS_PER_SET + 1)]


def member_texts(n_pairs: int = 60) -> dict[str, str]:
    files = {}
    for lang in ("de", "en"):
        side = 0 if lang == "de" else 1
        lines = []
        for talk, pairs in train_talks(n_pairs):
            lines += header(talk, lang) + [p[side] for p in pairs]
        files[f"de-en/train.tags.de-en.{lang}"] = "".join(x + "\n" for x in lines)
        for i, name in enumerate(TEST_SETS):
            xml = xml_lines(test_pairs(name), lang, name, talk_size=2, first_talk_id=100 + 10 * i)
            files[f"de-en/{name}.de-en.{lang}.xml"] = "".join(x + "\n" for x in xml)
    files["de-en/README"] = "test archive\n"
    return files


def write_archive(path: Path, *, n_pairs: int = 60, omit: tuple[str, ...] = ()) -> Path:
    """Write the .tgz; ``omit`` leaves members out (to test the error naming them)."""
    with tarfile.open(path, "w:gz") as tar:
        dirinfo = tarfile.TarInfo("de-en")
        dirinfo.type, dirinfo.mode = tarfile.DIRTYPE, 0o755
        tar.addfile(dirinfo)
        for name, text in member_texts(n_pairs).items():
            if name in omit:
                continue
            data = text.encode("utf-8")
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), 0o644
            tar.addfile(info, io.BytesIO(data))
    return path
