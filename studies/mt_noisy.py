"""Issue 11, item 4: is there a CPU-sized translation setting where full ASAM beats Adam beyond the
seed-to-seed spread? The demo grammar (fairseq_asam/iwslt/demo_corpus.py) with a smaller training set
and noisy parallel data: a fraction of the English training targets replaced by other training
sentences' English (a misaligned web-crawled corpus). Dev/test sets stay clean. Runs the demo's own
pipeline (prepare, fairseq-train, beam-5 BLEU) for adam and asam over 3 seeds.

    python -m studies.mt_noisy --out /tmp/mt-noisy --train-pairs 2000 --noise 0.35 --max-update 300
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

from fairseq_asam.iwslt import demo, demo_corpus


def write_noisy_corpus(out: Path, *, n_train: int, noise: float, seed: int = 1234) -> Path:
    """demo_corpus.write_corpus, then round(noise * n) English training targets swapped among themselves."""
    d = demo_corpus.write_corpus(out, n_train=n_train, seed=seed)
    pairs = demo_corpus.generate_pairs(n_train, seed)
    rng = random.Random(seed + 1)
    idx = rng.sample(range(n_train), round(noise * n_train))
    shuffled = idx[1:] + idx[:1]  # a cyclic shift: every chosen target goes to another chosen source
    en = [p[1] for p in pairs]
    for i, j in zip(idx, shuffled):
        en[i] = pairs[j][1]
    noisy = [(p[0], e) for p, e in zip(pairs, en)]
    demo_corpus._write(d / "train.tags.de-en.en", demo_corpus.train_tags_lines(noisy, "en", 100))
    return d.parent


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("mt-noisy-out"))
    ap.add_argument("--train-pairs", type=int, default=2000)
    ap.add_argument("--noise", type=float, default=0.35)
    ap.add_argument("--seeds", default="1,2,3")
    ap.add_argument("--max-update", type=int, default=300)
    a = ap.parse_args(argv)
    corpus = write_noisy_corpus(a.out / "corpus", n_train=a.train_pairs, noise=a.noise)
    seeds = [int(s) for s in a.seeds.split(",")]
    res = demo.run_demo(a.out, corpus=corpus, methods=("adam", "asam"), seeds=seeds, max_update=a.max_update,
                        validate_every=a.max_update)
    rows = res.get("rows", [])
    (a.out / "mt_noisy.json").write_text(json.dumps({"args": {k: str(v) for k, v in vars(a).items()},
                                                      "rows": rows}, indent=1, default=str))
    print(res["markdown"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
