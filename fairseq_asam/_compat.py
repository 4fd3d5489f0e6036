"""Every reach into a private attribute of torch, fairseq, numpy or argparse, in one place.

Each reach names why it is needed and the versions it was checked against; when the attribute is
missing it raises a ``RuntimeError`` that says so, instead of an ``AttributeError`` deep in a training
step, and a version newer than the checked range logs a warning once. ``tests/test_perturbation.py``
(``test_every_private_reach_resolves``) checks every reach against the installed versions, so an upgrade
that removes one fails there first. fairseq is imported only by the reaches that need it.

The Hugging Face integration overrides two private methods of ``transformers.Trainer`` (saving and loading
the optimizer beside its checkpoint): an override cannot be a function here, so those methods are
entries of :data:`REACHES` (``hf_save_optimizer``, ``hf_load_optimizer``) and the same test checks them.

Not fenced here: ``torch._foreach_*`` kernels (abs, add, addcmul, copy, mul, norm, sign, zero), called
directly by :mod:`fairseq_asam.core.kernels`, :mod:`fairseq_asam.core.perturb` and the fairseq task's
fp16 rescale, as ``torch.optim`` itself calls them; every one of them is in :data:`REACHES`, so the
same test fails first if an upgrade removes one.

    python -c "from fairseq_asam import _compat; print(_compat.check_all())"
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import inspect
import logging
import sys
import warnings
from dataclasses import dataclass

__all__ = [
    "REACHES",
    "batchnorm_base",
    "calling_trainer",
    "check_all",
    "config_name",
    "fp16_multiply_factor",
    "gradscaler_forget_unscale",
    "mark_optimizer_stepped",
    "numpy_reconstruct",
    "option_string_actions",
    "quiet_fairseq_import",
    "release_freed_host_memory",
    "set_fp16_multiply_factor",
    "tensor_placeholder_class",
]

logger = logging.getLogger(__name__)

@contextlib.contextmanager
def quiet_fairseq_import():
    """Import fairseq without letting it reconfigure the program's logging.

    One of fairseq's modules (tasks/text_to_speech.py) calls ``logging.basicConfig(level=DEBUG)`` at
    import, which would flood the program's output with every library's debug messages; a handler on
    the root logger makes basicConfig() a no-op, and the root logger is put back as it was.
    """
    root = logging.getLogger()
    level, handlers = root.level, list(root.handlers)
    root.addHandler(logging.NullHandler())
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # fairseq's torch.jit.script deprecation notes
            yield
    finally:
        root.setLevel(level)
        for h in root.handlers[:]:
            if h not in handlers:
                root.removeHandler(h)


# The newest release of each library these reaches were read against.
CHECKED = {"torch": "2.14.1", "fairseq": "0.12.3.1", "python": "3.13", "transformers": "5.23"}


def _version_tuple(v: str) -> tuple[int, ...]:
    out = []
    for part in v.split("+")[0].split("."):
        digits = "".join(ch for ch in part if ch.isdigit())
        if not digits:
            break
        out.append(int(digits))
    return tuple(out)


def _installed(lib: str) -> str:
    if lib == "python":
        return ".".join(map(str, sys.version_info[:3]))
    try:
        return str(importlib.import_module(lib).__version__)
    except Exception:  # pragma: no cover - a library without __version__
        return "unknown"


_guarded: set[str] = set()  # libraries already compared with CHECKED (once per process: it runs every update)


def _version_guard(lib: str) -> None:
    if lib in _guarded:
        return
    _guarded.add(lib)
    v = _installed(lib)
    if v != "unknown" and _version_tuple(v)[:2] > _version_tuple(CHECKED[lib])[:2]:
        warnings.warn(
            f"fairseq-asam reaches into private attributes of {lib}, checked up to {CHECKED[lib]}; "
            f"{lib} {v} is newer. Run its tests (tests/test_perturbation.py -k compat) if anything fails.",
            RuntimeWarning, stacklevel=3,
        )


def _get(lib: str, obj, attr: str, why: str):
    _version_guard(lib)
    try:
        return getattr(obj, attr)
    except AttributeError:
        raise RuntimeError(
            f"{type(obj).__name__ if not isinstance(obj, type) else obj.__name__}.{attr} does not exist in "
            f"{lib} {_installed(lib)}; fairseq-asam needs it for {why} (checked with {lib} <= {CHECKED[lib]}). "
            "Install a checked version or report this."
        ) from None


@dataclass(frozen=True)
class Reach:
    """One private attribute: ``attr`` of ``owner`` (a dotted path: module, then attributes), found on the
    object, or (``in_source``) in the owner's source where it is an instance attribute set at run time."""

    lib: str
    owner: str
    attr: str
    why: str
    in_source: bool = False

    def resolve(self):
        module, _, rest = self.owner.partition(":")
        obj = importlib.import_module(module)
        for part in filter(None, rest.split(".")):
            obj = getattr(obj, part)
        if self.in_source:
            _version_guard(self.lib)
            if self.attr not in inspect.getsource(obj):
                raise RuntimeError(
                    f"{self.owner} no longer sets {self.attr} in {self.lib} {_installed(self.lib)}; fairseq-asam "
                    f"needs it for {self.why} (checked with {self.lib} <= {CHECKED[self.lib]})"
                )
            return True
        return _get(self.lib, obj, self.attr, self.why)


