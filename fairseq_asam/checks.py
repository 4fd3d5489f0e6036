"""The one argument checker for every front end: the Python API, fairseq flags, the vision and sharpness CLIs.

Each check takes the value and the name the user wrote it under (``rho=`` in Python, ``--asam-rho`` in
fairseq, ``--rho`` in ``asam-vision-train``), and either returns the value in canonical form or raises
``ValueError("<flag> must be ..., got <value>")``. :func:`argparse_type` turns a check into an argparse
``type=`` so a bad flag stops a command while it parses, before anything is written::

    python -c "from fairseq_asam.checks import check_rho; check_rho(-1, '--rho')"
    # ValueError: --rho must be > 0, got -1
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from typing import Any

__all__ = [
    "NORMALIZATIONS",
    "argparse_type",
    "check_bool",
    "check_eta",
    "check_every",
    "check_finite",
    "check_fraction",
    "check_int",
    "check_nonnegative",
    "check_normalization",
    "check_number",
    "check_p",
    "check_rho",
    "check_sharpness_hyperparameters",
]

NORMALIZATIONS = ("element", "filter")


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:g}"
    if isinstance(v, str):
        return repr(v)
    return str(v)


def check_number(value: Any, flag: str) -> float:
    """A real number (int, float, numpy or 0-d tensor scalar; not a bool, not a string)."""
    if isinstance(value, bool) or isinstance(value, str):
        raise ValueError(f"{flag} must be a number, got {value!r}")
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{flag} must be a number, got {value!r}") from None


def check_rho(value: Any, flag: str = "rho=") -> float:
    """The radius rho: a finite number > 0."""
    v = check_number(value, flag)
    if not math.isfinite(v):
        raise ValueError(f"{flag} must be a finite number > 0, got {_fmt(v)}")
    if v <= 0:
        raise ValueError(f"{flag} must be > 0, got {_fmt(value)}")
    return v


def check_eta(value: Any, flag: str = "eta=") -> float:
    """eta of T_w + eta I: a finite number >= 0."""
    v = check_number(value, flag)
    if not math.isfinite(v) or v < 0:
        raise ValueError(f"{flag} must be a finite number >= 0, got {_fmt(value)}")
    return v


def check_p(value: Any, flag: str = "p=") -> float:
    """The norm of the region: 2 or inf (``float("inf")`` or the string ``"inf"``); returns 2.0 or inf."""
    if isinstance(value, str):
        try:
            v = float(value)
        except ValueError:
            raise ValueError(f"{flag} must be 2 or inf, got {value!r}") from None
    else:
        v = check_number(value, flag)
    if v not in (2.0, math.inf):
        raise ValueError(f"{flag} must be 2 or inf, got {_fmt(v) if isinstance(value, str) else _fmt(value)}")
    return v


def check_normalization(value: Any, flag: str = "normalization=") -> str:
    """T_w element-wise or filter-wise (paper Eq. 5)."""
    v = getattr(value, "value", value)  # fairseq's ChoiceEnum members carry the string in .value
    if v not in NORMALIZATIONS:
        raise ValueError(f"{flag} must be one of {', '.join(NORMALIZATIONS)}, got {value!r}")
    return str(v)


def check_bool(value: Any, flag: str) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{flag} must be True or False, got {value!r}")
    return value


def check_int(value: Any, flag: str, minimum: int | None = None, maximum: int | None = None) -> int:
    """An integer in [minimum, maximum] (either bound optional)."""
    if isinstance(value, bool) or not isinstance(value, int):
        try:
            if isinstance(value, bool) or float(value) != int(value):
                raise ValueError
            value = int(value)
        except (TypeError, ValueError, OverflowError):
            raise ValueError(f"{flag} must be an integer, got {value!r}") from None
    if minimum is not None and maximum is not None and not minimum <= value <= maximum:
        raise ValueError(f"{flag} must be in [{minimum}, {maximum}], got {value}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{flag} must be >= {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise ValueError(f"{flag} must be <= {maximum}, got {value}")
    return value


def check_every(value: Any, flag: str = "every=") -> int:
    """k of a schedule that runs the second pass every k-th update: an integer >= 1."""
    return check_int(value, flag, minimum=1)


def check_finite(value: Any, flag: str) -> float:
    """Any finite real number (e.g. the c of the adaptive trigger, which may be negative)."""
    v = check_number(value, flag)
    if not math.isfinite(v):
        raise ValueError(f"{flag} must be a finite number, got {_fmt(v)}")
    return v


def check_nonnegative(value: Any, flag: str) -> float:
    """A finite number >= 0 (e.g. Look-ASAM's alpha)."""
    v = check_finite(value, flag)
    if v < 0:
        raise ValueError(f"{flag} must be >= 0, got {_fmt(value)}")
    return v


def check_fraction(value: Any, flag: str) -> float:
    """A fraction of training in [0, 1]."""
    v = check_number(value, flag)
    if not (0.0 <= v <= 1.0):
        raise ValueError(f"{flag} must be in [0, 1], got {_fmt(value)}")
    return v


def check_sharpness_hyperparameters(
    rho: Any,
    eta: Any,
    p: Any,
    normalization: Any = "element",
    *,
    flags: dict[str, str] | None = None,
) -> tuple[float, float, float, str]:
    """rho, eta, p and normalization together; ``flags`` maps each name to the front end's flag."""
    f = {"rho": "rho=", "eta": "eta=", "p": "p=", "normalization": "normalization="}
    f.update(flags or {})
    return (check_rho(rho, f["rho"]), check_eta(eta, f["eta"]), check_p(p, f["p"]),
            check_normalization(normalization, f["normalization"]))


def argparse_type(check: Callable[..., Any], flag: str, *, convert: Callable[[str], Any] = float) -> Callable[[str], Any]:
    """An argparse ``type=``: converts the text with ``convert`` then runs ``check(value, flag)``.

    argparse prints ``argument --rho: --rho must be > 0, got -1`` and exits with status 2.
    """

    def parse(text: str):
        try:
            try:
                value = convert(text)
            except (TypeError, ValueError):
                kind = "an integer" if convert is int else "a number"
                raise ValueError(f"{flag} must be {kind}, got {text!r}") from None
            return check(value, flag)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    parse.__name__ = getattr(check, "__name__", "value").replace("check_", "")
    return parse
