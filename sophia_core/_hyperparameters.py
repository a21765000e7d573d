"""Hyperparameters: defaults, the host-spelling table, and validation (once)."""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Any

__all__ = [
    "ALIASES",
    "DEFAULTS",
    "PROBES",
    "Hyperparameters",
    "validate_hyperparameters",
]

#: The reference code's defaults (SPEC section 1), plus the refresh schedule.
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


def _spelled(name: str) -> str:
    aliases = ALIASES.get(name)
    return f"{name} ({', '.join(aliases)})" if aliases else name


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _check_real(name: str, value: Any, *, low: float, high: float,
                low_open: bool = False, high_open: bool = False) -> None:
    """Raise ValueError unless ``low <(=) value <(=) high``.

    Non-Python values (a traced array, a schedule) are left to the host: the
    core validates what it can see without touching array values.
    """
    if not _is_number(value):
        return
    value = float(value)
    below = value <= low if low_open else value < low
    above = value >= high if high_open else value > high
    if math.isnan(value) or below or above:
        interval = (
            ("(" if low_open else "[") + f"{low:g}, {high:g}" + (")" if high_open else "]")
        )
        raise ValueError(f"{_spelled(name)} must be in {interval}, got {value!r}")


def validate_hyperparameters(**values: Any) -> None:
    """Validate any subset of the hyperparameters; raise ValueError naming one.

    Every adapter calls this (directly or through :class:`Hyperparameters`),
    so the allowed ranges and the messages exist once.
    """
    checks = {
        "lr": dict(low=0.0, high=math.inf, high_open=True),
        "b1": dict(low=0.0, high=1.0, high_open=True),
        "b2": dict(low=0.0, high=1.0, high_open=True),
        "gamma": dict(low=0.0, high=math.inf, high_open=True),
        "weight_decay": dict(low=0.0, high=math.inf, high_open=True),
        "eps": dict(low=0.0, high=math.inf, low_open=True, high_open=True),
        "clip_threshold": dict(low=0.0, high=math.inf, low_open=True, high_open=True),
    }
    for name, value in values.items():
        if name in checks:
            _check_real(name, value, **checks[name])
        elif name in ("hessian_interval", "n_probes"):
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
                raise ValueError(f"{_spelled(name)} must be an integer >= 1, got {value!r}")
        elif name in ("refresh_at_start", "bias_correction", "maximize"):
            if not isinstance(value, bool):
                raise ValueError(f"{_spelled(name)} must be a bool, got {value!r}")
        elif name == "probe":
            if value not in PROBES:
                raise ValueError(f"probe must be one of {PROBES}, got {value!r}")
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

    def __post_init__(self) -> None:
        validate_hyperparameters(**dataclasses.asdict(self))

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
