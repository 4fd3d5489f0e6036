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

import statistics
import tempfile
from pathlib import Path

from .trainer_runs import rotated, run_driver, update_times

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

# Runs inside one process: Trainer runs of the methods named in spec["order"], one after the other (the
# model reset to the same initial weights before each), each update timed; the process's peak memory.
_DRIVER = r"""
import json, resource, sys, time
import torch
from transformers import MarianConfig, MarianMTModel, TrainerCallback
from fairseq_asam.integrations.transformers import ASAMSeq2SeqTrainer, ASAMSeq2SeqTrainingArguments

out_path, spec = sys.argv[1], json.loads(sys.argv[2])
heap_peak = [0]
if spec.get("heap_sampling"):
    # The bytes glibc's malloc has handed out and not had back (mallinfo2: uordblks + hblkhd), sampled every
    # millisecond by a thread: the live allocations, without the freed memory the allocator keeps resident.
    import ctypes, ctypes.util, threading
    class _MallInfo2(ctypes.Structure):
        _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                   "fsmblks", "uordblks", "fordblks", "keepcost")]
    _libc = ctypes.CDLL(ctypes.util.find_library("c"))
    _libc.mallinfo2.restype = _MallInfo2
    def _sample():
        while True:
            m = _libc.mallinfo2()
            heap_peak[0] = max(heap_peak[0], m.uordblks + m.hblkhd)
            time.sleep(0.001)
    threading.Thread(target=_sample, daemon=True).start()
if spec["threads"]:
    torch.set_num_threads(spec["threads"])
torch.manual_seed(0)
model = MarianMTModel(MarianConfig(**spec["config"]))
initial = {k: v.clone() for k, v in model.state_dict().items()}
g = torch.Generator().manual_seed(1)
n = spec["batch"] * spec["updates"]
V = spec["config"]["vocab_size"] - 1  # below the pad id
data = [{"input_ids": s, "attention_mask": [1] * len(s), "labels": t} for s, t in zip(
    torch.randint(1, V, (n, spec["src_len"]), generator=g).tolist(), torch.randint(1, V, (n, spec["tgt_len"]), generator=g).tolist())]

def collate(ex):
    return {k: torch.tensor([e[k] for e in ex]) for k in ex[0]}

class Timer(TrainerCallback):
    # Wall time, and this process's CPU time: on a machine shared with other jobs the CPU time of a
    # one-thread process is the work done, while wall time also holds the waits for a core.
    def __init__(self):
        self.seconds, self.cpu_seconds = [], []
    def on_step_begin(self, args, state, control, **kw):
        self.t0, self.c0 = time.perf_counter(), time.process_time()
    def on_step_end(self, args, state, control, **kw):
        self.seconds.append(time.perf_counter() - self.t0)
        self.cpu_seconds.append(time.process_time() - self.c0)

runs = []
for method in spec["order"]:
    model.load_state_dict(initial)
    timer = Timer()
    args = ASAMSeq2SeqTrainingArguments(output_dir=spec["out_dir"], use_cpu=True, per_device_train_batch_size=spec["batch"],
        max_steps=spec["updates"], learning_rate=5e-4, warmup_steps=0, max_grad_norm=1.0, report_to=[],
        save_strategy="no", logging_strategy="no", disable_tqdm=True, dataloader_num_workers=0, **spec["methods"][method])
    trainer = ASAMSeq2SeqTrainer(model=model, args=args, train_dataset=data, data_collator=collate, callbacks=[timer])
    trainer.train()
    runs.append({"method": method, "update_seconds": timer.seconds, "update_cpu_seconds": timer.cpu_seconds})
    del trainer
with open("/proc/self/status") as f:  # VmHWM: this process's own peak (ru_maxrss survives execve)
    hwm = [line for line in f if line.startswith("VmHWM:")]
rec = {"runs": runs, "n_params": sum(p.numel() for p in model.parameters()),
       "param_bytes": sum(p.numel() * p.element_size() for p in model.parameters()),
       "peak_rss_bytes": int(hwm[0].split()[1]) * 1024 if hwm else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
       "peak_heap_in_use_bytes": heap_peak[0] or None}
with open(out_path, "w") as f:
    json.dump(rec, f)
"""


