"""The embedded demo corpus: synthetic German-English sentence pairs from a small grammar and lexicon.

This is NOT natural text and NOT part of IWSLT'14. It exists so that ``make demo`` can run the whole
IWSLT'14 pipeline (paper Section 5.3: tokenize, clean, BPE, binarize, train Adam / Adam+SAM /
Adam+ASAM, BLEU) with no download, in minutes on a CPU. The grammar covers what makes German to
English non-trivial for a small model: grammatical gender and case (der/den/dem, adjective endings),
verb-second and verb-final word order (perfect tense, modal verbs, subordinate clauses), separable
frequency adverbs, negation with do-support, questions and plural numerals. The lexicon has about
40 nouns, 20 verbs and 15 adjectives; sentences are drawn with a fixed seed, so the files are
reproducible byte for byte.

The files are written in exactly the layout of the real ``de-en.tgz`` (``train.tags.de-en.{de,en}``
with TED-style XML header lines per talk, ``IWSLT14.TED*.de-en.{de,en}.xml`` with ``<seg id="N">``
lines), so the demo goes through the same preparation code as the real data::

    python -m studies.demo_corpus --out data-prep/demo-de-en
"""

from __future__ import annotations

import argparse
import gzip
import io
import os
import random
import sys
import tarfile
from dataclasses import dataclass
from pathlib import Path

# TEST_SETS: the five dev/test files of the real archive, in the recipe's order.
from fairseq_asam.iwslt.prepare import TEST_SETS

__all__ = [
    "DEMO_BPE_TOKENS", "DEMO_DIR", "DEMO_TRAIN_ARGS", "TEST_SETS", "generate_pairs", "pack_archive", "write_corpus",
]

# The committed corpus lives in the repository, not in the installed package.
DEMO_DIR = Path(__file__).resolve().parent.parent / "data-prep" / "demo-de-en"

# A Transformer small enough for 2 CPU cores, and a schedule short enough for a few minutes per
# method: the paper's optimizer settings otherwise (Adam betas 0.9/0.98, inverse_sqrt, wd 1e-4,
# label smoothing 0.1, rho 0.1 / 0.2), with a larger peak lr and a short warm-up because the run
# is a few hundred updates, not tens of thousands.
DEMO_TRAIN_ARGS = [
    "--arch", "transformer",
    "--encoder-embed-dim", "64", "--decoder-embed-dim", "64",
    "--encoder-ffn-embed-dim", "256", "--decoder-ffn-embed-dim", "256",
    "--encoder-layers", "2", "--decoder-layers", "2",
    "--encoder-attention-heads", "4", "--decoder-attention-heads", "4",
    "--dropout", "0.1", "--lr", "3e-3", "--warmup-updates", "100",
    "--max-tokens", "1024", "--num-workers", "0",
    "--log-interval", "25",
    # Validation BLEU for the curves with greedy decoding (the final evaluation uses beam 5), and no
    # extra validation/checkpoint at epoch ends: only every --validate-every updates.
    "--eval-bleu-args", '{"beam": 1, "max_len_a": 1.2, "max_len_b": 10}',
    "--validate-interval", "1000000", "--save-interval", "1000000",
]
DEMO_BPE_TOKENS = 1000  # the synthetic lexicon is small; 10,000 merges would make every word one token

