"""The scenario table: what every backend is run on (PyTorch OptimizerInput style).

A :class:`Scenario` is one record: parameter shapes, hyperparameters (the
core's names), an optional learning-rate schedule, the statistics of the
gradient and Hessian-estimate streams, and the number of steps. Streams are
generated from the scenario's seed in float64 with numpy only, then cast to
the dtype under test, so every backend receives bit-identical inputs.

The golden trajectory of a scenario is the numpy reference driver run on the
same inputs (``conformance.drivers``); it is computed at run time, never
stored, so nothing here can be edited into agreement.
"""

from __future__ import annotations

import dataclasses
import math
import zlib
from typing import Any

import numpy as np

from sophia_core import Hyperparameters, refresh_due

__all__ = [
    "DTYPES",
    "SCENARIOS",
    "STEPS",
    "Scenario",
    "Streams",
    "by_name",
    "cast",
    "make_streams",
    "round_to_bfloat16",
    "state_dtype",
    "storage_dtype",
]

#: Steps per scenario (the issue's 1,000).
STEPS = 1000
#: Parameter dtypes under test, as names (frameworks spell them the same way).
DTYPES = ("float64", "float32", "bfloat16")
#: A 0-d tensor, a vector and a matrix (every scenario) ...
DEFAULT_SHAPES: tuple[tuple[int, ...], ...] = ((), (7,), (3, 5))
#: Most hyperparameter variations run in float64 and float32 only; bfloat16
#: (float32 state) runs where the parameter rounding meets a regime.
WIDE = ("float64", "float32")
#: ... and an empty tensor (a few scenarios: it costs JAX/TF compile time).
WITH_EMPTY: tuple[tuple[int, ...], ...] = (*DEFAULT_SHAPES, (0, 4))