def run_process(order: list[str], *, config: dict, batch: int, src_len: int, tgt_len: int, updates: int,
                tmp: Path, threads: int | None = None, heap_sampling: bool = False) -> dict:
    spec = {"config": config, "batch": batch, "src_len": src_len, "tgt_len": tgt_len, "updates": updates,
            "methods": METHODS, "order": order, "out_dir": str(tmp / "run"), "threads": threads,
            "heap_sampling": heap_sampling}
    return run_driver(_DRIVER, spec, tmp, what=f"Trainer runs {order}")


def bench_trainer(*, rounds: int = 3, updates: int = 4, warmup: int = 1, quick: bool = False,
                  memory: bool = True, memory_reps: int = 3, threads: int | None = 1, batch: int = 16,
                  src_len: int = 64, tgt_len: int = 64) -> dict:
    """Seconds per update of each method and ratios to the plain AdamW update: one process runs the methods in
    turn, ``rounds`` times (rotating the order), ``updates`` each; the median over the timed updates of all
    rounds, of wall time and of the process's CPU time (``threads`` torch threads; 1 by default, so that the
    CPU time is the work done even when other jobs share the cores). Peak memory: one process per method
    and repetition: its own peak RSS (the same process varies by up to 0.2x the parameter bytes from run to
    run: freed memory that glibc's allocator keeps resident) and, with glibc, the peak of the bytes malloc has
    handed out and not had back (the live allocations, sampled every millisecond; the same in every run);
    the median of ``memory_reps`` of each, over AdamW's, in parameter bytes."""
    config = TINY if quick else OPUS_MT_DE_EN
    # 16 pairs of 64 + 64 tokens: a fine-tuning batch of 1024 target tokens (the fixed cost of the ascent and
    # the restore is a larger share of a smaller batch's update).
    shape = dict(batch=4, src_len=8, tgt_len=8) if quick else dict(batch=batch, src_len=src_len, tgt_len=tgt_len)
    methods = list(METHODS)
    with tempfile.TemporaryDirectory(prefix="asam-hf-bench-") as d:
        tmp = Path(d)
        rec = run_process(rotated(methods, rounds), config=config, updates=updates, tmp=tmp, threads=threads, **shape)
        times = update_times(rec["runs"], methods, base="adamw", warmup=warmup, updates=updates)
        peaks: dict[str, list[int]] = {m: [] for m in methods}
        heap: dict[str, list[int]] = {m: [] for m in methods}
        if memory:
            for _ in range(memory_reps):
                for m in methods:
                    r = run_process([m], config=config, updates=2, tmp=tmp, heap_sampling=True, **shape)
                    peaks[m].append(r["peak_rss_bytes"])
                    if r["peak_heap_in_use_bytes"]:
                        heap[m].append(r["peak_heap_in_use_bytes"])
    out = {
        "model": "Marian, opus-mt-de-en config" if not quick else "Marian, tiny config",
        "n_params": rec["n_params"],
        "param_bytes": rec["param_bytes"],
        **shape,
        "rounds": rounds,
        "threads": threads,
        **times,
    }
    if memory:
        out.update(memory_summary(peaks, heap, rec["param_bytes"]))
    return out


def memory_summary(peaks: dict[str, list[int]], heap: dict[str, list[int]], param_bytes: int) -> dict:
    """Per method, the median over its processes of the peak RSS and its range, and of the peak live heap
    (when every method has one: glibc's mallinfo2), each over AdamW's median in parameter bytes."""
    peak = {m: statistics.median(v) for m, v in peaks.items()}
    out = {"peak_rss_bytes": peak, "peak_rss_bytes_per_rep": peaks,
           "extra_memory_over_adamw_in_param_bytes": {m: (peak[m] - peak["adamw"]) / param_bytes for m in peaks},
           "extra_memory_range_in_param_bytes": {
               m: [(min(v) - peak["adamw"]) / param_bytes, (max(v) - peak["adamw"]) / param_bytes]
               for m, v in peaks.items()}}
    if heap and all(heap.values()):  # glibc's mallinfo2 (not on other C libraries)
        hp = {m: statistics.median(v) for m, v in heap.items()}
        out["peak_heap_in_use_bytes"] = hp
        out["extra_heap_in_use_over_adamw_in_param_bytes"] = {m: (hp[m] - hp["adamw"]) / param_bytes for m in hp}
    return out
