"""ASAM in the Trainer under Accelerate's fp16 (GradScaler) and bf16 on CUDA.

Skipped without a CUDA GPU (the CPU suite checks bf16 autocast on CPU in test_transformers.py). Checked:
the fp16 update equals the direct one with a GradScaler (first-pass g left scaled, eps scale invariant,
g' unscaled once before clipping and the step); an overflowed first-pass gradient takes no ascent and the
Trainer skips the update as after any fp16 overflow (weights untouched, scale backed off, nothing counted);
bf16 equals the direct computation under CUDA autocast.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

from transformers import TrainerCallback  # noqa: E402

from fairseq_asam.integrations.transformers import ASAMSeq2SeqTrainer  # noqa: E402
from tests.hf_helpers import (  # noqa: E402
    RHO,
    RecordRandomState,
    collate,
    direct_updates,
    tiny_marian,
    token_data,
    trainer_args,
)

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(),
                                                  reason="needs a CUDA GPU: fp16 (GradScaler) and bf16 on CUDA")]

LR = 0.1  # SGD: a difference in g shows in the weights (Adam's first steps are nearly sign(g))


def _run(tmp_path, callbacks=(), **kw):
    rec = RecordRandomState()
    args = trainer_args(tmp_path, use_cpu=False, optim="sgd", learning_rate=LR, gradient_accumulation_steps=2,
                        max_steps=2, max_grad_norm=1.0, **kw)
    trainer = ASAMSeq2SeqTrainer(model=tiny_marian(), args=args, train_dataset=token_data(8), data_collator=collate,
                                 callbacks=[rec, *callbacks])
    trainer.train()
    return trainer, rec


def _diff(a, b) -> float:
    return max((x.float() - y.float().to(x.device)).abs().max().item() for x, y in zip(a.parameters(), b.parameters()))


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_mixed_precision_update_equals_the_direct_update(tmp_path, dtype):
    model0 = tiny_marian()
    trainer, rec = _run(tmp_path, **{dtype: True})
    assert trainer.accelerator.mixed_precision == dtype
    half = torch.float16 if dtype == "fp16" else torch.bfloat16
    scaler = torch.amp.GradScaler("cuda") if dtype == "fp16" else None
    if scaler is not None:
        assert trainer.accelerator.scaler is not None
        assert float(trainer.accelerator.scaler.get_scale()) == float(scaler.get_scale())  # same settings
    direct, _ = direct_updates(model0, token_data(8), rec.states, batch=2, accum=2, rho=RHO, lr=LR, max_grad_norm=1.0,
                               decay_names=set(trainer.get_decay_parameter_names(model0)), optim="sgd",
                               device="cuda", autocast=lambda: torch.autocast("cuda", dtype=half), scaler=scaler)
    d = _diff(trainer.model, direct)
    print(f"{dtype}: max |Trainer - direct| = {d:.3g}")
    assert d < 1e-5, d
    assert _diff(trainer.model, model0) > 1e-3
    assert trainer.sharpness_optimizer.schedule.second_passes == 2


class HugeScaleOnce(TrainerCallback):
    """Before the first update, a scale that overflows fp16 gradients: the first-pass g is inf."""

    def __init__(self):
        self.trainer, self.weights, self.scale_after = None, None, None

    def on_step_begin(self, args, state, control, **kw):
        if state.global_step == 0:
            scaler = self.trainer.accelerator.scaler
            scaler.scale(torch.ones((), device="cuda"))  # the scale is created lazily, at its first use
            scaler.update(2.0 ** 100)
            self.weights = [p.detach().clone() for p in self.trainer.model.parameters()]

    def on_step_end(self, args, state, control, **kw):
        if state.global_step == 1:
            self.scale_after = float(self.trainer.accelerator.scaler.get_scale())
            self.skipped = self.trainer.accelerator.optimizer_step_was_skipped
            self.after = [p.detach().clone() for p in self.trainer.model.parameters()]
            self.finite = self.trainer.sharpness_optimizer.last_grad_finite
            self.updates = self.trainer.sharpness_optimizer.schedule.updates


def test_fp16_overflow_takes_no_ascent_and_skips_the_update(tmp_path):
    cb = HugeScaleOnce()
    args = trainer_args(tmp_path, use_cpu=False, optim="sgd", learning_rate=LR, max_steps=1, fp16=True)
    trainer = ASAMSeq2SeqTrainer(model=tiny_marian(), args=args, train_dataset=token_data(2), data_collator=collate,
                                 callbacks=[cb])
    cb.trainer = trainer
    trainer.train()
    assert cb.finite is False and cb.skipped is True and cb.updates == 0
    assert cb.scale_after == 2.0 ** 99  # backed off once, as after any fp16 overflow
    assert all(torch.equal(a, b) for a, b in zip(cb.weights, cb.after))
