"""ASAM/SAM in the Hugging Face Trainer under FSDP2 (``fsdp=True``, Accelerate's ``fully_shard``), on CPU with two
gloo workers: the run equals one unsharded process on the union of the workers' batches (eps from the global
gradient, the Trainer's clipping on the sharded g'), and resume from Accelerate's sharded checkpoint (with the
shell's own state, the policy's tensors as shards) equals the uninterrupted run.

Accelerate 1.15 turns FSDP on only for accelerator devices; the workers take its FSDP branch on CPU with
``tests/hf_helpers.accelerate_fsdp_on_cpu`` (two attributes of ``AcceleratorState``, what Accelerate sets on a
GPU). ``scripts/gpu_check.py`` runs the same comparison on a GPU without it.
"""

from __future__ import annotations

import os
import shutil

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from fairseq_asam.integrations.transformers import SHARDED_STATE_NAME, STATE_NAME  # noqa: E402
from tests.hf_helpers import tiny_marian, token_data, trainer_args  # noqa: E402


def _launch(out, kw, resume=None) -> dict:
    """The 2-worker FSDP2 run; rank 0's record (full weights, ||eps|| per update, grad norms, ...)."""
    from workers import free_port, run_workers

    from tests.hf_helpers import fsdp_worker

    os.makedirs(out, exist_ok=True)
    run_workers(fsdp_worker, (2, free_port(), str(out), kw, resume))
    r0, r1 = (torch.load(os.path.join(out, f"rank{r}.pt"), weights_only=True) for r in (0, 1))
    assert all(torch.equal(r0["params"][n], r1["params"][n]) for n in r0["params"])
    assert r0["eps"] == r1["eps"]  # one global eps: every rank logs the same ||eps||
    return r0


def _maxdiff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[n] - b[n]).abs().max().item() for n in a)


# 2 workers x 1 example x 2 micro-batches against 1 process x 2 examples x 2 micro-batches. SGD, so that a
# difference in g shows; no dropout (each rank draws its own masks); Marian's loss is a per-batch mean, so tokens
# are not re-weighted across workers.
COMMON = dict(per_device_train_batch_size=1, gradient_accumulation_steps=2, max_steps=2, optim="sgd",
              learning_rate=0.1, average_tokens_across_devices=False, logging_strategy="steps", logging_steps=1)


@pytest.mark.slow
@pytest.mark.parametrize("extra", [dict(max_grad_norm=0.5), dict(asam_mode="sam", asam_rho=0.05, asam_p="inf"),
                                   dict(asam_one_pass="previous", max_steps=3)],
                         ids=["asam+clipping", "sam-inf", "one-pass-previous"])
def test_fsdp2_two_gloo_workers_equal_one_unsharded_process(tmp_path, extra):
    kw = dict(COMMON, **extra)
    got = _launch(tmp_path / "fsdp", dict(kw, n_examples=4 * kw["max_steps"]))
    # Accelerate sharded the model and swapped the optimizer's parameters for DTensors; the shell perturbs
    # exactly those (its param_groups are the optimizer's own).
    assert got["fsdp"] and got["model"] == "FSDPMarianMTModel"
    assert got["dtensor_params"] and got["shares_groups"]

    from tests.test_transformers import _train

    one, _ = _train(tmp_path / "one", tiny_marian(dropout=0.0, tied=False), token_data(4 * kw["max_steps"]),
                    **dict(kw, per_device_train_batch_size=2))
    ref = {n: p.detach() for n, p in one.model.named_parameters()}
    # Measured (torch 2.14.1, CPU, one thread): 3.7e-9 (asam+clipping), 7.5e-9 without clipping -- float32
    # summation order only.
    assert _maxdiff(got["params"], ref) < 1e-6
    # eps from the global gradient: a norm of each rank's shard alone would give another ||eps||.
    opt = one.sharpness_optimizer
    assert opt.schedule.updates == got["schedule"]["updates"] == kw["max_steps"]
    assert opt.schedule.second_passes == got["schedule"]["second_passes"]
    norms = [r["grad_norm"] for r in one.state.log_history if "grad_norm" in r]
    assert got["grad_norm"] == pytest.approx(norms, rel=1e-5)
    if "max_grad_norm" in extra:
        assert min(norms) > extra["max_grad_norm"]  # the clipping acted on every update
    # Not vacuous: the weights moved.
    init = dict(tiny_marian(dropout=0.0, tied=False).named_parameters())
    assert _maxdiff(got["params"], {n: t.detach() for n, t in init.items()}) > 1e-3


