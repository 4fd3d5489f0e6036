"""ASAM and SAM in Hugging Face Transformers' ``Trainer`` and ``Seq2SeqTrainer`` (Kwon et al., ICML 2021, Section 4).

:class:`ASAMTrainer` / :class:`ASAMSeq2SeqTrainer` run the update's one sequence
(:meth:`fairseq_asam.core.UpdateDriver.finish`, the same for every front end) around the Trainer's own
passes; :class:`ASAMTrainingArguments` / :class:`ASAMSeq2SeqTrainingArguments` add the ``asam_*``
arguments (mode, rho, eta, p, normalization, biases and a cheaper-update policy of
:mod:`fairseq_asam.schedule`, its fields generated from the policies' own declarations). The base
optimizer is the one the Trainer builds (``optim``, AdamW by default); the LR scheduler, gradient
clipping, Accelerate's GradScaler and its checkpoints see it as usual: the ASAM shell shares its
``param_groups``. One update, for the micro-batches b_1..b_N of one accumulated batch:

1. ``begin_step()`` (a one-pass policy moves w to w + eps here);
2. the first forward/backward over b_1..b_N at w, the random state saved before each; the earlier
   micro-batches under DDP's ``no_sync``, the last one all-reduced (see DDP below);
3. ``wants_second_pass(scale=<the GradScaler's scale>)``; where True, ``ascent_step()`` (w -> w + eps
   from the accumulated g; False on a non-finite g: ``skip_step()`` and the Trainer skips the update as
   after an fp16 overflow) and the second forward/backward over the *same* b_1..b_N, each with its first
   pass's random state (the same dropout masks), the last one all-reduced; the random state after the
   first pass is put back;
4. ``end_step()``: w restored bit for bit, the policy's gradient rule, its counters;
5. the Trainer's own clipping (``max_grad_norm`` acts on g'), ``optimizer.step()`` (through the
   GradScaler under fp16: g' unscaled once), LR scheduler step and ``zero_grad``.

Gradient accumulation: one perturbation per accumulated batch (the fairseq task's ``--update-freq``
semantics): eps comes from the gradient of the whole accumulated batch and the second pass replays the
recorded micro-batches. DDP (torchrun / Accelerate): the first pass all-reduces once, in its last
micro-batch's backward, so g and eps are the same on every worker; the second pass all-reduces the same
way. FSDP2 (``fsdp=True``): Accelerate puts the sharded parameters (DTensors) into the optimizer; the shell
is built over them on the first update, each rank perturbs its slices and the norm of T g is totalled over
the ranks (:mod:`fairseq_asam.core.sharded`), so eps is the global batch's, as under DDP. fp16: eps is
invariant to the scale the first-pass gradient carries (p = 2 divides by the norm, p = inf takes the sign),
so it is not unscaled. Checkpoints: ``asam.pt`` beside ``optimizer.pt`` holds the shell's own state (the
policy's included; under FSDP its per-parameter tensors are shards in ``asam_sharded/``, DCP);
``resume_from_checkpoint`` restores it.

    python -m fairseq_asam.integrations.transformers   # prints the asam_* arguments
"""

import contextlib
import dataclasses
import os
import sys

import torch
from transformers import Seq2SeqTrainer, Seq2SeqTrainingArguments, Trainer, TrainingArguments

from .. import checks, schedule
from ..core import ASAM, SAM, sharded
from ..core.update import UpdateAdapter, signal_overflow

__all__ = [
    "ASAMSeq2SeqTrainer", "ASAMSeq2SeqTrainingArguments", "ASAMTrainer", "ASAMTrainingArguments",
    "SharpnessArguments", "SharpnessAwareMixin",
]

STATE_NAME = "asam.pt"  # beside the Trainer's optimizer.pt in each checkpoint folder
SHARDED_STATE_NAME = "asam_sharded"  # under FSDP: the policy's per-parameter tensors (DCP), beside asam.pt
MODES = ("asam", "sam", "none")
# The paper's IWSLT'14 values (Section 5.2): rho 0.2 for ASAM, 0.1 for SAM.
DEFAULT_RHO = {"asam": 0.2, "sam": 0.1}
_ASAM_ONLY = {"asam_eta": 0.01, "asam_normalization": "element", "asam_normalize_bias": False}


