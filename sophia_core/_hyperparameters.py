"""Hyperparameters and options: defaults, the host-spelling table, and the one validator.

Every adapter validates every hyperparameter and option through
:func:`validate_hyperparameters`, so the accepted types, the ranges and the
messages exist once. A wrong *type* is a ``TypeError``; a value of the right
type outside its range is a ``ValueError``; both name the parameter with
its host spellings (``b1 (betas[0], beta_1) ...``).
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Callable, Collection
from typing import Any

__all__ = [
    "ALIASES",
    "DEFAULTS",
    "MAX_INTERVAL",
    "PROBES",
    "Hyperparameters",
    "validate_hyperparameters",
]

#: The reference code's defaults (SPEC section 1), the refresh schedule, and
#: the options added since (all off or neutral by default).
DEFAULTS: dict[str, Any] = {
    "lr": 1e-4,
    "b1": 0.965,
    "b2": 0.99,
    "gamma": 0.04,
    "weight_decay": 0.1,
    "eps": 1e-12,
    "clip_threshold": 1.0,
    "hessian_interval": 10,
    "refresh_at_start": True,
    "bias_correction": False,
    "maximize": False,
    # h <- b2n*h + (1-b2n)*hhat with b2n = 1 - (1-b2)/(1-b2**n) at the n-th refresh.
    "hessian_bias_correction": False,
    # gamma re-set at each refresh so that this share of coordinates is unclipped.
    "target_unclipped_share": None,
    # Warn (torch, Keras) or raise (JAX, at trace time) when no Hessian
    # estimate ever reaches the optimizer; False for plain sign momentum.
    "require_refresh": True,
    # Warn once when the unclipped share stays near 0 (Sophia acting as sign momentum).
    "warn_sign_momentum": True,
    # Share of a batch's sequences the in-loop Sophia-G estimate uses.
    "hessian_batch_fraction": 0.25,
}

#: How each host spells the core's names. Error messages quote these, so a
#: torch user reading "b1" also sees "betas[0]".
ALIASES: dict[str, tuple[str, ...]] = {
    "lr": ("learning_rate",),
    "b1": ("betas[0]", "beta_1"),
    "b2": ("betas[1]", "beta_2"),
    "gamma": ("rho",),
    "weight_decay": ("wd",),
    "eps": ("epsilon",),
    "clip_threshold": ("clip",),
    "hessian_interval": ("k", "update_interval"),
    "n_probes": ("num_probes",),
}

#: Hutchinson probe distributions the core can build from noise.
PROBES = ("gaussian", "rademacher")

#: The largest ``hessian_interval`` and ``n_probes``: counters and indices
#: stay within int32 on every host.
MAX_INTERVAL = 2**31 - 1

_INF = math.inf
#: name -> (low, high, low_open, high_open) for the real-valued ones.
_REAL_RANGES: dict[str, tuple[float, float, bool, bool]] = {
    "lr": (0.0, _INF, False, True),
    "b1": (0.0, 1.0, False, True),
    "b2": (0.0, 1.0, False, True),
    "gamma": (0.0, _INF, False, True),
    "weight_decay": (0.0, _INF, False, True),
    "eps": (0.0, _INF, True, True),
    "clip_threshold": (0.0, _INF, True, True),
    "target_unclipped_share": (0.0, 1.0, True, True),
    "hessian_batch_fraction": (0.0, 1.0, True, False),
}
#: name -> (low, high) for the integer-valued ones (both inclusive).
_INTEGER_RANGES: dict[str, tuple[int, int]] = {
    "hessian_interval": (1, MAX_INTERVAL),
    "n_probes": (1, MAX_INTERVAL),
    "ignore_index": (-(2**63), 2**63 - 1),
}
_FLAGS = ("refresh_at_start", "bias_correction", "maximize", "hessian_bias_correction",
          "require_refresh", "warn_sign_momentum")
#: Real-valued names for which None means "off".
_OPTIONAL = ("target_unclipped_share",)


def _spelled(name: str) -> str:
    aliases = ALIASES.get(name)
    return f"{name} ({', '.join(aliases)})" if aliases else name


def _shown(value: Any) -> str:
    """A value as an error message shows it: its type, and its repr if short."""
    text = repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    return f"{type(value).__name__} {text}"


def _is_bool(value: Any) -> bool:
    kind = type(value)
    return isinstance(value, bool) or (kind.__module__ == "numpy" and kind.__name__ in (
        "bool", "bool_"))


def _is_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not _is_bool(value)


def _is_integer(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not _is_bool(value)


def _interval(low: float, high: float, low_open: bool, high_open: bool) -> str:
    return ("(" if low_open else "[") + f"{low:g}, {high:g}" + (")" if high_open else "]")


def _check_range(name: str, value: float, low: float, high: float, low_open: bool,
                 high_open: bool) -> None:
    below = value <= low if low_open else value < low
    above = value >= high if high_open else value > high
    if math.isnan(value) or below or above:
        raise ValueError(
            f"{_spelled(name)} must be in {_interval(low, high, low_open, high_open)}, "
            f"got {value!r}")


def _host_form(name: str, value: Any) -> float | None:
    """A host form of a dynamic hyperparameter: None if it has no concrete value.

    Accepts a callable (a schedule) or an array with one element and a real
    dtype; returns that element as a float when it can be read (a traced
    array cannot). Raises TypeError for anything else.
    """
    if callable(value) and not hasattr(value, "shape"):
        return None
    shape, dtype = getattr(value, "shape", None), getattr(value, "dtype", None)
    if shape is None or dtype is None:
        raise TypeError(f"{_spelled(name)} must be a real number, a schedule or a "
                        f"one-element array, got {_shown(value)}")
    size = math.prod(int(n) for n in shape)
    kind = str(dtype).lower()
    if size != 1 or "bool" in kind or "complex" in kind:
        raise TypeError(f"{_spelled(name)} as an array must have one element and a real dtype, "
                        f"got shape {tuple(shape)} and dtype {dtype}")
    try:
        return float(value.reshape(()) if hasattr(value, "reshape") else value)
    except Exception:  # noqa: BLE001 - a traced or lazy value: checked by the host later
        return None


def _check_real(name: str, value: Any, dynamic: bool) -> None:
    low, high, low_open, high_open = _REAL_RANGES[name]
    if value is None and name in _OPTIONAL:
        return
    if _is_real(value):
        _check_range(name, float(value), low, high, low_open, high_open)
        return
    if dynamic and not _is_bool(value):
        concrete = _host_form(name, value)
        if concrete is not None:
            _check_range(name, concrete, low, high, low_open, high_open)
        return
    allowed = "a real number or None" if name in _OPTIONAL else "a real number"
    if _is_bool(value):
        allowed += ", not a bool"
    raise TypeError(f"{_spelled(name)} must be {allowed}, got {_shown(value)}")


def _check_integer(name: str, value: Any) -> None:
    if not _is_integer(value):
        kind = "an integer, not a bool" if _is_bool(value) else "an integer"
        raise TypeError(f"{_spelled(name)} must be {kind}, got {_shown(value)}")
    low, high = _INTEGER_RANGES[name]
    if not low <= int(value) <= high:
        raise ValueError(f"{_spelled(name)} must be an integer in [{low}, {high}], got {value!r}")


def _check_flag(name: str, value: Any) -> None:
    if not _is_bool(value):
        raise TypeError(f"{_spelled(name)} must be a bool, got {_shown(value)}")


def _check_probe(name: str, value: Any) -> None:
    if not isinstance(value, str):
        raise TypeError(f"probe must be one of {PROBES}, got {_shown(value)}")
    if value not in PROBES:
        raise ValueError(f"probe must be one of {PROBES}, got {value!r}")


_CHECKS: dict[str, Callable[..., None]] = {
    **{name: _check_integer for name in _INTEGER_RANGES},
    **{name: _check_flag for name in _FLAGS},
    "probe": _check_probe,
}


def validate_hyperparameters(*, dynamic: Collection[str] = (), **values: Any) -> None:
    """Validate any subset of the hyperparameters and options.

    Raises TypeError for a value of the wrong type (a string, None, a bool
    where a number is meant, a number where a bool is meant, a complex
    number, a list) and ValueError for a value outside its range; both name
    the parameter and its host spellings. An unknown name is a TypeError.

    ``dynamic`` names the hyperparameters for which the calling host accepts
    its own forms (a learning-rate schedule, a tensor, a traced value): for
    those, a callable or an array with exactly one element and a real dtype
    is accepted too, and its value is range-checked when it can be read.

    >>> validate_hyperparameters(lr=1e-3, b1=0.9, maximize=False)
    >>> validate_hyperparameters(lr="1e-3")
    Traceback (most recent call last):
    ...
    TypeError: lr (learning_rate) must be a real number, got str '1e-3'
    """
    unknown = set(dynamic) - set(_REAL_RANGES)
    if unknown:
        raise TypeError(f"dynamic names real hyperparameters only, got {sorted(unknown)}")
    for name, value in values.items():
        if name in _REAL_RANGES:
            _check_real(name, value, name in dynamic)
        elif name in _CHECKS:
            _CHECKS[name](name, value)
        else:
            raise TypeError(f"unknown hyperparameter {name!r}")


@dataclasses.dataclass(frozen=True)
class Hyperparameters:
    """Sophia's hyperparameters in the core's spelling, validated on creation.

    ``lr`` may be a float or anything the host treats as one (a 0-d array);
    host-specific schedules are resolved by the adapter before the update.
    """

    lr: Any = DEFAULTS["lr"]
    b1: float = DEFAULTS["b1"]
    b2: float = DEFAULTS["b2"]
    gamma: float = DEFAULTS["gamma"]
    weight_decay: float = DEFAULTS["weight_decay"]
    eps: float = DEFAULTS["eps"]
    clip_threshold: float = DEFAULTS["clip_threshold"]
    hessian_interval: int = DEFAULTS["hessian_interval"]
    refresh_at_start: bool = DEFAULTS["refresh_at_start"]
    bias_correction: bool = DEFAULTS["bias_correction"]
    maximize: bool = DEFAULTS["maximize"]
    hessian_bias_correction: bool = DEFAULTS["hessian_bias_correction"]
    target_unclipped_share: float | None = DEFAULTS["target_unclipped_share"]

    def __post_init__(self) -> None:
        validate_hyperparameters(dynamic=("lr",), **dataclasses.asdict(self))

    def replace(self, **changes: Any) -> Hyperparameters:
        """A copy with ``changes`` applied (and validated)."""
        return dataclasses.replace(self, **changes)

    def update_kwargs(self) -> dict[str, Any]:
        """The keyword arguments :func:`sophia_core.sophia_update` takes."""
        return {
            "lr": self.lr,
            "b1": self.b1,
            "gamma": self.gamma,
            "weight_decay": self.weight_decay,
            "eps": self.eps,
            "clip_threshold": self.clip_threshold,
            "bias_correction": self.bias_correction,
            "maximize": self.maximize,
        }
