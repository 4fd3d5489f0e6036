"""The registered optimizers ``asam_adam`` and ``sam_adam``: fairseq's Adam plus the sharpness-aware flags.

ASAM (Kwon et al., ICML 2021, Section 4, Algorithm 1; T_w of Eq. 5 plus eta I) and SAM (Foret et al.,
T_w = I) around fairseq's own Adam, so every Adam flag (``--adam-betas``, ``--weight-decay``, ``--lr``,
schedulers, ``--fp16``, ...) keeps working. The optimizer holds the hyper-parameters and the policy, builds
the update's driver (:meth:`FairseqSharpnessAdam.build_driver`) and does the *descent* (Adam's step); the
task (``--task translation_sam``, see ``task.py``) holds the driver and runs the update. With a task that
does not run the second pass, fairseq-train stops at startup with one line instead of silently training
plain Adam. Example (from the repository root, after ``make install``)::

    fairseq-train data-bin/iwslt14.tokenized.de-en --user-dir fairseq_asam --task translation_sam \\
        --arch transformer_iwslt_de_en --optimizer asam_adam --asam-rho 0.2 --adam-betas '(0.9, 0.98)' \\
        --lr 5e-4 --lr-scheduler inverse_sqrt --warmup-updates 4000 --max-tokens 4096
"""

# No `from __future__ import annotations`: fairseq reads the dataclass field types at runtime.
from contextlib import contextmanager
from dataclasses import dataclass, field, make_dataclass
from typing import Any

from fairseq.dataclass import ChoiceEnum
from fairseq.optim import register_optimizer
from fairseq.optim.adam import FairseqAdam, FairseqAdamConfig
from omegaconf import II

from .. import _compat, checks
from .. import schedule as _schedule
from ..core import Perturbation, UpdateDriver
from ..schedule import Schedule
from . import scheduled

__all__ = ["AsamAdamConfig", "SamAdamConfig", "FairseqASAMAdam", "FairseqSAMAdam", "find_sharpness_optimizer"]

NORMALIZATION_CHOICES = ChoiceEnum(["element", "filter"])


# ---- flag checks: the one checker (fairseq_asam.checks), told fairseq's flag names ------------------

FLAGS = {"rho": "--asam-rho", "eta": "--asam-eta", "p": "--asam-p", "normalization": "--asam-normalization"}


def _number(v, flag: str):
    # Hydra may hand a value over as text; the checker wants a number, or says which flag was wrong.
    if isinstance(v, str):
        try:
            return float(v)
        except ValueError:
            raise ValueError(f"{flag} must be a number, got {v!r}") from None
    return v


def check_rho(v) -> float:
    return checks.check_rho(_number(v, FLAGS["rho"]), FLAGS["rho"])


def check_eta(v) -> float:
    return checks.check_eta(_number(v, FLAGS["eta"]), FLAGS["eta"])


def check_p(v) -> float:
    return checks.check_p(v, FLAGS["p"])


def check_normalization(v) -> str:
    return checks.check_normalization(v, FLAGS["normalization"])


# The cheaper-update policies' flags (--asam-every, ...), one per option of fairseq_asam.schedule.
SCHEDULE_FLAGS = _schedule.flags("--asam-")

_FLAG_CHECKS = {
    "--asam-rho": checks.argparse_type(checks.check_rho, FLAGS["rho"]),
    "--asam-eta": checks.argparse_type(checks.check_eta, FLAGS["eta"]),
    "--asam-p": checks.argparse_type(checks.check_p, FLAGS["p"], convert=str),
    **{SCHEDULE_FLAGS[name]: checks.argparse_type(o.check, SCHEDULE_FLAGS[name], convert=o.type)
       for name, o in _schedule.options().items() if o.choices is None},
}


# ---- configs -------------------------------------------------------------------------------------


# Cheaper updates (fairseq_asam.schedule; docs/efficiency.md compares them), at most one: a field per policy
# option (--asam-every, --asam-reuse-alpha, --asam-start, --asam-adaptive-c, --asam-one-pass), with its help.
_ScheduleConfig = make_dataclass(
    "_ScheduleConfig", _schedule.dataclass_fields("asam_", choice_enum=ChoiceEnum), bases=(FairseqAdamConfig,)
)


@dataclass
class _SharpnessAdamConfig(_ScheduleConfig):
    asam_p: float = field(
        default=2.0,
        metadata={
            "help": "the norm of the perturbation region: 2 (the paper's choice, eps = rho T^2 g / ||T g||_2) "
            "or inf (eps = rho T sign(g))"
        },
    )
    # Read from the rest of the config (not command-line flags of their own): the second pass clips
    # its gradient exactly as fairseq clipped the first one, and some setups are refused up front.
    max_update: int = II("optimization.max_update")
    clip_norm: float = II("optimization.clip_norm")
    # --amp: an overflow in the second pass is retried (at the lowered scale) as often as the Trainer retries
    # a first-pass overflow.
    amp_batch_retries: int = II("common.amp_batch_retries")
    use_bmuf: bool = II("optimization.use_bmuf")
    ddp_backend: Any = II("distributed_training.ddp_backend")