def _field(default, help_text):
    return dataclasses.field(default=default, metadata={"help": help_text})


_OWN_FIELDS = [
    ("asam_mode", str, _field("asam", "asam (T_w = |w| + eta, Kwon et al. 2021), sam (T_w = I, Foret et al. "
                                      "2021) or none (the Trainer's plain update)")),
    ("asam_rho", float | None, _field(None, "radius rho of the perturbation (default: 0.2 for asam, 0.1 for "
                                            "sam, the paper's IWSLT'14 values)")),
    ("asam_eta", float, _field(0.01, "eta of T_w = |w| + eta (asam only)")),
    ("asam_p", str, _field("2", "the norm of the region: 2 or inf")),
    ("asam_normalization", str, _field("element", "element (|w| + eta) or filter (the L2 norm of each "
                                                  "filter of a >= 3-D weight; asam only)")),
    ("asam_normalize_bias", bool, _field(False, "also normalize biases (T = |b| + eta; asam only; the "
                                                "paper's default is T = 1 on biases)")),
]
# One field per option of the cheaper-update policies, generated from their declarations (asam_every, ...).
_SCHEDULE_FIELDS = schedule.dataclass_fields("asam_")
_FLAGS = {name: "asam_" + name for name in schedule.options()}


class _SharpnessChecks:
    """The checks of the asam_* arguments, run in ``__post_init__``: a bad value stops the program while the
    arguments are built, before the Trainer exists, a model is loaded or anything is written."""

    def __post_init__(self):
        self._check_sharpness_arguments()
        parent = getattr(super(), "__post_init__", None)
        if parent is not None:
            parent()
        self._check_fsdp_arguments()  # after the Trainer's own __post_init__ resolved fsdp_config

    def _check_sharpness_arguments(self) -> None:
        if self.asam_mode not in MODES:
            raise ValueError(f"asam_mode must be one of {', '.join(MODES)}, got {self.asam_mode!r}")
        policy = self.sharpness_schedule()  # checks every policy option, naming its asam_* argument
        if self.asam_mode == "none":
            if type(policy) is not schedule.Full or self.asam_rho is not None:
                given = ["asam_rho"] if self.asam_rho is not None else []
                given += [f for f in _FLAGS.values() if getattr(self, f) not in (None, _off(f))]
                raise ValueError(f"{', '.join(given)} given with asam_mode='none' (the plain update); set "
                                 "asam_mode to asam or sam, or drop them")
            return
        rho = DEFAULT_RHO[self.asam_mode] if self.asam_rho is None else self.asam_rho
        checks.check_sharpness_hyperparameters(
            rho, self.asam_eta, self.asam_p, self.asam_normalization,
            flags={"rho": "asam_rho", "eta": "asam_eta", "p": "asam_p", "normalization": "asam_normalization"})
        checks.check_bool(self.asam_normalize_bias, "asam_normalize_bias")
        if self.asam_mode == "sam":
            changed = [k for k, v in _ASAM_ONLY.items() if getattr(self, k) != v]
            if changed:
                raise ValueError(f"{', '.join(changed)} apply to asam_mode='asam' only (SAM has T_w = I)")
        # DeepSpeed's engine owns the optimizer step (and ZeRO its partitioned gradients): no place for the
        # ascent between the passes.
        if getattr(self, "deepspeed", None):
            raise ValueError(f"deepspeed with asam_mode={self.asam_mode!r}: DeepSpeed runs the optimizer step "
                             "inside its engine; use FSDP (fsdp=True), DDP (torchrun) or asam_mode='none'")
        optim = str(getattr(getattr(self, "optim", ""), "value", getattr(self, "optim", "")))
        if "lomo" in optim:
            raise ValueError(f"optim={optim!r} with asam_mode={self.asam_mode!r}: LOMO optimizers step inside "
                             "the backward pass, so no gradient exists to take the ascent from")
        policy.check_mode(sharded="fsdp" if getattr(self, "fsdp", None) else None)

    def _check_fsdp_arguments(self) -> None:
        """FSDP2 only: its parameters are DTensors sharded along dim 0, which the core perturbs shard by shard
        with the norm totalled over the ranks (:mod:`fairseq_asam.core.sharded`)."""
        plugin = getattr(self, "fsdp_plugin_args", None)
        if self.asam_mode == "none" or not plugin:
            return
        if (self.fsdp_config or {}).get("xla"):
            raise ValueError(f"fsdp_config['xla'] with asam_mode={self.asam_mode!r}: XLA's FSDP wraps its own flat "
                             "parameters, which the sharpness-aware step does not read; use FSDP2 on GPUs")
        if plugin.get("fsdp_version") != 2:
            raise ValueError(
                f"fsdp_config['version'] = {plugin.get('fsdp_version')} (FSDP1) with asam_mode={self.asam_mode!r}: "
                "FSDP1 flattens many tensors into one, so T_w's filters and the norm of T g cannot be read from "
                "its shards; use fsdp_config['version'] = 2 (FSDP2, the default)")

    def sharpness_schedule(self, total_updates: int | None = None) -> schedule.Schedule:
        """The cheaper-update policy the asam_* options describe (:class:`~fairseq_asam.schedule.Full` if none)."""
        values = {name: getattr(self, flag) for name, flag in _FLAGS.items()}
        return schedule.make_schedule(total_updates=total_updates, flags=_FLAGS, **values)

    def sharpness_rho(self) -> float:
        return DEFAULT_RHO[self.asam_mode] if self.asam_rho is None else float(self.asam_rho)


