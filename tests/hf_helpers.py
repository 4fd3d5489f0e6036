"""A tiny randomly initialised Marian model, token ids made here, and the direct two-pass update the Trainer
integration is checked against (written with the core protocol, not with the integration)."""

from __future__ import annotations

import contextlib
import copy

import torch
from transformers import MarianConfig, MarianMTModel, TrainerCallback

from fairseq_asam import ASAM
from fairseq_asam.replay import random_state, set_random_state

VOCAB, SRC_LEN, TGT_LEN = 24, 6, 5
LR, RHO = 1e-2, 0.5


def trainer_args(out, cls=None, **kw):
    """Arguments for a deterministic CPU run: data in order, constant LR, "adamw_torch", nothing logged."""
    from fairseq_asam.integrations.transformers import ASAMSeq2SeqTrainingArguments

    base = dict(output_dir=str(out), use_cpu=True, per_device_train_batch_size=2, learning_rate=LR,
                lr_scheduler_type="constant", optim="adamw_torch", weight_decay=0.0, max_grad_norm=0.0,
                train_sampling_strategy="sequential", report_to=[], save_strategy="no", logging_strategy="no",
                disable_tqdm=True, seed=3, asam_rho=RHO, dataloader_num_workers=0)
    base.update(kw)
    return (cls or ASAMSeq2SeqTrainingArguments)(**base)


def tiny_marian(seed: int = 0, dropout: float = 0.1, vocab: int = VOCAB, tied: bool = True) -> MarianMTModel:
    """``tied=False``: separate encoder, decoder and output embeddings (Accelerate's FSDP2 wrapping puts the input
    embedding into its own unit, and the encoder's copy of a shared embedding would then belong to two)."""
    torch.manual_seed(seed)
    untied = {} if tied else dict(share_encoder_decoder_embeddings=False, tie_word_embeddings=False)
    cfg = MarianConfig(vocab_size=vocab, d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
                       decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, max_position_embeddings=32,
                       pad_token_id=0, eos_token_id=1, decoder_start_token_id=0, forced_eos_token_id=1,
                       dropout=dropout, attention_dropout=0.0, activation_dropout=0.0, **untied)
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
                   decay_names, schedule=None, replay: bool = True, optim: str = "adamw", device: str = "cpu",
                   autocast=None, scaler=None):
    """The updates the Trainer should make, written with ASAM's update protocol: AdamW (the Trainer's
    "adamw_torch", no weight decay, its two groups in its order: the norm of T g sums in that order) or SGD,
    one eps per accumulated batch, clipping of g', same dropout draws; ``autocast`` (a context factory) and a
    GradScaler ``scaler`` as Accelerate uses them for bf16/fp16."""
    model = copy.deepcopy(model0).to(device)
    model.train()
    named = list(model.named_parameters())
    groups = [{"params": [t for n, t in named if n in decay_names]},
              {"params": [t for n, t in named if n not in decay_names]}]
    if optim == "adamw":
        base = torch.optim.AdamW(groups, lr=lr, weight_decay=0.0)
    else:
        base = torch.optim.SGD(groups, lr=lr)
    opt = ASAM(model.named_parameters(), base, rho=rho, eta=0.01, schedule=schedule)
    ac = autocast or contextlib.nullcontext
    per_update = batch * accum

    def backward(m, n_items):
        with ac():
            loss = model(**m, num_items_in_batch=n_items).loss
        (scaler.scale(loss) if scaler is not None else loss).backward()

    for u, state in enumerate(states):
        examples = data[u * per_update:(u + 1) * per_update]
        micro = [{k: v.to(device) for k, v in collate(examples[j * batch:(j + 1) * batch]).items()}
                 for j in range(accum)]
        n_items = torch.tensor(sum(int((m["labels"] != -100).sum()) for m in micro), device=device)
        set_random_state(state)
        opt.begin_step()
        seen = []
        for m in micro:
            seen.append(random_state(device))
            backward(m, n_items)
        scale = float(scaler.get_scale()) if scaler is not None else 1.0
        if opt.wants_second_pass(scale=scale):
            after = random_state(device)
            assert opt.ascent_step()  # replays the random state saved by begin_step()
            if not replay:
                set_random_state(after)  # the control: the second pass draws fresh masks
            for m, s in zip(micro, seen):
                if replay:
                    set_random_state(s)
                backward(m, n_items)
            set_random_state(after)
        assert opt.end_step()
        if scaler is not None:
            scaler.unscale_(base)
        if max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
        if scaler is not None:
            scaler.step(base)
            scaler.update()
        else:
            base.step()
        opt.zero_grad()
    return model, opt


def max_abs_diff(a: torch.nn.Module, b: torch.nn.Module) -> float:
    return max((x - y).abs().max().item() for x, y in zip(a.parameters(), b.parameters()))


class RecordEps(TrainerCallback):
    """||eps|| of each update's ascent, read from the trainer's ASAM shell after the update."""

    def __init__(self):
        self.trainer, self.norms = None, []

    def on_step_end(self, args, state, control, **kw):
        opt = self.trainer.sharpness_optimizer
        self.norms.append(None if opt is None or opt.last_eps_norm is None else opt.last_eps_norm.item())