@pytest.mark.slow
def test_fsdp2_resume_from_sharded_checkpoint_equals_the_uninterrupted_run(tmp_path):
    """SHARDED_STATE_DICT checkpoints (DCP): Accelerate's model and AdamW shards, the scheduler, and the shell's
    state: asam.pt (the policy's counters) plus its per-parameter tensors (one-pass's previous gradient) as
    shards in asam_sharded/. Resuming in fresh processes ends bit for bit where the uninterrupted run did."""
    kw = dict(COMMON, max_steps=4, optim="adamw_torch", learning_rate=1e-2, max_grad_norm=0.5,
              asam_one_pass="previous", n_examples=16, save_strategy="steps", save_steps=2)
    full = _launch(tmp_path / "full", kw)
    ckpt = tmp_path / "full" / "run" / "checkpoint-2"
    assert {"pytorch_model_fsdp_0", "optimizer_0", STATE_NAME, SHARDED_STATE_NAME} <= set(os.listdir(ckpt))
    saved = torch.load(ckpt / STATE_NAME, weights_only=True)
    assert saved["schedule"]["updates"] == 2 and "base" not in saved
    assert len(saved["schedule"]["previous"]["tensor_list"]) > 0  # the tensors live in the shards

    resumed = _launch(tmp_path / "resumed", kw, resume=str(ckpt))
    assert _maxdiff(full["params"], resumed["params"]) == 0.0
    assert resumed["schedule"] == full["schedule"] == {"updates": 4, "second_passes": 0}
    assert resumed["eps"] == full["eps"][2:]

    # The control: the same checkpoint without the policy's tensors resumes into another run.
    shutil.rmtree(ckpt / SHARDED_STATE_NAME)
    saved["schedule"]["previous"] = None
    torch.save(saved, ckpt / STATE_NAME)
    broken = _launch(tmp_path / "broken", kw, resume=str(ckpt))
    assert _maxdiff(full["params"], broken["params"]) > 1e-6


BAD_FSDP = [
    (dict(fsdp=True, fsdp_config={"version": 1}), "FSDP1"),
    (dict(fsdp=True, asam_every=2, asam_reuse_alpha=0.7), "fsdp with LookASAM"),
    (dict(fsdp=True, asam_adaptive_c=1.0), "fsdp with AdaptiveTrigger"),
    (dict(deepspeed={"train_batch_size": 2}), "deepspeed with asam_mode='asam': DeepSpeed runs the optimizer step"),
]


@pytest.mark.parametrize("kw,message", BAD_FSDP, ids=["fsdp1", "look-asam", "adaptive", "deepspeed"])
def test_what_fsdp_cannot_run_is_refused_naming_the_argument(tmp_path, kw, message):
    out = tmp_path / "run"
    with pytest.raises(ValueError, match=message):
        trainer_args(out, **kw)
    assert not out.exists()


def test_fsdp2_arguments_are_accepted(tmp_path):
    args = trainer_args(tmp_path / "run", fsdp=True, fsdp_config={"version": 2}, asam_one_pass="previous")
    assert args.fsdp_plugin_args["fsdp_version"] == 2
    plain = trainer_args(tmp_path / "plain", fsdp=True, fsdp_config={"version": 1}, asam_mode="none", asam_rho=None)
    assert plain.fsdp_plugin_args["fsdp_version"] == 1  # the plain update: FSDP1 is the Trainer's business