@dataclass
class AsamAdamConfig(_SharpnessAdamConfig):
    asam_rho: float = field(
        default=0.2,
        metadata={
            "help": "radius rho of the perturbation region ||T_w^-1 eps||_p <= rho (default 0.2: the paper's "
            "ASAM value for IWSLT'14 DE-EN with Adam)"
        },
    )
    asam_eta: float = field(
        default=0.01,
        metadata={"help": "eta of the normalization operator T_w + eta I, for stability near w = 0 (paper: 0.01)"},
    )
    asam_normalization: NORMALIZATION_CHOICES = field(
        default="element",
        metadata={
            "help": "T_w: element (|w| + eta per entry) or filter (the L2 norm of each convolution filter + eta; "
            "for a transformer, which has no convolution filters, both are the same)"
        },
    )
    asam_normalize_bias: bool = field(
        default=False,
        metadata={"help": "normalize biases too (T = |b| + eta); off by default as in the paper (T = 1 on biases)"},
    )


@dataclass
class SamAdamConfig(_SharpnessAdamConfig):
    asam_rho: float = field(
        default=0.1,
        metadata={
            "help": "radius rho of the perturbation ball ||eps||_p <= rho (default 0.1: the paper's SAM value "
            "for IWSLT'14 DE-EN with Adam)"
        },
    )


# ---- the optimizers ------------------------------------------------------------------------------


class FairseqSharpnessAdam(FairseqAdam):
    """fairseq's Adam whose ``step()`` is the descent of a two-pass (SAM/ASAM) update."""

    adaptive = True

    def __init__(self, cfg, params):
        self.rho = check_rho(cfg.asam_rho)
        self.p = check_p(cfg.asam_p)
        if self.adaptive:
            self.eta = check_eta(cfg.asam_eta)
            self.normalization = check_normalization(cfg.asam_normalization)
            self.normalize_bias = bool(cfg.asam_normalize_bias)
        name = self.registry_name
        if getattr(cfg, "use_bmuf", False):
            raise ValueError(f"--optimizer {name} does not support --use-bmuf (its local steps have no second pass)")
        backend = str(getattr(cfg.ddp_backend, "value", cfg.ddp_backend))
        if backend == "fully_sharded":
            # Tried with fairscale 0.4.13 (its last release) on torch 2.14.1: it builds and imports, but fairseq's
            # wrapper gives it no compute device, so it needs CUDA; and it flattens each wrapped module's
            # parameters into one 1-D shard, which loses the names (the bias rule) and the filter shapes of
            # T_w, while the norm of eps must still be totalled over the shards. See docs/distributed.md.
            raise ValueError(
                f"--optimizer {name} does not support --ddp-backend fully_sharded: fairseq's sharding is "
                "fairscale's FSDP (unmaintained; needs CUDA; flattens parameters into 1-D shards, losing the "
                "parameter names and filter shapes ASAM's T_w needs). Use --ddp-backend pytorch_ddp, c10d, "
                "legacy_ddp or no_c10d; to shard a model that does not fit one GPU, use PyTorch's own FSDP2 "
                "(torch.distributed.fsdp.fully_shard), which fairseq_asam's ASAM/SAM support (docs/distributed.md)"
            )
        if backend == "slowmo":
            raise ValueError(
                f"--optimizer {name} does not support --ddp-backend {backend}; use pytorch_ddp, c10d, "
                "legacy_ddp or no_c10d"
            )
        if getattr(cfg, "tpu", False):
            raise ValueError(f"--optimizer {name} does not support --tpu")
        _check_task(name)
        self.schedule = _schedule_from(cfg)
        super().__init__(cfg, params)
        self.clip_norm = float(cfg.clip_norm)
        self.amp_batch_retries = int(cfg.amp_batch_retries)
        self._descent_allowed = False

    @property
    def registry_name(self) -> str:
        return "asam_adam" if self.adaptive else "sam_adam"

    def make_perturbation(self, model) -> Perturbation:
        """The core's perturbation object over the parameters the model's forward uses (fp16 ones under --fp16).

        Built from ``model.named_parameters()``, so the core's rule 'a name ending in bias is a bias' decides
        which tensors get T = 1.
        """
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        if self.adaptive:
            return Perturbation(named, rho=self.rho, eta=self.eta, p=self.p, normalization=self.normalization,
                                normalize_bias=self.normalize_bias)
        return Perturbation(named, rho=self.rho, p=self.p, adaptive=False)

    def build_driver(self, optimizer, model) -> UpdateDriver:
        """The update's driver over the weights the model's forward uses, with this optimizer's policy, reading
        the gradients and Adam's momentum behind fairseq's wrapper ``optimizer`` (the Trainer's). The task
        builds it once and holds it."""
        return UpdateDriver(self.make_perturbation(model), self.schedule,
                            momenta=lambda: scheduled.momenta(self, optimizer, model),
                            grads=lambda: scheduled.descent_grads(optimizer, model))

    def state_dict(self):
        """Adam's state dict plus the schedule's state (counters, stored direction, running statistics)."""
        state = dict(super().state_dict())
        state["asam_schedule"] = self.schedule.state_dict()
        return state

    def load_state_dict(self, state_dict, optimizer_overrides=None):
        state_dict = dict(state_dict)
        policy = state_dict.pop("asam_schedule", None)
        super().load_state_dict(state_dict, optimizer_overrides)
        if policy is not None:
            self.schedule.load_state_dict(policy)

    @contextmanager
    def descent(self):
        """Inside this block ``step()`` is allowed: the task has done the ascent and the second pass."""
        self._descent_allowed = True
        try:
            yield
        finally:
            self._descent_allowed = False

    def step(self, *args, **kwargs):
        if not self._descent_allowed:
            raise RuntimeError(
                f"--optimizer {self.registry_name} needs the two-pass sharpness-aware train step: add "
                "--task translation_sam (or use a task wrapped with fairseq_asam.fairseq_ext.SharpnessAwareTask). "
                "The task in use called optimizer.step() directly, which would silently train plain Adam."
            )
        return super().step(*args, **kwargs)

    @classmethod
    def add_args(cls, parser):
        super().add_args(parser)
        # Check values while parsing, so a bad flag stops the run before anything is written.
        actions = _compat.option_string_actions(parser)
        for flag, check in _FLAG_CHECKS.items():
            action = actions.get(flag)
            if action is not None:
                action.type = check


