"""ASAM/SAM in Hugging Face's Trainer: real Trainer, real Accelerate, a tiny random Marian model, no download.

Each update is checked against the direct two-pass computation written with the core protocol
(tests/hf_helpers.py): plain, gradient accumulation (one eps per accumulated batch), clipping of g',
dropout replayed in the second pass, a cheaper policy, resume == uninterrupted, and bad arguments.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from transformers import Seq2SeqTrainer, Trainer  # noqa: E402

from fairseq_asam.integrations.transformers import (  # noqa: E402
    STATE_NAME,
    ASAMSeq2SeqTrainer,
    ASAMSeq2SeqTrainingArguments,
    ASAMTrainer,
    ASAMTrainingArguments,
)
from fairseq_asam.schedule import EveryK, LookASAM  # noqa: E402
from tests.hf_helpers import (  # noqa: E402
    LR,
    RHO,
    RecordRandomState,
    collate,
    direct_updates,
    max_abs_diff,
    tiny_marian,
    token_data,
    trainer_args,
)


def _decay(trainer, model) -> set[str]:
    return set(trainer.get_decay_parameter_names(model))


def _train(out, model, data, trainer_cls=ASAMSeq2SeqTrainer, resume=None, **kw):
    rec = RecordRandomState()
    trainer = trainer_cls(model=model, args=trainer_args(out, **kw), train_dataset=data, data_collator=collate,
                          callbacks=[rec])
    trainer.train(resume_from_checkpoint=resume)
    return trainer, rec


@pytest.mark.parametrize("accum,max_grad_norm", [(1, 0.0), (2, 0.0), (2, 0.05)],
                         ids=["one-batch", "accumulation", "accumulation+clipping"])
def test_trainer_update_equals_the_direct_two_pass_update(tmp_path, accum, max_grad_norm):
    data = token_data(8)
    model0 = tiny_marian()
    trainer, rec = _train(tmp_path, tiny_marian(), data, gradient_accumulation_steps=accum,
                          max_grad_norm=max_grad_norm, max_steps=8 // (2 * accum))
    assert len(rec.states) == 8 // (2 * accum)
    direct, opt = direct_updates(model0, data, rec.states, batch=2, accum=accum, rho=RHO, lr=LR,
                                 decay_names=_decay(trainer, model0),
                                 max_grad_norm=max_grad_norm)
    assert max_abs_diff(trainer.model, direct) == 0.0
    assert trainer.model.state_dict().keys() == direct.state_dict().keys()
    shell = trainer.sharpness_optimizer
    assert shell.schedule.updates == opt.schedule.updates == len(rec.states)
    assert shell.schedule.second_passes == len(rec.states)
    # The shell runs on the Trainer's own optimizer: the LR scheduler and checkpoints see it.
    assert shell.param_groups is trainer.optimizer.optimizer.param_groups
    # The moved weights prove the update ran; the model without ASAM moved elsewhere.
    assert max_abs_diff(trainer.model, model0) > 1e-4


def test_the_second_pass_replays_the_dropout_masks(tmp_path):
    """Control for the test above: with dropout on, a second pass with fresh masks is another update."""
    data = token_data(4)
    model0 = tiny_marian(dropout=0.3)
    trainer, rec = _train(tmp_path, tiny_marian(dropout=0.3), data, max_steps=2)
    kw = dict(batch=2, accum=1, rho=RHO, lr=LR, decay_names=_decay(trainer, model0), max_grad_norm=0.0)
    same, _ = direct_updates(model0, data, rec.states, **kw)
    fresh, _ = direct_updates(model0, data, rec.states, replay=False, **kw)
    assert max_abs_diff(trainer.model, same) == 0.0
    assert max_abs_diff(trainer.model, fresh) > 1e-6


@pytest.mark.slow
def test_plain_trainer_and_asam_trainer_with_mode_none_are_the_same_update(tmp_path):
    data = token_data(4)
    plain = Trainer(model=tiny_marian(), args=trainer_args(tmp_path / "a", cls=ASAMTrainingArguments, asam_mode="none",
                                                    asam_rho=None, max_steps=2),
                    train_dataset=data, data_collator=collate)
    plain.train()
    none, _ = _train(tmp_path / "b", tiny_marian(), data, trainer_cls=ASAMTrainer, cls=ASAMTrainingArguments,
                     asam_mode="none", asam_rho=None, max_steps=2)
    asam, _ = _train(tmp_path / "c", tiny_marian(), data, trainer_cls=ASAMTrainer, cls=ASAMTrainingArguments,
                     max_steps=2)
    assert none.sharpness_optimizer is None
    assert max_abs_diff(plain.model, none.model) == 0.0
    assert max_abs_diff(plain.model, asam.model) > 1e-6
    assert isinstance(asam, Trainer) and not isinstance(asam, Seq2SeqTrainer)


@pytest.mark.parametrize("accum", [1, 2])
def test_cheaper_policy_every_k_equals_the_direct_update(tmp_path, accum):
    data = token_data(16)
    model0 = tiny_marian()
    trainer, rec = _train(tmp_path, tiny_marian(), data, gradient_accumulation_steps=accum, asam_every=2,
                          max_steps=16 // (2 * accum))
    direct, opt = direct_updates(model0, data, rec.states, batch=2, accum=accum, rho=RHO, lr=LR,
                                 decay_names=_decay(trainer, model0),
                                 max_grad_norm=0.0, schedule=EveryK(2))
    assert max_abs_diff(trainer.model, direct) == 0.0
    sched = trainer.sharpness_optimizer.schedule
    assert (sched.updates, sched.second_passes) == (len(rec.states), len(rec.states) // 2)


@pytest.mark.slow
@pytest.mark.parametrize("policy", [dict(asam_every=2, asam_reuse_alpha=0.7), dict(asam_one_pass="previous")],
                         ids=["look-asam", "one-pass-previous"])
def test_resume_from_checkpoint_equals_the_uninterrupted_run(tmp_path, policy):
    """save_steps / resume_from_checkpoint: the weights, Adam's moments and the policy's state (Look-ASAM's
    direction, one-pass's previous gradient) come back; the resumed run ends bit for bit where the
    uninterrupted one did."""
    data = token_data(12)
    full, _ = _train(tmp_path / "full", tiny_marian(), data, max_steps=6, save_strategy="steps", save_steps=3,
                     **policy)
    ckpt = tmp_path / "full" / "checkpoint-3"
    assert (ckpt / STATE_NAME).is_file()
    saved = torch.load(ckpt / STATE_NAME, weights_only=True)
    assert saved["schedule"]["updates"] == 3 and "base" not in saved
    resumed, _ = _train(tmp_path / "resumed", tiny_marian(seed=7), data, max_steps=6, resume=str(ckpt), **policy)
    assert max_abs_diff(full.model, resumed.model) == 0.0
    a, b = full.sharpness_optimizer.state_dict(), resumed.sharpness_optimizer.state_dict()
    assert a["schedule"]["updates"] == b["schedule"]["updates"] == 6
    assert str(a["schedule"]) == str(b["schedule"])
    # The policy's state matters: resuming without it is another run.
    os.remove(ckpt / STATE_NAME)
    with pytest.raises(FileNotFoundError, match=STATE_NAME):
        _train(tmp_path / "broken", tiny_marian(), data, max_steps=6, resume=str(ckpt), **policy)


@pytest.mark.slow
def test_look_asam_state_round_trip_changes_the_result(tmp_path):
    """The resume test above can fail: a fresh Look-ASAM (no kept direction) after 3 updates ends elsewhere."""
    data = token_data(12)
    policy = dict(asam_every=2, asam_reuse_alpha=0.7)
    full, _ = _train(tmp_path / "full", tiny_marian(), data, max_steps=6, save_strategy="steps", save_steps=3,
                     **policy)
    ckpt = tmp_path / "full" / "checkpoint-3"
    state = torch.load(ckpt / STATE_NAME, weights_only=True)
    state["schedule"] = LookASAM(2, 0.7).state_dict() | {"updates": 3, "second_passes": 2}
    torch.save(state, ckpt / STATE_NAME)
    resumed, _ = _train(tmp_path / "resumed", tiny_marian(), data, max_steps=6, resume=str(ckpt), **policy)
    assert max_abs_diff(full.model, resumed.model) > 1e-7


BAD = [
    (dict(asam_rho=-1.0), "asam_rho must be > 0, got -1"),
    (dict(asam_rho=0.0), "asam_rho must be > 0"),
    (dict(asam_eta=-0.1), "asam_eta must be a finite number >= 0"),
    (dict(asam_p="3"), "asam_p must be 2 or inf"),
    (dict(asam_normalization="layer"), "asam_normalization must be one of element, filter"),
    (dict(asam_mode="adam"), "asam_mode must be one of asam, sam, none"),
    (dict(asam_one_pass="gradient"), "asam_one_pass must be one of none, momentum, previous"),
    (dict(asam_every=0), "asam_every must be >= 1"),
    (dict(asam_every=2, asam_start=0.5), "choose one cheaper-update policy, got asam_every and asam_start"),
    (dict(asam_reuse_alpha=0.5), "asam_reuse_alpha .*needs asam_every"),
    (dict(asam_start=1.5), "asam_start must be in \\[0, 1\\]"),
    (dict(asam_mode="none", asam_rho=None, asam_every=3), "asam_every given with asam_mode='none'"),
    (dict(asam_mode="sam", asam_eta=0.1), "asam_eta apply to asam_mode='asam' only"),
    (dict(optim="lomo"), "optim='lomo' with asam_mode='asam'"),
]


@pytest.mark.parametrize("kw,message", BAD, ids=[m.split(" ")[0] + str(i) for i, (_, m) in enumerate(BAD)])
def test_bad_arguments_are_refused_before_training_naming_the_argument(tmp_path, kw, message):
    out = tmp_path / "run"
    with pytest.raises(ValueError, match=message):
        trainer_args(out, **kw)
    assert not out.exists()  # nothing written


def test_trainer_needs_the_sharpness_arguments(tmp_path):
    from transformers import Seq2SeqTrainingArguments

    args = Seq2SeqTrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[])
    with pytest.raises(TypeError, match="asam_\\* arguments"):
        ASAMSeq2SeqTrainer(model=tiny_marian(), args=args, train_dataset=token_data(2), data_collator=collate)


def test_arguments_parse_from_the_command_line(tmp_path):
    from transformers import HfArgumentParser

    (args,) = HfArgumentParser(ASAMSeq2SeqTrainingArguments).parse_args_into_dataclasses(
        ["--output_dir", str(tmp_path), "--use_cpu", "--asam_mode", "sam", "--asam_rho", "0.05", "--asam_every", "4",
         "--asam_p", "inf"])
    assert (args.asam_mode, args.sharpness_rho(), args.asam_p) == ("sam", 0.05, "inf")
    assert repr(args.sharpness_schedule()) == "EveryK(k=4)"
    with pytest.raises(ValueError, match="asam_rho must be > 0"):
        HfArgumentParser(ASAMSeq2SeqTrainingArguments).parse_args_into_dataclasses(
            ["--output_dir", str(tmp_path), "--asam_rho", "-2"])


def test_sam_mode_builds_sam_with_the_trainers_optimizer(tmp_path):
    trainer, _ = _train(tmp_path, tiny_marian(), token_data(4), max_steps=1, asam_mode="sam", asam_rho=0.05,
                        asam_p="inf")
    opt = trainer.sharpness_optimizer
    assert type(opt).__name__ == "SAM" and opt.rho == 0.05 and opt.p == float("inf")
    assert type(opt.base_optimizer).__name__ == "AdamW"


@pytest.mark.slow
def test_importing_the_package_imports_no_transformers():
    code = ("import sys, fairseq_asam, fairseq_asam.integrations; "
            "assert 'transformers' not in sys.modules and 'accelerate' not in sys.modules; print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr



@pytest.mark.slow
@pytest.mark.parametrize("policy", [{}, dict(asam_one_pass="previous")], ids=["full", "one-pass"])
def test_ddp_two_gloo_workers_equal_one_process_on_the_global_batch(tmp_path, policy):
    """2 workers x 1 example x 2 micro-batches per update against 1 process x 2 examples x 2 micro-batches:
    the same updates (SGD, so that a difference in g shows; Adam's first steps are nearly sign(g)).

    The workers' eps is the same (from the global batch's g), so their run is the one-process run on the
    whole batch; a per-worker eps (a first pass without any reduction) would not be. Tokens are not
    re-weighted across workers (average_tokens_across_devices=False: Marian's loss is a per-batch mean).
    """
    from workers import free_port, run_workers

    from tests.hf_helpers import ddp_worker

    kw = dict(per_device_train_batch_size=1, gradient_accumulation_steps=2, max_steps=2, optim="sgd",
              learning_rate=0.1, average_tokens_across_devices=False, **policy)
    run_workers(ddp_worker, (2, free_port(), str(tmp_path), kw))
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert r0["ddp"] == "DistributedDataParallel"
    assert all(torch.equal(a, b) for a, b in zip(r0["params"], r1["params"]))
    one, _ = _train(tmp_path / "one", tiny_marian(dropout=0.0), token_data(8), **dict(kw, per_device_train_batch_size=2))
    diff = max((a - p.detach()).abs().max().item() for a, p in zip(r0["params"], one.model.parameters()))
    assert diff < 1e-6, diff
    start = tiny_marian(dropout=0.0).parameters()
    assert max((a - p.detach()).abs().max().item() for a, p in zip(r0["params"], start)) > 1e-3
    if not policy:
        assert r0["eps"] == r1["eps"] and len(r0["eps"]) == 2


def test_bf16_autocast_on_cpu_equals_the_direct_update(tmp_path):
    """bf16 through Accelerate (CPU autocast here; the CUDA run is in test_transformers_gpu.py): both passes
    autocast, the weights stay fp32 and are restored exactly, the update is the direct one's."""
    data = token_data(8)
    model0 = tiny_marian()
    trainer, rec = _train(tmp_path, tiny_marian(), data, bf16=True, gradient_accumulation_steps=2, max_steps=2,
                          max_grad_norm=1.0)
    assert trainer.accelerator.mixed_precision == "bf16"
    direct, _ = direct_updates(model0, data, rec.states, batch=2, accum=2, rho=RHO, lr=LR, max_grad_norm=1.0,
                               decay_names=_decay(trainer, model0),
                               autocast=lambda: torch.autocast("cpu", dtype=torch.bfloat16))
    assert max_abs_diff(trainer.model, direct) == 0.0
    assert all(p.dtype == torch.float32 for p in trainer.model.parameters())
    fp32, _ = direct_updates(model0, data, rec.states, batch=2, accum=2, rho=RHO, lr=LR, max_grad_norm=1.0,
                             decay_names=_decay(trainer, model0))
    assert max_abs_diff(trainer.model, fp32) > 0  # the autocast really ran


@pytest.mark.slow
def test_bench_section_runs_on_a_tiny_marian():
    """`make bench`'s hf section (here with the tiny config): every method ran real Trainer updates."""
    from benchmarks.hf_update import METHODS, bench_trainer

    r = bench_trainer(rounds=1, updates=3, warmup=1, quick=True, memory_reps=1)
    assert all(len(v) == 2 for v in r["update_seconds"].values())
    # Peak memory: one process per method (the median and range over repetitions: memory_summary, below).
    for m, peaks in r["peak_rss_bytes_per_rep"].items():
        assert len(peaks) == 1 and r["peak_rss_bytes"][m] == peaks[0] > 0
        extra = (peaks[0] - r["peak_rss_bytes_per_rep"]["adamw"][0]) / r["param_bytes"]
        assert r["extra_memory_over_adamw_in_param_bytes"][m] == pytest.approx(extra)
        assert r["extra_memory_range_in_param_bytes"][m] == pytest.approx([extra, extra])
    # The live allocations (glibc's mallinfo2, sampled every millisecond): ASAM holds one more parameter-size
    # buffer than AdamW (the kept w). The tiny model's buffer is 35 KB, less than what one process's sampled
    # peak moves from run to run under load (up to +-6x the buffer measured, one repetition each), so here
    # only the scale is checked: the methods' peaks differ by under 1% of the whole live heap (about 180 MB).
    # The 74M-parameter run of `make bench` measures the buffer itself: +0.99x (docs/bench.json).
    heap, peak_heap = r["extra_heap_in_use_over_adamw_in_param_bytes"], r["peak_heap_in_use_bytes"]
    assert heap["adamw"] == 0 and peak_heap["adamw"] > 100 * r["param_bytes"]
    assert abs(heap["asam"]) * r["param_bytes"] < 0.01 * peak_heap["adamw"]
    assert set(r["seconds_per_update"]) == set(METHODS)
    assert all(v > 0 for v in r["seconds_per_update"].values())
    assert r["ratio_to_adamw"]["adamw"] == 1.0
    assert r["n_params"] > 0 and r["param_bytes"] == 4 * r["n_params"]


def test_bench_memory_summary_is_the_median_and_range_over_repetitions_against_adamws_median():
    from benchmarks.hf_update import memory_summary

    peaks = {"adamw": [100, 120, 110], "asam": [150, 130, 170]}
    heap = {"adamw": [50, 52, 51], "asam": [60, 61, 59]}
    r = memory_summary(peaks, heap, param_bytes=10)
    assert r["peak_rss_bytes"] == {"adamw": 110, "asam": 150} and r["peak_rss_bytes_per_rep"] is peaks
    assert r["extra_memory_over_adamw_in_param_bytes"] == {"adamw": 0.0, "asam": 4.0}
    assert r["extra_memory_range_in_param_bytes"] == {"adamw": [-1.0, 1.0], "asam": [2.0, 6.0]}
    assert r["peak_heap_in_use_bytes"] == {"adamw": 51, "asam": 60}
    assert r["extra_heap_in_use_over_adamw_in_param_bytes"] == {"adamw": 0.0, "asam": 0.9}
    # an even number of repetitions: the mean of the middle two; no heap figures unless every method has them
    r = memory_summary({"adamw": [100, 110], "asam": [130, 150]}, {"adamw": [50], "asam": []}, param_bytes=10)
    assert r["peak_rss_bytes"] == {"adamw": 105, "asam": 140} and "peak_heap_in_use_bytes" not in r


def test_training_logs_carry_eps_norm_and_the_second_pass_fraction(tmp_path):
    trainer, _ = _train(tmp_path, tiny_marian(), token_data(8), max_steps=4, asam_every=2, logging_strategy="steps",
                        logging_steps=1)
    rows = [r for r in trainer.state.log_history if "loss" in r]
    assert len(rows) == 4
    # EveryK(2): the second pass on updates 1 and 3; ||eps|| is the last ascent's, so update 2 repeats 1's.
    assert [r["asam_second_pass_fraction"] for r in rows] == [1.0, 0.5, 0.6667, 0.5]
    eps = [r["asam_eps_norm"] for r in rows]
    assert eps[0] > 0 and eps[1] == eps[0] and eps[2] != eps[1] and eps[3] == eps[2]


@pytest.mark.parametrize("policy,second_passes", [(dict(asam_start=0.5), 2), (dict(asam_one_pass="momentum"), 0),
                                                   (dict(asam_adaptive_c=0.0), None)],
                         ids=["late-phase", "one-pass-momentum", "adaptive"])
def test_every_policy_runs_in_the_trainer(tmp_path, policy, second_passes):
    """LatePhase learns the run's length (max_steps) from the Trainer; the others need nothing from it."""
    trainer, _ = _train(tmp_path, tiny_marian(), token_data(8), max_steps=4, **policy)
    sched = trainer.sharpness_optimizer.schedule
    assert sched.updates == 4
    if second_passes is not None:
        assert sched.second_passes == second_passes
    assert max_abs_diff(trainer.model, tiny_marian()) > 1e-4