def _off(flag: str):
    return schedule.options()[flag[len("asam_"):]].off


SharpnessArguments = dataclasses.make_dataclass(
    "SharpnessArguments", _OWN_FIELDS + _SCHEDULE_FIELDS, bases=(_SharpnessChecks,))
SharpnessArguments.__module__ = __name__
SharpnessArguments.__doc__ = """The asam_* arguments alone (a mixin for any TrainingArguments subclass)."""


@dataclasses.dataclass
class ASAMTrainingArguments(SharpnessArguments, TrainingArguments):
    """``TrainingArguments`` plus the asam_* arguments (``HfArgumentParser`` turns them into ``--asam_*`` flags)."""


@dataclasses.dataclass
class ASAMSeq2SeqTrainingArguments(SharpnessArguments, Seq2SeqTrainingArguments):
    """``Seq2SeqTrainingArguments`` plus the asam_* arguments."""


class SharpnessAwareMixin:
    """Turns a ``Trainer`` (or a subclass of it) into one whose updates are ASAM/SAM updates.

    Put it first: ``class MyTrainer(SharpnessAwareMixin, Seq2SeqTrainer)``. ``args`` must carry the
    asam_* arguments (:class:`ASAMTrainingArguments`, :class:`ASAMSeq2SeqTrainingArguments`, or your own
    dataclass with :class:`SharpnessArguments` as a base).
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if not isinstance(self.args, SharpnessArguments):
            raise TypeError(f"{type(self).__name__} needs args with the asam_* arguments (ASAMTrainingArguments, "
                            f"ASAMSeq2SeqTrainingArguments), got {type(self.args).__name__}")
        self._sharpness: ASAM | None = None  # built over the Trainer's optimizer once Accelerate prepared it
        self._sharpness_loaded: dict | None = None  # a checkpoint's asam.pt, applied when the shell is built
        self._update_of = -1  # the global step the driver's recorded micro-batches belong to

    # -- the optimizer ---------------------------------------------------------------------------

    def _base_optimizer(self):
        # Accelerate's AcceleratedOptimizer holds the torch optimizer the Trainer built.
        return getattr(self.optimizer, "optimizer", self.optimizer)

    @property
    def sharpness_optimizer(self) -> ASAM | None:
        """The ASAM/SAM shell over the Trainer's optimizer (None before training starts, or in mode none)."""
        if self.args.asam_mode == "none" or self.optimizer is None:
            return None
        base = self._base_optimizer()
        opt = self._sharpness
        if opt is not None and opt.base_optimizer is base and opt.param_groups is base.param_groups:
            return opt
        # First use, or the Trainer/Accelerate replaced the optimizer or its param_groups list (they
        # reload state dicts after building it): build the shell anew, carrying its state over.
        carried = self._sharpness_loaded
        if opt is not None:
            carried = self._shell_state(opt)
        self._sharpness, self._sharpness_loaded = self._build_shell(base), None
        if carried is not None:
            self._sharpness.load_state_dict({"base": base.state_dict(), **carried})
        return self._sharpness

    def _build_shell(self, base) -> ASAM:
        a = self.args
        mine = {id(t) for g in base.param_groups for t in g["params"]}
        # Names decide the bias rule (a name ending in "bias": T = 1 unless asam_normalize_bias). Under FSDP2
        # the model's parameters are the DTensors Accelerate put into the optimizer's groups when it sharded
        # the model, so the shell is built after that (on the first update), never before.
        named = [(n, t) for n, t in self.model.named_parameters() if id(t) in mine]
        if len(named) != len(mine):
            raise RuntimeError(f"{len(mine) - len(named)} of the optimizer's {len(mine)} parameters are not "
                               "parameters of the model (were they replaced after the optimizer was built?)")
        policy = a.sharpness_schedule(total_updates=self.state.max_steps or None)
        if a.asam_mode == "sam":
            return SAM(named, base, rho=a.sharpness_rho(), p=a.asam_p, schedule=policy)
        return ASAM(named, base, rho=a.sharpness_rho(), eta=a.asam_eta, p=a.asam_p,
                    normalization=a.asam_normalization, normalize_bias=a.asam_normalize_bias, schedule=policy)

    @staticmethod
    def _shell_state(opt: ASAM) -> dict:
        state = opt.state_dict()
        state.pop("base")  # the Trainer saves the base optimizer itself (optimizer.pt)
        return state

    # -- one update --------------------------------------------------------------------------------

    def training_step(self, model, inputs, num_items_in_batch=None):
        opt = self.sharpness_optimizer
        if opt is None or opt.driver.replaying:  # mode none, or the second pass's own calls
            return super().training_step(model, inputs, num_items_in_batch)
        drv = opt.driver
        if not drv.recorded or self._update_of != self.state.global_step:
            # An update starts (micro-batches left by an update that raised are dropped; begin_step undoes
            # a perturbation it left).
            self._update_of = self.state.global_step
            drv.begin_step()
        # The Trainer runs the earlier micro-batches under no_sync and lets the last one all-reduce: g is
        # then the same on every worker, and so is eps.
        with drv.first_pass(inputs, device=self.args.device):
            loss = super().training_step(model, inputs, num_items_in_batch)
        if self.accelerator.sync_gradients:  # the Trainer set it: this was the update's last micro-batch
            scaler = self.accelerator.scaler
            scale = float(scaler.get_scale()) if scaler is not None and scaler.is_enabled() else 1.0
            drv.finish(_TrainerUpdate(self, opt, model, num_items_in_batch), scale=scale)
        return loss

    def log(self, logs: dict, *args, **kwargs) -> None:
        """The Trainer's training logs, plus ||eps|| of the last ascent and the fraction of updates that ran
        the second pass (1.0 for the full update)."""
        opt = self._sharpness if self.args.asam_mode != "none" else None
        if opt is not None and "loss" in logs:
            if opt.last_eps_norm is not None:
                logs["asam_eps_norm"] = round(float(opt.last_eps_norm), 6)
            logs["asam_second_pass_fraction"] = round(opt.schedule.fraction, 4)
        super().log(logs, *args, **kwargs)

    # -- checkpoints -------------------------------------------------------------------------------

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        super()._save_optimizer_and_scheduler(output_dir)
        opt = self.sharpness_optimizer
        if opt is None:
            return
        state = self._shell_state(opt)
        if getattr(self, "is_fsdp_enabled", False):
            # The policy's per-parameter tensors are each rank's shards: every rank writes them (DCP, beside
            # Accelerate's sharded model and optimizer); asam.pt keeps the rest, the same on every rank.
            import torch.distributed.checkpoint as dcp

            state["schedule"], tensors = sharded.split_schedule_state(opt)
            if tensors:  # the same on every rank: the policy's state has the same keys everywhere
                dcp.save({"schedule": tensors}, checkpoint_id=os.path.join(output_dir, SHARDED_STATE_NAME))
        if self.args.should_save:
            torch.save(state, os.path.join(output_dir, STATE_NAME))

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is None or self.args.asam_mode == "none":
            return
        path = os.path.join(checkpoint, STATE_NAME)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path} is missing: the checkpoint was not written by an ASAM/SAM Trainer, "
                                    "so the sharpness-aware state (the schedule's) cannot be resumed")
        state = torch.load(path, map_location="cpu", weights_only=True)
        self._sharpness, self._sharpness_loaded = None, state
        if getattr(self, "is_fsdp_enabled", False):
            # Here, after Accelerate sharded the model and loaded the optimizer's shards: the shell is built
            # over the sharded parameters, and DCP fills the policy's tensors as shards shaped like them.
            import torch.distributed.checkpoint as dcp

            self._sharpness_loaded = None
            opt = self.sharpness_optimizer
            templates = sharded.schedule_templates(opt, state.get("schedule", {}))
            if templates:
                loaded = {"schedule": templates}
                dcp.load(loaded, checkpoint_id=os.path.join(checkpoint, SHARDED_STATE_NAME))
                templates = loaded["schedule"]
            state["schedule"] = sharded.join_schedule_state(opt, state.get("schedule", {}), templates)
            opt.load_state_dict({"base": self._base_optimizer().state_dict(), **state})


