"""ASAM with PEFT's LoRA in the Trainer: only the trainable parameters are perturbed, and what T_w is there.

LoRA's factors A (r x in) and B (out x r) are 2-D weights: T_w = |w| + eta element-wise on each (filter-wise
normalization only groups the filters of >= 3-D convolution weights, so it gives the same T here); their
names end in "weight", so they are never biases; a trainable bias (``bias="lora_only"``) gets T = 1 unless
asam_normalize_bias. B starts at zero, so at first its T is eta and its share of eps is small.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from fairseq_asam.integrations.transformers import ASAMSeq2SeqTrainer  # noqa: E402
from tests.hf_helpers import collate, tiny_marian, token_data, trainer_args  # noqa: E402


def _lora(bias: str = "none"):
    cfg = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.0, bias=bias)
    return peft.get_peft_model(tiny_marian(dropout=0.0), cfg)


def _trainer(tmp_path, model, **kw):
    t = ASAMSeq2SeqTrainer(model=model, args=trainer_args(tmp_path, max_steps=2, **kw), train_dataset=token_data(4),
                           data_collator=collate)
    t.train()
    return t


@pytest.mark.parametrize("normalization", ["element", "filter"])
def test_lora_only_trainable_parameters_are_perturbed_with_elementwise_T(tmp_path, normalization):
    model = _lora()
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    trainer = _trainer(tmp_path, model, asam_normalization=normalization)
    pert = trainer.sharpness_optimizer.perturbation
    names = {id(p): n for n, p in model.named_parameters()}
    perturbed = [names[id(t)] for t in pert.params()]
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert sorted(perturbed) == sorted(trainable) and perturbed
    assert all(".lora_A." in n or ".lora_B." in n for n in perturbed)
    for t, T in zip(pert.params(), pert.operator()):
        assert torch.equal(T, t.detach().abs() + 0.01), names[id(t)]
    # B moved off zero (it was trained), and the frozen base model is untouched, bit for bit.
    assert any(t.abs().max() > 0 for t in pert.params() if ".lora_B." in names[id(t)])
    assert all(torch.equal(frozen[n], p) for n, p in model.named_parameters() if not p.requires_grad)


@pytest.mark.parametrize("normalize_bias", [False, True])
def test_lora_trainable_biases_follow_the_name_rule(tmp_path, normalize_bias):
    model = _lora(bias="lora_only")
    trainer = _trainer(tmp_path, model, asam_normalize_bias=normalize_bias)
    pert = trainer.sharpness_optimizer.perturbation
    names = {id(p): n for n, p in model.named_parameters()}
    biases = [(t, T) for t, T in zip(pert.params(), pert.operator()) if names[id(t)].endswith("bias")]
    assert biases and all("base_layer.bias" in names[id(t)] for t, _ in biases)
    for t, T in biases:
        assert torch.equal(T, t.detach().abs() + 0.01 if normalize_bias else torch.ones_like(t))
