"""Small files in Multi30k's layout (gzip, one sentence per line) for the corpus tests: the demo grammar's
sentences, cased and punctuated like Multi30k's captions, never Multi30k's own text."""

from __future__ import annotations

import gzip
import hashlib
from pathlib import Path

from studies.demo_corpus import generate_pairs

FILES = {"train": "train", "valid": "val", "test": "test_2016_flickr"}


def _cased(s: str) -> str:
    s = s.strip()
    return (s[:1].upper() + s[1:]).rstrip(".") + "."


def pairs(n: int, seed: int) -> list[tuple[str, str]]:
    return [(_cased(d), _cased(e)) for d, e in generate_pairs(n, seed)]


def write_multi30k(folder: Path, *, n_train: int = 60, n_eval: int = 8, override: dict | None = None) -> dict[str, str]:
    """Write the six .gz files; ``override`` maps a file name to the lines it holds instead. Returns the
    SHA-256 table of what was written (the test's stand-in for Multi30k's known sums)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    sizes = {"train": n_train, "valid": n_eval, "test": n_eval}
    sums = {}
    for i, (split, stem) in enumerate(FILES.items()):
        ps = pairs(sizes[split], seed=11 + i)
        for side, lang in enumerate(("de", "en")):
            name = f"{stem}.{lang}.gz"
            lines = (override or {}).get(name, [p[side] for p in ps])
            data = gzip.compress("".join(x + "\n" for x in lines).encode("utf-8"), mtime=0)
            (folder / name).write_bytes(data)
            sums[name] = hashlib.sha256(data).hexdigest()
    return sums