class _TrainerUpdate(UpdateAdapter):
    """The Trainer's side of the update: a micro-batch's ``training_step`` again at w + eps (the earlier ones
    under Accelerate's ``no_sync``, the last one all-reduced); the Trainer steps the optimizer itself after
    the update's last ``training_step`` returns (clipping, GradScaler, LR scheduler), so the base step here
    is nothing."""

    def __init__(self, trainer, opt: ASAM, model, num_items_in_batch):
        self.trainer, self.opt, self.model, self.num_items_in_batch = trainer, opt, model, num_items_in_batch

    def rerun(self, inputs, last: bool) -> None:
        t = self.trainer
        with contextlib.nullcontext() if last else t.accelerator.no_sync(self.model):
            t.training_step(self.model, inputs, self.num_items_in_batch)

    def base_step(self) -> None:
        pass

    def skip(self) -> None:
        """A non-finite first-pass gradient: the Trainer's own step must be skipped. Under a GradScaler an inf
        gradient makes it do exactly what it does after an fp16 overflow (no optimizer step, the scale backed
        off, no LR scheduler step); without one, no gradient is left and the base step moves nothing."""
        self.opt.zero_grad()
        scaler = self.trainer.accelerator.scaler
        if scaler is not None and scaler.is_enabled():
            signal_overflow(self.opt.perturbation.params())


class ASAMTrainer(SharpnessAwareMixin, Trainer):
    """``transformers.Trainer`` whose updates are ASAM/SAM updates (args: :class:`ASAMTrainingArguments`)."""


class ASAMSeq2SeqTrainer(SharpnessAwareMixin, Seq2SeqTrainer):
    """``transformers.Seq2SeqTrainer`` whose updates are ASAM/SAM updates (args:
    :class:`ASAMSeq2SeqTrainingArguments`)."""


def _print_arguments() -> None:
    for f in dataclasses.fields(SharpnessArguments):
        print(f"--{f.name} (default {f.default!r}): {f.metadata.get('help', '')}")


if __name__ == "__main__":
    _print_arguments()
    sys.exit(0)