REACHES = {
    "fp16_multiply_factor": Reach("fairseq", "fairseq.optim.fp16_optimizer:_FP16OptimizerMixin", "_multiply_factor",
                                  "the pending fp16 gradient factor around the ascent (--fp16)", in_source=True),
    "tensor_placeholder": Reach("fairseq", "fairseq.distributed.utils", "_TensorPlaceholder",
                                "loading checkpoints broadcast to ranks > 0 with torch.load(weights_only=True)"),
    "gradscaler_states": Reach("torch", "torch.amp.grad_scaler:GradScaler", "_per_optimizer_states",
                               "a second unscale of the same optimizer in one update (--amp)", in_source=True),
    "opt_called": Reach("torch", "torch.optim.lr_scheduler", "_opt_called",
                        "telling LR schedulers that descent_step() stepped the optimizer", in_source=True),
    "batchnorm": Reach("torch", "torch.nn.modules.batchnorm", "_BatchNorm",
                       "finding every BatchNorm layer to freeze its statistics in the second pass"),
    "argparse_actions": Reach("python", "argparse:ArgumentParser", "_option_string_actions",
                              "checking the --asam-* flags while fairseq parses them", in_source=True),
    "foreach_norm": Reach("torch", "torch", "_foreach_norm", "the foreach kernel's norms"),
    "foreach_addcmul": Reach("torch", "torch", "_foreach_addcmul_", "the foreach kernel"),
    "foreach_copy": Reach("torch", "torch", "_foreach_copy_", "the foreach kernel and the restore"),
    "foreach_abs": Reach("torch", "torch", "_foreach_abs_", "the foreach kernel (|w| of T_w)"),
    "foreach_add": Reach("torch", "torch", "_foreach_add_", "the foreach kernel (+ eta, w + eps)"),
    "foreach_mul": Reach("torch", "torch", "_foreach_mul_", "the foreach kernel; the fp16 rescale before the ascent"),
    "foreach_sign": Reach("torch", "torch", "_foreach_sign_", "the foreach kernel (p = inf)"),
    "foreach_zero": Reach("torch", "torch", "_foreach_zero_", "zeroing the gradients in place after the ascent"),
    "hf_save_optimizer": Reach("transformers", "transformers:Trainer", "_save_optimizer_and_scheduler",
                               "saving the ASAM shell's state (asam.pt) beside the Trainer's optimizer.pt"),
    "hf_load_optimizer": Reach("transformers", "transformers:Trainer", "_load_optimizer_and_scheduler",
                               "restoring asam.pt when the Trainer resumes from a checkpoint"),
}
_OPTIONAL = {"transformers"}  # reaches of an extra: checked where it is installed


def check_all() -> dict[str, str]:
    """Resolve every reach; returns {name: 'ok'} or raises the RuntimeError of the first one missing."""
    out = {}
    for name, r in REACHES.items():
        if r.lib in _OPTIONAL and importlib.util.find_spec(r.lib) is None:
            out[name] = "not installed"
            continue
        r.resolve()
        out[name] = "ok"
    return out


# ---- the reaches themselves ---------------------------------------------------------------------