@register_optimizer("asam_adam", dataclass=AsamAdamConfig)
class FairseqASAMAdam(FairseqSharpnessAdam):
    """ASAM (Kwon et al. 2021) with fairseq's Adam as the base optimizer."""

    adaptive = True


@register_optimizer("sam_adam", dataclass=SamAdamConfig)
class FairseqSAMAdam(FairseqSharpnessAdam):
    """SAM (Foret et al. 2021) with fairseq's Adam as the base optimizer."""

    adaptive = False


def _schedule_from(cfg) -> Schedule:
    values = {}
    for name, o in _schedule.options().items():
        v = getattr(cfg, "asam_" + name, None)
        v = getattr(v, "value", v)  # ChoiceEnum members carry the string in .value
        values[name] = _number(v, SCHEDULE_FLAGS[name]) if isinstance(v, str) and o.choices is None else v
    total = int(getattr(cfg, "max_update", 0) or 0)
    policy = _schedule.make_schedule(**values, total_updates=total or None, flags=SCHEDULE_FLAGS)
    if policy.needs_total_updates:
        raise ValueError(f"{SCHEDULE_FLAGS[policy.key]} needs the run's length: set --max-update")
    return policy


def _check_task(name: str) -> None:
    """Stop when fairseq's Trainer builds this optimizer for a task that would call Adam's step directly.

    fairseq-train builds the optimizer before training (to log the learning rate), so this is a one-line
    message and exit status 1 at startup, not an error inside the first update. The task is the Trainer's
    own (a wrapped, unregistered task passes); an optimizer built outside a Trainer is not checked here
    (its step() refuses to run outside the two-pass update instead).
    """
    trainer = _compat.calling_trainer()
    if trainer is None:
        return
    task = getattr(trainer, "task", None)
    # SharpnessAwareTask (task.py) sets the flag; read as an attribute, so this module need not import it.
    if task is not None and not getattr(task, "runs_sharpness_aware_update", False):
        try:
            task_name = _compat.config_name(trainer.cfg.task)
        except Exception:  # a config without a registered name: say the class
            task_name = type(task).__name__
        raise SystemExit(
            f"fairseq-train: error: --optimizer {name} needs the two-pass sharpness-aware train step, which "
            f"--task {task_name} does not run: use --task translation_sam (or a task wrapped with "
            "fairseq_asam.fairseq_ext.make_sharpness_aware)"
        )


def find_sharpness_optimizer(optimizer):
    """The asam_adam/sam_adam instance inside fairseq's optimizer wrappers, or None.

    FP16Optimizer and AMPOptimizer keep it as ``fp32_optimizer``, MemoryEfficientFP16Optimizer as
    ``wrapped_optimizer``.
    """
    seen = 0
    while optimizer is not None and seen < 4:
        if isinstance(optimizer, FairseqSharpnessAdam):
            return optimizer
        optimizer = getattr(optimizer, "fp32_optimizer", None) or getattr(optimizer, "wrapped_optimizer", None)
        seen += 1
    return None