@dataclasses.dataclass(frozen=True)
class Scenario:
    """One conformance case; every field has a meaning in the streams or the optimizer."""

    name: str
    #: What the case pins, shown by ``python -m conformance --list``.
    description: str
    #: Hyperparameters in the core's spelling; the rest are the defaults.
    hyperparameters: dict[str, Any] = dataclasses.field(default_factory=dict)
    shapes: tuple[tuple[int, ...], ...] = DEFAULT_SHAPES
    #: "cosine": linear warm-up over 10% of the steps, then cosine decay to
    #: 10% of ``lr``; the host's own schedule mechanism applies it.
    schedule: str | None = None
    #: Gradients are ``grad_scale * N(0, 1) + grad_bias``.
    grad_scale: float = 1.0
    grad_bias: float = 0.0
    #: Steps before which every gradient is exactly 0 (m stays exactly 0).
    zero_grad_steps: int = 0
    #: Fraction of coordinates (a fixed set) whose gradient is always exactly 0.
    zero_grad_fraction: float = 0.0
    #: hhat is ``hhat_scale * N(0,1)**2`` (GNB-like, >= 0), or
    #: ``hhat_scale * N(0,1)`` when ``negative_hhat`` (Hutchinson-like).
    hhat_scale: float = 25.0
    negative_hhat: bool = False
    #: Fraction of hhat entries (drawn per refresh) replaced by NaN, +Inf or
    #: -Inf: the non-finite policy must keep them out of h and count them.
    nonfinite_hhat: float = 0.0
    steps: int = STEPS
    dtypes: tuple[str, ...] = DTYPES

    def hyper(self) -> Hyperparameters:
        """The validated hyperparameters (``lr`` is the peak of a schedule)."""
        return Hyperparameters(**self.hyperparameters)

    def learning_rates(self) -> np.ndarray | None:
        """Per-step learning rates (float64, index = completed steps), or None."""
        if self.schedule is None:
            return None
        if self.schedule != "cosine":
            raise ValueError(f"unknown schedule {self.schedule!r}")
        peak = float(self.hyper().lr)
        warmup = max(1, self.steps // 10)
        t = np.arange(self.steps, dtype=np.float64)
        ramp = peak * (t + 1) / warmup
        progress = np.clip((t - warmup) / max(1, self.steps - warmup), 0.0, 1.0)
        decay = peak * (0.1 + 0.9 * 0.5 * (1.0 + np.cos(math.pi * progress)))
        return np.where(t < warmup, ramp, decay)

    def refresh_steps(self) -> np.ndarray:
        """Completed-step counts after which h is refreshed (before the next step)."""
        hyper = self.hyper()
        return np.asarray(
            [t for t in range(self.steps)
             if refresh_due(t, hessian_interval=hyper.hessian_interval,
                            refresh_at_start=hyper.refresh_at_start)],
            dtype=np.int64,
        )


def _s(name: str, description: str, **fields: Any) -> Scenario:
    return Scenario(name=name, description=description, **fields)


#: The table. Learning rates are large enough that theta moves by many ulps
#: per step (a small lr would hide update errors below theta's rounding).
SCENARIOS: tuple[Scenario, ...] = (
    _s("defaults", "the reference code's defaults (lr=1e-4, k=10, refresh before step 1)",
       shapes=WITH_EMPTY),
    _s("lr_1e-2", "large steps: theta changes in its leading bits",
       hyperparameters={"lr": 1e-2}),
    _s("maximize", "gradient ascent (g -> -g)",
       hyperparameters={"lr": 1e-3, "maximize": True}, dtypes=WIDE),
    _s("no_weight_decay", "weight_decay=0 (the decay multiply is skipped)",
       hyperparameters={"lr": 1e-3, "weight_decay": 0.0}, dtypes=WIDE),
    _s("strong_weight_decay", "weight_decay=0.5 with lr=1e-2",
       hyperparameters={"lr": 1e-2, "weight_decay": 0.5}),
    _s("bias_correction", "mhat = m / (1 - b1**t)",
       hyperparameters={"lr": 1e-3, "bias_correction": True}, dtypes=WIDE),
    _s("clip_0.5", "clip_threshold=0.5",
       hyperparameters={"lr": 1e-3, "clip_threshold": 0.5}, dtypes=WIDE),
    _s("clip_3_gamma_0.01", "clip_threshold=3 and gamma=0.01 (few clipped coordinates)",
       hyperparameters={"lr": 1e-3, "clip_threshold": 3.0, "gamma": 0.01}, dtypes=WIDE),
    _s("cosine_schedule", "warm-up + cosine learning rate through each host's schedule API",
       hyperparameters={"lr": 1e-3}, schedule="cosine"),
    _s("k1", "hessian_interval=1: h refreshed before every step",
       hyperparameters={"lr": 1e-3, "hessian_interval": 1}, shapes=WITH_EMPTY, dtypes=WIDE),
    _s("k10_authors_phase", "refresh after steps k, 2k, ... only: h = 0 (sign steps) "
       "before the first refresh", hyperparameters={"lr": 1e-3, "refresh_at_start": False}),
    _s("negative_hhat", "Hutchinson-like hhat of both signs: h <= 0 gives sign steps",
       hyperparameters={"lr": 1e-3}, negative_hhat=True, hhat_scale=1.0),
    _s("zero_momentum", "gradients exactly 0 for 50 steps and on 30% of coordinates: "
       "m = 0, u = 0, only weight decay acts",
       hyperparameters={"lr": 1e-3}, zero_grad_steps=50, zero_grad_fraction=0.3,
       shapes=WITH_EMPTY),
    _s("tiny_gradients", "g ~ 1e-20, hhat ~ 1e-30: d = eps, small unclipped steps",
       hyperparameters={"lr": 1e-3}, grad_scale=1e-20, hhat_scale=1e-30),
    _s("huge_gradients", "g ~ 1e25, hhat ~ 1e30: no overflow, unclipped steps",
       hyperparameters={"lr": 1e-3}, grad_scale=1e25, hhat_scale=1e30),
    _s("biased_gradients", "a constant gradient component: m converges away from 0",
       hyperparameters={"lr": 1e-3}, grad_bias=0.5, dtypes=WIDE),
    _s("nonfinite_hhat", "10% of estimate coordinates NaN/+Inf/-Inf: they never enter h "
       "and are counted (the non-finite policy)", hyperparameters={"lr": 1e-3},
       nonfinite_hhat=0.1, dtypes=WIDE),
    _s("hessian_bias_correction", "h bias-corrected: decay 1-(1-b2)/(1-b2**n) at the n-th "
       "refresh (h = hhat after the first)",
       hyperparameters={"lr": 1e-3, "hessian_bias_correction": True}),
    _s("target_unclipped_share", "gamma re-set at each refresh so that 30% of coordinates "
       "are unclipped (a quantile of |m|/(c h))",
       hyperparameters={"lr": 1e-3, "target_unclipped_share": 0.3}, dtypes=WIDE),
    _s("target_share_all_options", "target share 0.3 with h and m bias-corrected, "
       "Hutchinson-like hhat of both signs",
       hyperparameters={"lr": 1e-3, "target_unclipped_share": 0.3,
                        "hessian_bias_correction": True, "bias_correction": True},
       negative_hhat=True, hhat_scale=1.0, dtypes=WIDE),
)


def by_name(name: str) -> Scenario:
    """The scenario called ``name``."""
    for scenario in SCENARIOS:
        if scenario.name == name:
            return scenario
    known = ", ".join(s.name for s in SCENARIOS)
    raise KeyError(f"unknown scenario {name!r}; known: {known}")


def state_dtype(dtype: str) -> str:
    """The dtype of m and h for parameters of ``dtype`` (float32 for bf16/fp16)."""
    return "float32" if dtype in ("bfloat16", "float16") else dtype


def storage_dtype(dtype: str) -> str:
    """The numpy dtype holding values of ``dtype`` (bf16 values live in float32)."""
    return "float32" if dtype == "bfloat16" else dtype


def round_to_bfloat16(x: np.ndarray) -> np.ndarray:
    """``x`` (float32) rounded to the nearest bfloat16, ties to even, as float32.

    numpy has no bfloat16; this is the cast every framework performs, written
    with integer arithmetic on the float32 bit pattern. NaN stays NaN.
    """
    x = np.array(x, dtype=np.float32, order="C")  # (ascontiguousarray makes 0-d 1-d)
    bits = x.view(np.uint32).astype(np.uint64)
    rounding = np.uint64(0x7FFF) + ((bits >> np.uint64(16)) & np.uint64(1))
    rounded = ((bits + rounding) & np.uint64(0xFFFF0000)).astype(np.uint32)
    out = rounded.view(np.float32)
    return np.where(np.isnan(x), x, out)


def cast(x: np.ndarray, dtype: str) -> np.ndarray:
    """``x`` in ``dtype``; bfloat16 values are float32 arrays holding bf16 values."""
    if dtype == "bfloat16":
        return round_to_bfloat16(np.asarray(x, dtype=np.float32))
    return np.asarray(x, dtype=dtype)


@dataclasses.dataclass(frozen=True)
class Streams:
    """The inputs of one run, already cast to the dtypes the backends get."""

    scenario: Scenario
    dtype: str
    #: Initial parameters (bf16 values in float32 arrays for bfloat16).
    params: list[np.ndarray]
    #: ``grads[p][t]``: gradient of parameter p at the step after t completed steps.
    grads: list[np.ndarray]
    #: ``hhats[p][i]``: hhat of the i-th refresh (in state dtype).
    hhats: list[np.ndarray]
    #: Completed-step counts of the refreshes (``refresh_steps[i]``).
    refresh_steps: np.ndarray
    #: Per-step learning rates (float64), or None for a constant ``lr``.
    learning_rates: np.ndarray | None

    @property
    def steps(self) -> int:
        return self.scenario.steps

    def hhats_per_step(self) -> list[np.ndarray]:
        """hhat indexed by completed steps (zeros where no refresh is due)."""
        out = []
        for hhat, param in zip(self.hhats, self.params, strict=True):
            full = np.zeros((self.steps, *param.shape), dtype=hhat.dtype)
            full[self.refresh_steps] = hhat
            out.append(full)
        return out


def make_streams(scenario: Scenario, dtype: str, *, seed: int = 0) -> Streams:
    """Generate the scenario's inputs (deterministic in ``scenario.name`` and ``seed``)."""
    rng = np.random.default_rng([seed, zlib.crc32(scenario.name.encode())])
    refreshes = scenario.refresh_steps()
    params, grads, hhats = [], [], []
    for shape in scenario.shapes:
        param = rng.standard_normal(shape)
        grad = scenario.grad_scale * (rng.standard_normal((scenario.steps, *shape))
                                      + scenario.grad_bias)
        grad[: scenario.zero_grad_steps] = 0.0
        if scenario.zero_grad_fraction:
            dead = rng.random(shape) < scenario.zero_grad_fraction
            grad[:, dead] = 0.0
        noise = rng.standard_normal((len(refreshes), *shape))
        hhat = scenario.hhat_scale * (noise if scenario.negative_hhat else noise * noise)
        if scenario.nonfinite_hhat:
            bad = rng.random(hhat.shape) < scenario.nonfinite_hhat
            hhat[bad] = rng.choice(np.array([np.nan, np.inf, -np.inf]), size=int(bad.sum()))
        params.append(cast(param, dtype))
        grads.append(cast(grad, dtype))
        hhats.append(cast(hhat, state_dtype(dtype)))
    return Streams(
        scenario=scenario,
        dtype=dtype,
        params=params,
        grads=grads,
        hhats=hhats,
        refresh_steps=refreshes,
        learning_rates=scenario.learning_rates(),
    )
