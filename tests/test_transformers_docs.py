"""docs/transformers.md's fine-tuning example runs as written, on a tiny local Marian model instead of the
downloaded Helsinki-NLP/opus-mt-de-en: only its ``MODEL = ...`` line is replaced, by a folder this test
fills with a randomly initialised Marian model and a Marian tokenizer (SentencePiece trained here on the
example's own sentences)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")
spm = pytest.importorskip("sentencepiece")

from tests.test_readme import FENCE  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "transformers.md"
MODEL_LINE = 'MODEL = "Helsinki-NLP/opus-mt-de-en"\n'


def example() -> str:
    blocks = [m.group("code") for m in FENCE.finditer("\n" + DOC.read_text(encoding="utf-8"))]
    found = [b for b in blocks if MODEL_LINE in b]
    assert len(found) == 1, "docs/transformers.md must hold one example with " + MODEL_LINE
    return found[0]


def tiny_local_marian(folder: Path, sentences: list[str]) -> None:
    from transformers import MarianConfig, MarianMTModel, MarianTokenizer

    folder.mkdir(parents=True)
    corpus = folder / "corpus.txt"
    corpus.write_text("\n".join(sentences * 20), encoding="utf-8")
    prefix = str(folder / "sp")
    spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=prefix, vocab_size=60, model_type="unigram",
                                   character_coverage=1.0, bos_id=-1, eos_id=-1, unk_id=0, pad_id=-1,
                                   minloglevel=2, hard_vocab_limit=False)
    sp = spm.SentencePieceProcessor(model_file=prefix + ".model")
    vocab = {"</s>": 0, "<unk>": 1}
    for i in range(sp.get_piece_size()):
        vocab.setdefault(sp.id_to_piece(i), len(vocab))
    vocab["<pad>"] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    out = folder / "model"
    MarianTokenizer(source_spm=prefix + ".model", target_spm=prefix + ".model",
                    vocab=str(folder / "vocab.json")).save_pretrained(out)
    cfg = MarianConfig(vocab_size=len(vocab), d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
                       decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, max_position_embeddings=64,
                       pad_token_id=vocab["<pad>"], eos_token_id=0, decoder_start_token_id=vocab["<pad>"],
                       forced_eos_token_id=0)
    MarianMTModel(cfg).save_pretrained(out)


@pytest.mark.slow
def test_the_fine_tuning_example_runs_on_a_tiny_local_marian(tmp_path):
    code = example()
    sentences = re.findall(r'\("([^"]+)", "([^"]+)"\)', code)
    assert len(sentences) >= 3
    tiny_local_marian(tmp_path / "tiny", [s for pair in sentences for s in pair])
    code = code.replace(MODEL_LINE, f"MODEL = {str(tmp_path / 'tiny' / 'model')!r}\n")
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, env=env,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    # 32 pairs, 8 x 2 per update, 2 epochs: 4 updates, each with the second pass; a checkpoint every 2.
    assert re.search(r"^4 updates, 4 with the second pass, last \|\|eps\|\| \d", proc.stdout, re.M), proc.stdout
    run = tmp_path / "runs" / "opus-mt-de-en-asam"
    assert (run / "checkpoint-2" / "asam.pt").is_file() and (run / "checkpoint-4" / "optimizer.pt").is_file()
