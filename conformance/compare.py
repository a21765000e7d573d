r"""Comparing a trajectory with the reference: bitwise, or inside a derived budget.

Two modes (``docs/conformance.md`` has the derivation in words):

**bitwise** (CPU, same IEEE operation sequence): every parameter, m, h and
step count equals the reference bit for bit, at every step.

**tolerance** (GPU, fused kernels, FMA contraction): the gradient and hhat
streams are inputs, so errors never feed back into them and propagate
linearly. With :math:`\epsilon` the unit roundoff of the dtype and
:math:`S_q` the largest magnitude quantity :math:`q` reaches in the run
("ulp" below means the spacing of :math:`S_q`):

- ``m`` forgets: an error of at most 1 ulp per step decays by
  :math:`\beta_1`, so :math:`|e_m| \le 2 + 1/(1-\beta_1)` ulps at all times.
- ``h`` likewise with :math:`\beta_2` (changed only on refreshes):
  :math:`|e_h| \le 2 + 1/(1-\beta_2)` ulps.
- ``theta`` keeps its errors. Per step it gets two roundings that may differ
  (independent, zero-mean: a random walk, :math:`3\sigma` of
  :math:`\sqrt{2t}` ulps) and :math:`\eta_t\,\delta u_t` from the errors of
  m and h, where :math:`\delta u_t \le (|e_{\hat m}| + |u_t|\gamma|e_h|)/d_t`
  (and :math:`\le 2c`). The part due to m's error is correlated over m's
  memory :math:`W_m = 1/(1-\beta_1)` steps, the part due to h's error over
  h's memory :math:`W_h = k/(1-\beta_2)` steps (h changes every k steps);
  each adds as :math:`3\sqrt{W\sum_s(\eta_s\delta u_s)^2}`. The budget
  grows like :math:`\sqrt{t}`.

The discontinuity: where :math:`d = \epsilon` (h <= eps/gamma) the step is
:math:`c\,\mathrm{sign}(m)`, which jumps at m = 0. A coordinate-step with
d = eps and :math:`|\hat m|` within the m budget of 0 is *sign-sensitive*.
Sensitive coordinate-steps are excluded from the smooth budget and counted;
where the backend's m actually has another sign (a *flip*), theta may
differ by exactly the jump, :math:`2c\eta_s`, from then on. A flip at a
coordinate-step that is not sensitive fails the comparison.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from sophia_core import Hyperparameters

from .drivers import Trajectory
from .scenarios import Streams, state_dtype

__all__ = ["Comparison", "compare", "unit_roundoff"]

_MANTISSA_BITS = {"float64": 52, "float32": 23, "bfloat16": 7, "float16": 10}
_MIN_NORMAL = {"float64": 2.0 ** -1022, "float32": 2.0 ** -126, "bfloat16": 2.0 ** -126,
               "float16": 2.0 ** -14}


def unit_roundoff(dtype: str) -> float:
    """The spacing of floats in [1, 2) for ``dtype`` (one ulp at 1)."""
    return 2.0 ** -_MANTISSA_BITS[dtype]


def spacing(scale: float, dtype: str) -> float:
    """One ulp at magnitude ``scale`` in ``dtype`` (at least the smallest normal's)."""
    scale = max(abs(float(scale)), _MIN_NORMAL[dtype])
    if not math.isfinite(scale):
        return math.inf
    return 2.0 ** math.floor(math.log2(scale)) * unit_roundoff(dtype)


@dataclasses.dataclass
class Comparison:
    """One row of the report."""

    backend: str
    scenario: str
    dtype: str
    device: str
    mode: str  # "bitwise" or "tolerance"
    bitwise: bool
    max_ulp: float
    max_abs: float
    #: Largest error / budget over theta, m and h (tolerance mode; <= 1 passes).
    budget_ratio: float
    sign_sensitive: int
    sign_flips: int
    problems: list[str]
    reason: str = ""

    @property
    def passed(self) -> bool:
        return not self.problems


def _same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def compare(reference: Trajectory, got: Trajectory, streams: Streams, *, backend: str,
            device: str, mode: str, reason: str = "") -> Comparison:
    """Compare ``got`` with ``reference`` on ``streams`` (see the module docstring)."""
    scenario = streams.scenario
    hyper: Hyperparameters = scenario.hyper()
    dtype = streams.dtype
    sdtype = state_dtype(dtype)
    problems: list[str] = []

    if not np.array_equal(got.steps, reference.steps):
        problems.append("step counter differs")
    for name, values in reference.counters.items():
        if name not in got.counters:
            problems.append(f"does not report {name}")
        elif name == "gamma" and mode != "bitwise":  # a quantile of rounded ratios
            if not np.allclose(got.counters[name], values, rtol=64 * unit_roundoff(
                    state_dtype(streams.dtype)), atol=0):
                problems.append("gamma differs beyond 64 ulps")
        elif not np.array_equal(got.counters[name], values):
            first = int(np.argmax(got.counters[name] != values))
            problems.append(f"{name} differs from step {first + 1} "
                            f"({got.counters[name][first]!r} vs {values[first]!r})")
    quantities = (("theta", reference.params, got.params, dtype),
                  ("m", reference.ms, got.ms, sdtype),
                  ("h", reference.hs, got.hs, sdtype))
    bitwise = True
    for _, refs, gots, _ in quantities:
        for r, g in zip(refs, gots, strict=True):
            bitwise &= _same_bits(r, g)
            if r.dtype != g.dtype or r.shape != g.shape:
                problems.append(f"read back {g.dtype}{g.shape}, expected {r.dtype}{r.shape}")
    if problems:
        return Comparison(backend, scenario.name, dtype, device, mode, False, math.inf,
                          math.inf, math.inf, 0, 0, problems, reason)

    max_ulp = 0.0
    max_abs = 0.0
    for name, refs, gots, qdtype in quantities:
        for p, (r, g) in enumerate(zip(refs, gots, strict=True)):
            if r.size == 0:
                continue
            if not np.all(np.isfinite(g)[np.isfinite(r)]):
                problems.append(f"non-finite {name}[{p}] where the reference is finite")
                continue
            diff = np.abs(g.astype(np.float64) - r.astype(np.float64))
            finite = np.isfinite(diff)
            if not finite.all():
                diff = np.where(finite, diff, 0.0)
            max_abs = max(max_abs, float(diff.max()))
            max_ulp = max(max_ulp, float(diff.max()) / spacing(np.abs(r).max(), qdtype))

    sensitive = flips = 0
    ratio = 0.0 if bitwise else math.inf
    if mode == "bitwise":
        if not bitwise:
            problems.append("not bitwise identical")
    elif not problems:
        ratio, sensitive, flips, budget_problems = _tolerance(reference, got, streams, hyper)
        problems.extend(budget_problems)
    return Comparison(backend, scenario.name, dtype, device, mode, bitwise, max_ulp, max_abs,
                      ratio, sensitive, flips, problems, reason)


def _tolerance(reference: Trajectory, got: Trajectory, streams: Streams,
               hyper: Hyperparameters) -> tuple[float, int, int, list[str]]:
    dtype = streams.dtype
    sdtype = state_dtype(dtype)
    steps = streams.steps
    t = np.arange(1, steps + 1, dtype=np.float64)
    lrs = (np.full(steps, float(hyper.lr)) if streams.learning_rates is None
           else streams.learning_rates.astype(np.float64))
    if hyper.bias_correction:
        correction = 1.0 / (1.0 - hyper.b1 ** t)
    else:
        correction = np.ones(steps)
    a_m = 2.0 + 1.0 / (1.0 - hyper.b1)
    a_h = 2.0 + 1.0 / (1.0 - hyper.b2)
    window = 1.0 / (1.0 - hyper.b1)
    window_h = hyper.hessian_interval / (1.0 - hyper.b2)
    c = hyper.clip_threshold
    ratio = 0.0
    sensitive_total = flips_total = 0
    problems: list[str] = []
    for p in range(len(reference.params)):
        r_theta, g_theta = (x.astype(np.float64) for x in (reference.params[p], got.params[p]))
        r_m, g_m = (x.astype(np.float64) for x in (reference.ms[p], got.ms[p]))
        r_h, g_h = (x.astype(np.float64) for x in (reference.hs[p], got.hs[p]))
        if r_theta[0].size == 0:
            continue
        expand = (slice(None),) + (None,) * (r_theta.ndim - 1)
        ulp_m = spacing(np.abs(r_m).max(), sdtype)
        ulp_h = spacing(np.abs(r_h).max(), sdtype)
        ulp_theta = spacing(np.abs(r_theta).max(), dtype)
        # m and h: bounded, no drift.
        for name, r, g, budget in (("m", r_m, g_m, a_m * ulp_m), ("h", r_h, g_h, a_h * ulp_h)):
            err = np.abs(g - r).max() / budget
            ratio = max(ratio, float(err))
            if err > 1:
                problems.append(f"{name}[{p}] off by {err:.2f}x its budget")
        # theta: smooth part (random walk + coupling) plus explicit sign jumps.
        d = np.maximum(hyper.gamma * r_h, hyper.eps)
        mhat = r_m * correction[expand]
        noise_mhat = a_m * ulp_m * correction[expand]
        u = np.clip(mhat / d, -c, c)
        at_eps = hyper.gamma * r_h <= hyper.eps
        sensitive = at_eps & (np.abs(mhat) <= noise_mhat)
        # Step errors caused by m's error (memory 1/(1-b1) steps) and by h's
        # error (memory k/(1-b2) steps: h changes only every k steps).
        du_m = np.minimum(2 * c, noise_mhat / d + np.abs(u) * 2 * unit_roundoff(sdtype))
        du_h = np.minimum(2 * c, np.abs(u) * hyper.gamma * a_h * ulp_h / d)
        du_m = np.where(sensitive, 0.0, du_m)
        du_h = np.where(sensitive, 0.0, du_h)
        lr = lrs[expand]
        coupling = 3.0 * (np.sqrt(window * np.cumsum((lr * du_m) ** 2, axis=0))
                          + np.sqrt(window_h * np.cumsum((lr * du_h) ** 2, axis=0)))
        walk = ulp_theta * (4.0 + 3.0 * np.sqrt(2.0 * t))[expand]
        flipped = np.sign(g_m) != np.sign(r_m)
        unexplained = flipped & at_eps & ~sensitive
        if unexplained.any():
            problems.append(
                f"theta[{p}]: {int(unexplained.sum())} sign flips of m where |m| is "
                "outside rounding noise of 0"
            )
        sensitive_flips = flipped & sensitive
        jumps = np.cumsum(np.where(sensitive_flips, 2 * c * lr, 0.0), axis=0)
        budget = walk + coupling + jumps
        err = np.abs(g_theta - r_theta)
        theta_ratio = float((err / budget).max())
        ratio = max(ratio, theta_ratio)
        if theta_ratio > 1:
            problems.append(f"theta[{p}] off by {theta_ratio:.2f}x its budget")
        sensitive_total += int(sensitive.sum())
        flips_total += int(sensitive_flips.sum())
    return ratio, sensitive_total, flips_total, problems