def fp16_multiply_factor(optimizer):
    """fairseq's pending gradient factor of an FP16Optimizer/MemoryEfficientFP16Optimizer (1/(scale*sample
    size) times the clip coefficient, applied lazily in its step()), or None for other optimizers."""
    if not hasattr(optimizer, "scaler"):
        return None
    _version_guard("fairseq")
    return getattr(optimizer, "_multiply_factor", None)


def set_fp16_multiply_factor(optimizer, value) -> None:
    _get("fairseq", optimizer, "_multiply_factor", REACHES["fp16_multiply_factor"].why)
    optimizer._multiply_factor = value


def gradscaler_forget_unscale(scaler, optimizer) -> None:
    """Let ``scaler.unscale_(optimizer)`` run a second time in one update.

    GradScaler refuses a second unscale before update(); torch keeps that record in the private
    ``_per_optimizer_states``. Forgetting it loses nothing when the first unscale found no inf.
    """
    states = _get("torch", scaler, "_per_optimizer_states", REACHES["gradscaler_states"].why)
    states.pop(id(optimizer), None)


def mark_optimizer_stepped(optimizer) -> None:
    """Tell torch's LR schedulers that the optimizer stepped (they warn otherwise); they read ``_opt_called``."""
    _version_guard("torch")
    optimizer._opt_called = True


def calling_trainer():
    """The fairseq ``Trainer`` whose method is building the optimizer (its ``_build_optimizer`` is on the call
    stack), or None. fairseq hands the optimizer its config only; the Trainer holds the task, which decides
    whether the sharpness-aware optimizer can run. Read from the caller frames' ``self`` (no private
    attribute of fairseq), looked for within a few frames only."""
    if "fairseq.trainer" not in sys.modules:
        return None
    trainer_cls = sys.modules["fairseq.trainer"].Trainer
    frame = sys._getframe(1)
    for _ in range(12):
        if frame is None:
            return None
        obj = frame.f_locals.get("self")
        if isinstance(obj, trainer_cls):
            return obj
        frame = frame.f_back
    return None


def batchnorm_base() -> type:
    return REACHES["batchnorm"].resolve()


def tensor_placeholder_class() -> type:
    return REACHES["tensor_placeholder"].resolve()


def numpy_reconstruct() -> list[tuple[object, str]]:
    """numpy's array unpickler under both of its module names (numpy 1.x: numpy.core, 2.x: numpy._core):
    a checkpoint written under either must load under both."""
    out = []
    for mod in ("numpy.core.multiarray", "numpy._core.multiarray"):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                fn = importlib.import_module(mod)._reconstruct
        except (ImportError, AttributeError):
            continue
        out.append((fn, f"{mod}._reconstruct"))
    if not out:
        raise RuntimeError("numpy has no multiarray._reconstruct under numpy.core or numpy._core; "
                           "fairseq checkpoints holding numpy arrays cannot be allow-listed")
    return out


def option_string_actions(parser) -> dict:
    """argparse's map from option strings to actions (to attach checks to flags fairseq's dataclass adds)."""
    return _get("python", parser, "_option_string_actions", REACHES["argparse_actions"].why)


def config_name(node) -> str:
    """The registered name of a fairseq dataclass config node (fairseq stores it as ``_name``)."""
    return str(getattr(node, "_name", "") or getattr(node, "arch", "") or "")


_libc = None


def release_freed_host_memory() -> bool:
    """Hand the heap's free pages back to the OS (glibc's ``malloc_trim(0)``); False where there is no glibc.

    Not a setting: the allocator keeps its defaults. The fairseq task calls it on the CPU right after the
    ascent dropped the first-pass gradients, before the second pass allocates its activations and
    gradients. Without it glibc's dynamic mmap threshold leaves those freed gradients on the heap, and the
    second pass grows the heap around them, which raises the two-pass update's peak memory; a release on
    every update is paid again as page faults in the second pass, so the task releases every few updates
    (docs/performance.md has the measurements).
    """
    global _libc
    if _libc is None:
        import ctypes
        import ctypes.util

        name = ctypes.util.find_library("c")
        try:
            lib = ctypes.CDLL(name) if name else None
        except OSError:
            lib = None
        _libc = lib if lib is not None and hasattr(lib, "malloc_trim") else False
    if _libc is False:
        return False
    _libc.malloc_trim(0)
    return True
