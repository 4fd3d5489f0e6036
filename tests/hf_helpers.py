"""A tiny randomly initialised Marian model, token ids made here, and the direct two-pass update the Trainer
integration is checked against (written with the core protocol, not with the integration)."""

from __future__ import annotations

import copy

import torch
from transformers import MarianConfig, MarianMTModel, TrainerCallback

from fairseq_asam import ASAM
from fairseq_asam.replay import random_state, set_random_state

VOCAB, SRC_LEN, TGT_LEN = 24, 6, 5


def tiny_marian(seed: int = 0, dropout: float = 0.1, vocab: int = VOCAB) -> MarianMTModel:
    torch.manual_seed(seed)
    cfg = MarianConfig(vocab_size=vocab, d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
                       decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, max_position_embeddings=32,
                       pad_token_id=0, eos_token_id=1, decoder_start_token_id=0, forced_eos_token_id=1,
                       dropout=dropout, attention_dropout=0.0, activation_dropout=0.0)
    return MarianMTModel(cfg)


def token_data(n: int, seed: int = 1) -> list[dict]:
    """n pairs of equal length (no padding: every micro-batch has the same number of label tokens)."""
    g = torch.Generator().manual_seed(seed)
    src = torch.randint(2, VOCAB, (n, SRC_LEN), generator=g)
    tgt = torch.randint(2, VOCAB, (n, TGT_LEN), generator=g)
    src[:, -1] = 1  # </s>
    tgt[:, -1] = 1
    return [{"input_ids": s.tolist(), "attention_mask": [1] * SRC_LEN, "labels": t.tolist()} for s, t in zip(src, tgt)]


def collate(examples: list[dict]) -> dict:
    return {k: torch.tensor([e[k] for e in examples]) for k in examples[0]}


class RecordRandomState(TrainerCallback):
    """The random state at the start of each update (what the update's dropout draws from)."""

    def __init__(self):
        self.states = []

    def on_step_begin(self, args, state, control, **kw):
        self.states.append(random_state())


def direct_updates(model0, data, states, *, batch: int, accum: int, rho: float, lr: float, max_grad_norm: float,
                   decay_names, schedule=None, replay: bool = True):
    """The updates the Trainer should make, written with ASAM's update protocol: AdamW (the Trainer's
    "adamw_torch", no weight decay, its two groups in its order: the norm of T g sums in that order), one eps
    per accumulated batch, clipping of g', same dropout draws."""
    model = copy.deepcopy(model0)
    model.train()
    named = list(model.named_parameters())
    groups = [{"params": [t for n, t in named if n in decay_names]},
              {"params": [t for n, t in named if n not in decay_names]}]
    base = torch.optim.AdamW(groups, lr=lr, weight_decay=0.0)
    opt = ASAM(model.named_parameters(), base, rho=rho, eta=0.01, schedule=schedule)
    per_update = batch * accum
    for u, state in enumerate(states):
        examples = data[u * per_update:(u + 1) * per_update]
        micro = [collate(examples[j * batch:(j + 1) * batch]) for j in range(accum)]
        n_items = torch.tensor(sum(int((m["labels"] != -100).sum()) for m in micro))
        set_random_state(state)
        opt.begin_step()
        seen = []
        for m in micro:
            seen.append(random_state())
            model(**m, num_items_in_batch=n_items).loss.backward()
        if opt.wants_second_pass():
            assert opt.ascent_step()
            after = random_state()
            for m, s in zip(micro, seen):
                if replay:
                    set_random_state(s)
                model(**m, num_items_in_batch=n_items).loss.backward()
            set_random_state(after)
        assert opt.end_step()
        if max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
        base.step()
        opt.zero_grad()
    return model, opt


def max_abs_diff(a: torch.nn.Module, b: torch.nn.Module) -> float:
    return max((x - y).abs().max().item() for x, y in zip(a.parameters(), b.parameters()))