def pack_archive(src: Path, out: Path) -> Path:
    """Pack ``src/de-en/*`` into ``out`` (a .tgz with the member names of the real archive), atomically."""
    src = Path(src)
    files = sorted((src / "de-en").glob("*"))
    if not files:
        raise ValueError(f"no corpus files in {src / 'de-en'}")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
    # Fixed mtimes and order: the same corpus gives the same bytes, so prepare.py's fingerprint
    # (sha256 of the archive) matches and a second demo reuses every finished step.
    with open(tmp, "wb") as raw, gzip.GzipFile(filename="", fileobj=raw, mode="wb", mtime=0) as gz, \
            tarfile.open(fileobj=gz, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for f in files:
            data = f.read_bytes()
            info = tarfile.TarInfo(f"de-en/{f.name}")
            info.size, info.mtime, info.mode = len(data), 0, 0o644
            tar.addfile(info, io.BytesIO(data))
    os.replace(tmp, out)
    return out



# ------------------------------------------------------------------------------------------------
# Lexicon
# ------------------------------------------------------------------------------------------------

# (German singular, German plural, gender, English singular, English plural)
NOUNS = [
    ("Hund", "Hunde", "m", "dog", "dogs"),
    ("Mann", "Männer", "m", "man", "men"),
    ("Lehrer", "Lehrer", "m", "teacher", "teachers"),
    ("Vogel", "Vögel", "m", "bird", "birds"),
    ("Apfel", "Äpfel", "m", "apple", "apples"),
    ("Tisch", "Tische", "m", "table", "tables"),
    ("Brief", "Briefe", "m", "letter", "letters"),
    ("Wagen", "Wagen", "m", "car", "cars"),
    ("Garten", "Gärten", "m", "garden", "gardens"),
    ("Freund", "Freunde", "m", "friend", "friends"),
    ("König", "Könige", "m", "king", "kings"),
    ("Stuhl", "Stühle", "m", "chair", "chairs"),
    ("Ball", "Bälle", "m", "ball", "balls"),
    ("Fisch", "Fische", "m", "fish", "fish"),
    ("Katze", "Katzen", "f", "cat", "cats"),
    ("Frau", "Frauen", "f", "woman", "women"),
    ("Blume", "Blumen", "f", "flower", "flowers"),
    ("Tür", "Türen", "f", "door", "doors"),
    ("Stadt", "Städte", "f", "city", "cities"),
    ("Lampe", "Lampen", "f", "lamp", "lamps"),
    ("Schule", "Schulen", "f", "school", "schools"),
    ("Maus", "Mäuse", "f", "mouse", "mice"),
    ("Straße", "Straßen", "f", "street", "streets"),
    ("Geschichte", "Geschichten", "f", "story", "stories"),
    ("Brücke", "Brücken", "f", "bridge", "bridges"),
    ("Kirche", "Kirchen", "f", "church", "churches"),
    ("Kind", "Kinder", "n", "child", "children"),
    ("Haus", "Häuser", "n", "house", "houses"),
    ("Buch", "Bücher", "n", "book", "books"),
    ("Pferd", "Pferde", "n", "horse", "horses"),
    ("Fenster", "Fenster", "n", "window", "windows"),
    ("Bild", "Bilder", "n", "picture", "pictures"),
    ("Boot", "Boote", "n", "boat", "boats"),
    ("Lied", "Lieder", "n", "song", "songs"),
    ("Mädchen", "Mädchen", "n", "girl", "girls"),
    ("Zimmer", "Zimmer", "n", "room", "rooms"),
    ("Schiff", "Schiffe", "n", "ship", "ships"),
    ("Dorf", "Dörfer", "n", "village", "villages"),
]

ADJECTIVES = [
    ("groß", "big"), ("klein", "small"), ("alt", "old"), ("jung", "young"), ("rot", "red"),
    ("blau", "blue"), ("grün", "green"), ("schnell", "fast"), ("langsam", "slow"), ("schön", "beautiful"),
    ("neu", "new"), ("müde", "tired"), ("glücklich", "happy"), ("hungrig", "hungry"), ("laut", "loud"),
]

# German: infinitive, 1sg, 2sg, 3sg, participle; English: base, 3sg, past participle.
VERBS = [
    ("sehen", "sehe", "siehst", "sieht", "gesehen", "see", "sees", "seen"),
    ("finden", "finde", "findest", "findet", "gefunden", "find", "finds", "found"),
    ("kaufen", "kaufe", "kaufst", "kauft", "gekauft", "buy", "buys", "bought"),
    ("suchen", "suche", "suchst", "sucht", "gesucht", "look for", "looks for", "looked for"),
    ("lieben", "liebe", "liebst", "liebt", "geliebt", "love", "loves", "loved"),
    ("malen", "male", "malst", "malt", "gemalt", "paint", "paints", "painted"),
    ("tragen", "trage", "trägst", "trägt", "getragen", "carry", "carries", "carried"),
    ("hören", "höre", "hörst", "hört", "gehört", "hear", "hears", "heard"),
    ("fangen", "fange", "fängst", "fängt", "gefangen", "catch", "catches", "caught"),
    ("besuchen", "besuche", "besuchst", "besucht", "besucht", "visit", "visits", "visited"),
    ("brauchen", "brauche", "brauchst", "braucht", "gebraucht", "need", "needs", "needed"),
    ("holen", "hole", "holst", "holt", "geholt", "fetch", "fetches", "fetched"),
    ("bauen", "baue", "baust", "baut", "gebaut", "build", "builds", "built"),
    ("zeichnen", "zeichne", "zeichnest", "zeichnet", "gezeichnet", "draw", "draws", "drawn"),
    ("waschen", "wasche", "wäschst", "wäscht", "gewaschen", "wash", "washes", "washed"),
    ("vergessen", "vergesse", "vergisst", "vergisst", "vergessen", "forget", "forgets", "forgotten"),
    ("öffnen", "öffne", "öffnest", "öffnet", "geöffnet", "open", "opens", "opened"),
    ("verkaufen", "verkaufe", "verkaufst", "verkauft", "verkauft", "sell", "sells", "sold"),
    ("rufen", "rufe", "rufst", "ruft", "gerufen", "call", "calls", "called"),
    ("beobachten", "beobachte", "beobachtest", "beobachtet", "beobachtet", "watch", "watches", "watched"),
]

# Subject pronouns: German, English, person key (1sg, 2sg, 3sg, 1pl, 3pl).
PRONOUNS = [
    ("ich", "I", "1sg"), ("du", "you", "2sg"), ("er", "he", "3sg"), ("sie", "she", "3sg"),
    ("wir", "we", "1pl"), ("sie", "they", "3pl"),
]

MODALS = {  # German forms by person, English phrase (3sg, other)
    "wollen": ({"1sg": "will", "2sg": "willst", "3sg": "will", "1pl": "wollen", "3pl": "wollen"},
               ("wants to", "want to")),
    "können": ({"1sg": "kann", "2sg": "kannst", "3sg": "kann", "1pl": "können", "3pl": "können"},
               ("can", "can")),
    "müssen": ({"1sg": "muss", "2sg": "musst", "3sg": "muss", "1pl": "müssen", "3pl": "müssen"},
               ("must", "must")),
}
HABEN = {"1sg": "habe", "2sg": "hast", "3sg": "hat", "1pl": "haben", "3pl": "haben"}

# Dative prepositions; "in dem" contracts to "im" and "an dem" to "am" as in written German.
PREPOSITIONS = [
    ("mit", "with"), ("in", "in"), ("neben", "next to"), ("hinter", "behind"), ("vor", "in front of"),
    ("unter", "under"), ("auf", "on"), ("an", "at"),
]
NUMBERS = [("zwei", "two"), ("drei", "three"), ("vier", "four"), ("fünf", "five"), ("viele", "many")]
FRONT_ADVERBS = [("Heute", "today"), ("Jetzt", "now"), ("Morgen", "tomorrow")]
MID_ADVERBS = [("oft", "often"), ("manchmal", "sometimes"), ("nie", "never")]
THINK = [  # (German main clause, English main clause)
    ("Ich glaube", "I think"), ("Er sagt", "he says"), ("Wir wissen", "we know"), ("Sie hofft", "she hopes"),
    ("Du siehst", "you see"),
]

DEF_ART = {
    "nom": {"m": "der", "f": "die", "n": "das", "pl": "die"},
    "acc": {"m": "den", "f": "die", "n": "das", "pl": "die"},
    "dat": {"m": "dem", "f": "der", "n": "dem", "pl": "den"},
}
INDEF_ART = {
    "nom": {"m": "ein", "f": "eine", "n": "ein"},
    "acc": {"m": "einen", "f": "eine", "n": "ein"},
    "dat": {"m": "einem", "f": "einer", "n": "einem"},
}


def _weak(case: str, g: str) -> str:
    """Adjective ending after a definite article."""
    if g == "pl" or case == "dat" or (case == "acc" and g == "m"):
        return "en"
    return "e"


def _mixed(case: str, g: str) -> str:
    """Adjective ending after an indefinite article."""
    if case == "nom":
        return {"m": "er", "f": "e", "n": "es"}[g]
    if case == "acc":
        return {"m": "en", "f": "e", "n": "es"}[g]
    return "en"


def _strong_pl(case: str) -> str:
    return "en" if case == "dat" else "e"


def _adj_stem(a: str) -> str:
    return a[:-1] if a.endswith("e") else a  # müde + e -> müde


def _dat_pl(pl: str) -> str:
    return pl if pl.endswith(("n", "s")) else pl + "n"


@dataclass
class NP:
    de: str
    en: str
    person: str  # "3sg" or "3pl"


def _noun_phrase(rng: random.Random, case: str, *, definite_only: bool = False) -> NP:
    de_sg, de_pl, g, en_sg, en_pl = rng.choice(NOUNS)
    adj = rng.choice(ADJECTIVES) if rng.random() < 0.45 else None
    kind = "def" if definite_only else rng.choices(["def", "indef", "num"], weights=[6, 3, 2])[0]
    if kind == "num":
        num_de, num_en = rng.choice(NUMBERS)
        if num_de == "viele" and case == "dat":
            num_de = "vielen"  # "viele" declines like an adjective; the numerals do not
        noun = _dat_pl(de_pl) if case == "dat" else de_pl
        words_de = [num_de] + ([_adj_stem(adj[0]) + _strong_pl(case)] if adj else []) + [noun]
        words_en = [num_en] + ([adj[1]] if adj else []) + [en_pl]
        return NP(" ".join(words_de), " ".join(words_en), "3pl")
    plural = kind == "def" and rng.random() < 0.25
    if plural:
        noun = _dat_pl(de_pl) if case == "dat" else de_pl
        words_de = [DEF_ART[case]["pl"]] + ([_adj_stem(adj[0]) + _weak(case, "pl")] if adj else []) + [noun]
        words_en = ["the"] + ([adj[1]] if adj else []) + [en_pl]
        return NP(" ".join(words_de), " ".join(words_en), "3pl")
    if kind == "def":
        art, ending, art_en = DEF_ART[case][g], _weak(case, g), "the"
    else:
        art, ending = INDEF_ART[case][g], _mixed(case, g)
        first = adj[1] if adj else en_sg
        art_en = "an" if first[0] in "aeiou" else "a"
    words_de = [art] + ([_adj_stem(adj[0]) + ending] if adj else []) + [de_sg]
    words_en = [art_en] + ([adj[1]] if adj else []) + [en_sg]
    return NP(" ".join(words_de), " ".join(words_en), "3sg")


def _subject(rng: random.Random) -> NP:
    if rng.random() < 0.3:
        de, en, person = rng.choice(PRONOUNS)
        return NP(de, en, person)
    return _noun_phrase(rng, "nom")


def _pp(rng: random.Random) -> tuple[str, str]:
    prep_de, prep_en = rng.choice(PREPOSITIONS)
    np = _noun_phrase(rng, "dat")
    de = f"{prep_de} {np.de}"
    for long, short in (("in dem ", "im "), ("an dem ", "am ")):
        if de.startswith(long):
            de = short + de[len(long):]
    return de, f"{prep_en} {np.en}"


def _de_verb(verb, person: str) -> str:
    inf, s1, s2, s3 = verb[:4]
    return {"1sg": s1, "2sg": s2, "3sg": s3, "1pl": inf, "3pl": inf}[person]


def _en_verb(verb, person: str) -> str:
    return verb[6] if person == "3sg" else verb[5]


def _en_do(person: str) -> str:
    return "does" if person == "3sg" else "do"


def _sentence(rng: random.Random) -> tuple[str, str]:
    """One (German, English) pair, both un-tokenized, with capitals and punctuation."""
    s = _subject(rng)
    verb = rng.choice(VERBS)
    kind = rng.choices(
        ["present", "perfect", "modal", "front_adv", "mid_adv", "negation", "subordinate", "question"],
        weights=[5, 3, 3, 2, 2, 2, 2, 2],
    )[0]
    o = _noun_phrase(rng, "acc", definite_only=kind == "negation")
    pp = _pp(rng) if rng.random() < 0.35 and kind != "question" else None
    pp_de = f" {pp[0]}" if pp else ""
    pp_en = f" {pp[1]}" if pp else ""
    if kind == "present":
        de = f"{s.de} {_de_verb(verb, s.person)} {o.de}{pp_de}."
        en = f"{s.en} {_en_verb(verb, s.person)} {o.en}{pp_en}."
    elif kind == "perfect":
        de = f"{s.de} {HABEN[s.person]} {o.de}{pp_de} {verb[4]}."
        en = f"{s.en} {'has' if s.person == '3sg' else 'have'} {verb[7]} {o.en}{pp_en}."
    elif kind == "modal":
        forms, (en3, en_other) = MODALS[rng.choice(sorted(MODALS))]
        de = f"{s.de} {forms[s.person]} {o.de}{pp_de} {verb[0]}."
        en = f"{s.en} {en3 if s.person == '3sg' else en_other} {verb[5]} {o.en}{pp_en}."
    elif kind == "front_adv":
        adv_de, adv_en = rng.choice(FRONT_ADVERBS)
        # Verb second: the adverb takes the first position and the subject moves after the verb.
        de = f"{adv_de} {_de_verb(verb, s.person)} {s.de} {o.de}{pp_de}."
        en = f"{adv_en} {s.en} {_en_verb(verb, s.person)} {o.en}{pp_en}."
    elif kind == "mid_adv":
        adv_de, adv_en = rng.choice(MID_ADVERBS)
        de = f"{s.de} {_de_verb(verb, s.person)} {adv_de} {o.de}{pp_de}."
        en = f"{s.en} {adv_en} {_en_verb(verb, s.person)} {o.en}{pp_en}."
    elif kind == "negation":
        de = f"{s.de} {_de_verb(verb, s.person)} {o.de}{pp_de} nicht."
        neg = "doesn't" if s.person == "3sg" else "don't"
        en = f"{s.en} {neg} {verb[5]} {o.en}{pp_en}."
    elif kind == "subordinate":
        main_de, main_en = rng.choice(THINK)
        # Verb final in the "dass" clause.
        de = f"{main_de}, dass {s.de} {o.de}{pp_de} {_de_verb(verb, s.person)}."
        en = f"{main_en} that {s.en} {_en_verb(verb, s.person)} {o.en}{pp_en}."
    else:
        de = f"{_de_verb(verb, s.person)} {s.de} {o.de}?"
        en = f"{_en_do(s.person)} {s.en} {verb[5]} {o.en}?"
    return _capitalize(de), _capitalize(en)


def _capitalize(text: str) -> str:
    return text[0].upper() + text[1:]


def generate_pairs(n: int, seed: int) -> list[tuple[str, str]]:
    """n (German, English) sentence pairs drawn with a fixed seed."""
    rng = random.Random(seed)
    return [_sentence(rng) for _ in range(n)]


# ------------------------------------------------------------------------------------------------
# Writing the files in the layout of de-en.tgz
# ------------------------------------------------------------------------------------------------

_SPEAKERS = ["Anna Berger", "Jonas Keller", "Maria Vogt", "Felix Braun", "Lena Wolf", "Paul Richter"]


def _talk_header(talk_id: int, lang: str) -> list[str]:
    """The header lines of one talk in train.tags.de-en.* (the real files have the same tags)."""
    np_de = _noun_phrase(random.Random(talk_id), "nom", definite_only=True)
    title = _capitalize(np_de.de) if lang == "de" else _capitalize(np_de.en)
    speaker = _SPEAKERS[talk_id % len(_SPEAKERS)]
    desc = "Synthetische Geschichte" if lang == "de" else "Synthetic story"
    return [
        f"<url>http://www.ted.com/talks/lang/{lang}/demo_talk_{talk_id}.html</url>",
        "<keywords>talks, demo, synthetic</keywords>",
        f"<speaker>{speaker}</speaker>",
        f"<talkid>{talk_id}</talkid>",
        f"<title>{speaker}: {title}</title>",
        f"<description>{desc} {talk_id}.</description>",
    ]


def train_tags_lines(pairs, lang: str, talk_size: int, first_talk_id: int = 1) -> list[str]:
    """train.tags.de-en.<lang>: talks of ``talk_size`` sentences, each after its XML header lines."""
    side = 0 if lang == "de" else 1
    out = []
    for start in range(0, len(pairs), talk_size):
        out += _talk_header(first_talk_id + start // talk_size, lang)
        out += [p[side] for p in pairs[start : start + talk_size]]
    return out


def xml_lines(pairs, lang: str, set_name: str, talk_size: int, first_talk_id: int) -> list[str]:
    """IWSLT14.TED*.de-en.<lang>.xml: <mteval> with one <doc> per talk and one <seg id="N"> per sentence."""
    side = 0 if lang == "de" else 1
    setid = "iwslt2014-" + set_name.split(".")[-1]
    if lang == "de":
        head = [f'<srcset setid="{setid}" srclang="german">']
        tail = ["</srcset>"]
    else:
        head = [f'<refset setid="{setid}" srclang="german" trglang="english" refid="ref">']
        tail = ["</refset>"]
    out = ['<?xml version="1.0" encoding="UTF-8"?>', "<mteval>"] + head
    seg = 0
    for start in range(0, len(pairs), talk_size):
        talk = first_talk_id + start // talk_size
        out.append(f'<doc docid="{talk}" genre="lectures">')
        out += [line for line in _talk_header(talk, lang) if not line.startswith("<speaker>")]
        for p in pairs[start : start + talk_size]:
            seg += 1
            out.append(f'<seg id="{seg}"> {p[side]} </seg>')
        out.append("</doc>")
    return out + tail + ["</mteval>"]


def _write(path: Path, lines: list[str]) -> None:
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    tmp.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    os.replace(tmp, path)


def write_corpus(out: Path, *, n_train: int = 8000, n_test_per_set: int = 40, seed: int = 1234,
                 talk_size: int = 100) -> Path:
    """Write ``<out>/de-en/`` in the layout of the real archive; returns that folder."""
    if n_train < 1 or n_test_per_set < 1 or talk_size < 1:
        raise ValueError("n_train, n_test_per_set and talk_size must be >= 1")
    pairs = generate_pairs(n_train + n_test_per_set * len(TEST_SETS), seed)
    train, rest = pairs[:n_train], pairs[n_train:]
    d = Path(out) / "de-en"
    d.mkdir(parents=True, exist_ok=True)
    for lang in ("de", "en"):
        _write(d / f"train.tags.de-en.{lang}", train_tags_lines(train, lang, talk_size))
    talk_id = 10000
    for i, name in enumerate(TEST_SETS):
        chunk = rest[i * n_test_per_set : (i + 1) * n_test_per_set]
        for lang in ("de", "en"):
            _write(d / f"{name}.de-en.{lang}.xml", xml_lines(chunk, lang, name, talk_size=40, first_talk_id=talk_id))
        talk_id += 100
    _write(d / "README", [
        "Synthetic German-English demo corpus for fairseq-asam (make demo).",
        "Generated by studies/demo_corpus.py from a small grammar and lexicon, "
        f"seed {seed}; not natural text, not IWSLT data.",
        "Layout and formats follow the IWSLT'14 de-en.tgz archive used by fairseq's prepare-iwslt14.sh.",
    ])
    return d


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=DEMO_DIR, help="folder that receives de-en/ (default: %(default)s)")
    ap.add_argument("--train-pairs", type=int, default=8000, help="training pairs (default: %(default)s)")
    ap.add_argument("--test-pairs", type=int, default=40, help="pairs in each of the 5 dev/test files (default: %(default)s)")
    ap.add_argument("--seed", type=int, default=1234, help="random seed (default: %(default)s)")
    args = ap.parse_args(argv)
    if args.train_pairs < 1:
        ap.error(f"--train-pairs must be >= 1, got {args.train_pairs}")
    if args.test_pairs < 1:
        ap.error(f"--test-pairs must be >= 1, got {args.test_pairs}")
    d = write_corpus(args.out, n_train=args.train_pairs, n_test_per_set=args.test_pairs, seed=args.seed)
    print(f"wrote {d}: {args.train_pairs} training pairs, {len(TEST_SETS)} x {args.test_pairs} dev/test pairs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
