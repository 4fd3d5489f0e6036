"""docs/transformers.md's fine-tuning example runs as printed, offline: the guide's own block makes the tiny
randomly initialised Marian model and its SentencePiece tokenizer, and the fine-tuning block trains, evaluates
with sacreBLEU on generated translations and prints the logged ASAM values. Nothing is downloaded
(HF_HUB_OFFLINE=1)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")
pytest.importorskip("sentencepiece")
pytest.importorskip("sacrebleu")

from tests.test_readme import python_blocks  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "transformers.md"
MODEL_LINE = 'MODEL = "tiny-marian"  # on your machine: "Helsinki-NLP/opus-mt-de-en"\n'

# Each block runs with its own globals, as tests/test_readme.py runs them; then CHECK runs in the fine-tuning
# block's globals: compute_metrics must decode -100-padded predictions and labels and score a perfect match 100.
RUNNER = r"""
import json, sys
blocks = json.load(sys.stdin)
for code in blocks["run"]:
    scope = {"__name__": "__main__"}
    exec(compile(code, "docs/transformers.md", "exec"), scope)
exec(blocks["check"], scope)
"""
CHECK = r"""
from transformers import EvalPrediction
ids = [e["labels"] for e in encode(valid)]
width = max(map(len, ids)) + 2
padded = np.array([row + [-100] * (width - len(row)) for row in ids])
print(f"perfect BLEU {compute_metrics(EvalPrediction(predictions=padded, label_ids=padded))['bleu']:.1f}")
"""


def blocks_up_to_the_example() -> list[str]:
    run, _ = python_blocks(DOC)
    codes = [b["code"] for b in run]
    found = [i for i, code in enumerate(codes) if MODEL_LINE in code]
    assert len(found) == 1, "docs/transformers.md must hold one example with " + MODEL_LINE
    return codes[: found[0] + 1]


@pytest.mark.slow
def test_the_fine_tuning_example_runs_offline_as_printed(tmp_path):
    codes = blocks_up_to_the_example()
    assert any("MarianMTModel(config).save_pretrained" in code for code in codes[:-1]), "no block makes tiny-marian"
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    proc = subprocess.run([sys.executable, "-c", RUNNER], input=json.dumps({"run": codes, "check": CHECK}),
                          capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = proc.stdout
    assert re.search(r"^valid BLEU \d+\.\d\d$", out, re.M), out
    # 32 pairs, 8 x 2 per update, 2 epochs: 4 updates, each with the second pass.
    assert re.search(r"^step 4: asam_eps_norm 0\.\d+, asam_second_pass_fraction 1\.0$", out, re.M), out
    assert re.search(r"^\[(['\"]).*\1\]$", out, re.M), out  # the translation
    assert "perfect BLEU 100.0" in out, out
    run = tmp_path / "runs" / "opus-mt-de-en-asam"
    assert (run / "checkpoint-2" / "asam.pt").is_file() and (run / "checkpoint-4" / "optimizer.pt").is_file()
    history = json.loads((run / "checkpoint-4" / "trainer_state.json").read_text())["log_history"]
    assert [r["epoch"] for r in history if "eval_bleu" in r][:1] == [1.0]  # evaluated after each epoch
    train_logs = [r for r in history if "loss" in r]
    assert len(train_logs) == 4
    assert all(r["asam_second_pass_fraction"] == 1.0 and 0 < r["asam_eps_norm"] for r in train_logs)