def ddp_worker(rank: int, world: int, port: int, out: str, kw: dict) -> None:
    """One DDP worker (gloo, CPU) of a Trainer run; writes its final weights and eps norms to out/rank<r>.pt."""
    import os

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from fairseq_asam.integrations.transformers import ASAMSeq2SeqTrainer

    rec = RecordEps()
    args = trainer_args(f"{out}/run", ddp_backend="gloo", **kw)
    trainer = ASAMSeq2SeqTrainer(model=tiny_marian(dropout=0.0), args=args, train_dataset=token_data(8),
                                 data_collator=collate, callbacks=[rec])
    rec.trainer = trainer
    trainer.train()
    torch.save({"params": [p.detach().clone() for p in trainer.model.parameters()], "eps": rec.norms,
                "ddp": type(trainer.model_wrapped).__name__}, f"{out}/rank{rank}.pt")


FSDP_CONFIG = {"version": 2, "state_dict_type": "SHARDED_STATE_DICT",
               "transformer_layer_cls_to_wrap": ["MarianEncoderLayer", "MarianDecoderLayer"]}


def accelerate_fsdp_on_cpu() -> None:
    """Makes Accelerate take its FSDP branch in CPU processes.

    Accelerate 1.15 turns FSDP on only for accelerator devices (``AcceleratorState.__init__`` sets
    ``distributed_type = FSDP`` and ``fsdp_plugin`` in its MULTI_GPU/... branch); on CPU with gloo the Trainer
    would silently run DDP. This sets the same two attributes for a CPU process group, nothing else: what
    follows is Accelerate's own FSDP2 code (``fully_shard`` of the layers and the model, the optimizer's
    parameters swapped for the DTensors, ``no_sync`` through ``set_requires_gradient_sync``, the DTensor-aware
    clipping, sharded checkpoints through DCP). ``scripts/gpu_check.py`` runs the same check without it."""
    from accelerate.state import AcceleratorState
    from accelerate.utils import DistributedType

    init = AcceleratorState.__init__
    if getattr(init, "_fsdp_on_cpu", False):
        return

    def patched(self, *args, fsdp_plugin=None, **kwargs):
        init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            self.distributed_type = DistributedType.FSDP
            self.fsdp_plugin = fsdp_plugin

    patched._fsdp_on_cpu = True
    AcceleratorState.__init__ = patched


def fsdp_worker(rank: int, world: int, port: int, out: str, kw: dict, resume: str | None = None,
                on_cpu: bool = True) -> None:
    """One FSDP2 worker (gloo on CPU, or NCCL where ``on_cpu`` is False) of a Trainer run: writes the full
    weights, ||eps|| per update, the logged grad norms and what the shell saw to out/rank<r>.pt."""
    import os

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    if on_cpu:
        accelerate_fsdp_on_cpu()
    from torch.distributed.tensor import DTensor

    from fairseq_asam.integrations.transformers import ASAMSeq2SeqTrainer

    rec = RecordEps()
    kw = dict(kw)
    n = kw.pop("n_examples", 8)
    base = dict(fsdp=True, fsdp_config=dict(FSDP_CONFIG))
    if on_cpu:
        base["ddp_backend"] = "gloo"
    else:
        base["use_cpu"] = False
    args = trainer_args(f"{out}/run", **{**base, **kw})
    trainer = ASAMSeq2SeqTrainer(model=tiny_marian(dropout=0.0, tied=False), args=args, train_dataset=token_data(n),
                                 data_collator=collate, callbacks=[rec])
    rec.trainer = trainer
    trainer.train(resume_from_checkpoint=resume)
    shell = trainer.sharpness_optimizer
    base_opt = trainer.optimizer.optimizer
    full = {name: (p.full_tensor() if isinstance(p, DTensor) else p).detach().cpu().clone()
            for name, p in trainer.model.named_parameters()}
    torch.save({"params": full, "eps": rec.norms, "fsdp": trainer.is_fsdp_enabled,
                "model": type(trainer.model).__name__,
                "dtensor_params": all(isinstance(t, DTensor) for t in shell.perturbation.params()),
                "shares_groups": shell.param_groups is base_opt.param_groups,
                "grad_norm": [r["grad_norm"] for r in trainer.state.log_history if "grad_norm" in r],
                "schedule": {"updates": shell.schedule.updates, "second_passes": shell.schedule.second_passes}},
               f"{out}/rank{rank}.pt")


def reference_worker(rank: int, out: str, kw: dict) -> None:
    """The unsharded one-process run the FSDP workers are compared with (on the GPU when ``use_cpu`` is False),
    in a process of its own (Accelerate's state is one per process); writes out/reference.pt."""
    from fairseq_asam.integrations.transformers import ASAMSeq2SeqTrainer

    torch.set_num_threads(1)
    kw = dict(kw)
    n = kw.pop("n_examples", 8)
    args = trainer_args(f"{out}/reference-run", **kw)
    trainer = ASAMSeq2SeqTrainer(model=tiny_marian(dropout=0.0, tied=False), args=args, train_dataset=token_data(n),
                                 data_collator=collate)
    trainer.train()
    torch.save({"params": {name: p.detach().cpu().clone() for name, p in trainer.model.named_parameters()},
                "grad_norm": [r["grad_norm"] for r in trainer.state.log_history if "grad_norm" in r]},
               f"{out}/reference.pt")
