"""Benchmark section "hf": one Hugging Face Trainer update, plain AdamW vs ASAM vs one-pass ASAM, and peak memory.

The model is a Marian translation model with the configuration of ``Helsinki-NLP/opus-mt-de-en`` (512-dim,
6+6 layers, 8 heads, 2048 FFN, 58101-token shared vocabulary, 74M parameters), randomly initialised here,
so nothing is downloaded. Every run is its own process (a real ``Seq2SeqTrainer`` / ``ASAMSeq2SeqTrainer``
on random token ids); a callback times each whole update (every micro-batch's forward/backward, both passes
for ASAM, clipping, the optimizer and LR scheduler steps) and the process's peak memory is read at exit. The
methods run alternately, round after round, so that a slow spell of a shared machine hits all of them.

    python scripts/benchmark.py --sections hf
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

METHODS = {
    "adamw": {"asam_mode": "none", "asam_rho": None},
    "asam": {"asam_mode": "asam", "asam_rho": 0.2},
    "asam_one_pass": {"asam_mode": "asam", "asam_rho": 0.2, "asam_one_pass": "momentum"},
}

# Helsinki-NLP/opus-mt-de-en's config.json, the values that shape the computation.
OPUS_MT_DE_EN = dict(vocab_size=58101, d_model=512, encoder_layers=6, decoder_layers=6, encoder_attention_heads=8,
                     decoder_attention_heads=8, encoder_ffn_dim=2048, decoder_ffn_dim=2048,
                     max_position_embeddings=512, activation_function="swish", scale_embedding=True,
                     pad_token_id=58100, eos_token_id=0, decoder_start_token_id=58100, dropout=0.1,
                     attention_dropout=0.0, activation_dropout=0.0)
TINY = dict(OPUS_MT_DE_EN, vocab_size=64, d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
            decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, max_position_embeddings=64,
            pad_token_id=63, decoder_start_token_id=63)

# Runs inside each process: one Trainer run, the update times and the peak memory written to a JSON file.
_DRIVER = r"""
import json, resource, sys, time
import torch
from transformers import MarianConfig, MarianMTModel, TrainerCallback
from fairseq_asam.integrations.transformers import ASAMSeq2SeqTrainer, ASAMSeq2SeqTrainingArguments

out_path, spec = sys.argv[1], json.loads(sys.argv[2])
torch.manual_seed(0)
model = MarianMTModel(MarianConfig(**spec["config"]))
g = torch.Generator().manual_seed(1)
n = spec["batch"] * spec["updates"]
V = spec["config"]["vocab_size"] - 1  # below the pad id
data = [{"input_ids": s, "attention_mask": [1] * len(s), "labels": t} for s, t in zip(
    torch.randint(1, V, (n, spec["src_len"]), generator=g).tolist(), torch.randint(1, V, (n, spec["tgt_len"]), generator=g).tolist())]

def collate(ex):
    return {k: torch.tensor([e[k] for e in ex]) for k in ex[0]}

class Timer(TrainerCallback):
    def __init__(self):
        self.seconds = []
    def on_step_begin(self, args, state, control, **kw):
        self.t0 = time.perf_counter()
    def on_step_end(self, args, state, control, **kw):
        self.seconds.append(time.perf_counter() - self.t0)

timer = Timer()
args = ASAMSeq2SeqTrainingArguments(output_dir=spec["out_dir"], use_cpu=True, per_device_train_batch_size=spec["batch"],
    max_steps=spec["updates"], learning_rate=5e-4, warmup_steps=0, max_grad_norm=1.0, report_to=[],
    save_strategy="no", logging_strategy="no", disable_tqdm=True, dataloader_num_workers=0, **spec["method"])
trainer = ASAMSeq2SeqTrainer(model=model, args=args, train_dataset=data, data_collator=collate, callbacks=[timer])
trainer.train()
with open("/proc/self/status") as f:  # VmHWM: this process's own peak (ru_maxrss survives execve)
    hwm = [line for line in f if line.startswith("VmHWM:")]
rec = {"update_seconds": timer.seconds, "n_params": sum(p.numel() for p in model.parameters()),
       "param_bytes": sum(p.numel() * p.element_size() for p in model.parameters()),
       "peak_rss_bytes": int(hwm[0].split()[1]) * 1024 if hwm else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
with open(out_path, "w") as f:
    json.dump(rec, f)
"""


def run_once(method: str, *, config: dict, batch: int, src_len: int, tgt_len: int, updates: int, tmp: Path) -> dict:
    out = tmp / f"rec-{method}-{len(list(tmp.iterdir()))}.json"
    spec = {"config": config, "batch": batch, "src_len": src_len, "tgt_len": tgt_len, "updates": updates,
            "method": METHODS[method], "out_dir": str(tmp / "run")}
    env = dict(os.environ)
    for k in [k for k in env if k.startswith("MALLOC_")]:
        del env[k]  # glibc's default allocator settings, as users run
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    proc = subprocess.run([sys.executable, "-c", _DRIVER, str(out), json.dumps(spec)], capture_output=True,
                          text=True, env=env, cwd=str(REPO))
    if proc.returncode != 0:
        raise RuntimeError(f"Trainer run ({method}) failed:\n{proc.stderr[-4000:]}")
    return json.loads(out.read_text())


def bench_trainer(*, rounds: int = 2, updates: int = 6, warmup: int = 2, quick: bool = False) -> dict:
    """Median seconds per update of each method (median of each run's timed updates, then over rounds),
    ratios to the plain AdamW update, and peak RSS over it in units of the parameters' bytes."""
    config = TINY if quick else OPUS_MT_DE_EN
    shape = dict(batch=4, src_len=8, tgt_len=8) if quick else dict(batch=8, src_len=32, tgt_len=32)
    per: dict[str, list[float]] = {m: [] for m in METHODS}
    mem: dict[str, list[int]] = {m: [] for m in METHODS}
    methods = list(METHODS)
    with tempfile.TemporaryDirectory(prefix="asam-hf-bench-") as d:
        tmp = Path(d)
        for r in range(rounds):
            for m in methods[r % len(methods):] + methods[: r % len(methods)]:
                rec = run_once(m, config=config, updates=updates, tmp=tmp, **shape)
                timed = rec["update_seconds"][warmup:]
                if not timed:
                    raise RuntimeError(f"{m}: only {len(rec['update_seconds'])} updates ran; raise updates")
                per[m].append(statistics.median(timed))
                mem[m].append(rec["peak_rss_bytes"])
                n_params, param_bytes = rec["n_params"], rec["param_bytes"]
    sec = {m: statistics.median(v) for m, v in per.items()}
    peak = {m: min(v) for m, v in mem.items()}
    return {
        "model": "Marian, opus-mt-de-en config" if not quick else "Marian, tiny config",
        "n_params": n_params,
        "param_bytes": param_bytes,
        **shape,
        "seconds_per_update": sec,
        "ratio_to_adamw": {m: s / sec["adamw"] for m, s in sec.items()},
        "peak_rss_bytes": peak,
        "extra_memory_over_adamw_in_param_bytes": {m: (peak[m] - peak["adamw"]) / param_bytes for m in METHODS},
    }
