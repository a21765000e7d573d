"""Non-finite values: none created from finite inputs; NaN/Inf gradients left to the host.

1. Finite extremes: gradients at half the dtype's largest value, at its
   smallest normal and 0; hhat up to half float32's largest value, negative,
   subnormal and 0; refreshed before every step; in float32, bfloat16 and
   float16 parameters (state float32). Every parameter, m and h must stay
   finite on every backend.
2. A NaN/Inf gradient is the host's to handle: each driver's
   ``host_skip_check`` shows the host's own skip mechanism working with our
   optimizer (torch ``GradScaler`` skips the step, ``optax.apply_if_finite``
   wraps ours, Keras ``LossScaleOptimizer`` skips the update): parameters and
   optimizer state are left unchanged.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from .drivers import driver_for
from .scenarios import Scenario, Streams, cast, state_dtype

__all__ = ["run_part", "extreme_streams"]

DTYPES = ("float32", "bfloat16", "float16")
_LARGEST = {"float32": 3.4028235e38, "bfloat16": 3.3895314e38, "float16": 65504.0}
_SMALLEST_NORMAL = {"float32": 2.0 ** -126, "bfloat16": 2.0 ** -126, "float16": 2.0 ** -14}
STEPS = 40


def extreme_streams(dtype: str) -> Streams:
    """40 steps of the most extreme finite inputs, with a refresh before every step."""
    scenario = Scenario(name=f"extremes_{dtype}", description="finite extremes",
                        hyperparameters={"lr": 1e-3, "hessian_interval": 1},
                        shapes=((6,),), steps=STEPS, dtypes=(dtype,))
    big, tiny = _LARGEST[dtype] / 2, _SMALLEST_NORMAL[dtype]
    grad_values = np.array([big, -big, tiny, -tiny, 0.0, 1.0])
    hhat_values = np.array([_LARGEST["float32"] / 2, -1e30, 1e-45, 0.0, 1e30, -1.0])
    rng = np.random.default_rng(3)
    grads = np.stack([rng.permutation(grad_values) for _ in range(STEPS)])
    hhats = np.stack([rng.permutation(hhat_values) for _ in range(STEPS)])
    return Streams(
        scenario=scenario, dtype=dtype,
        params=[cast(np.array([1.0, -1.0, big, -big, tiny, 0.0]), dtype)],
        grads=[cast(grads, dtype)],
        hhats=[cast(hhats, state_dtype(dtype))],
        refresh_steps=np.arange(STEPS), learning_rates=None,
    )


def _finite_rows(name: str, device: str) -> list[dict]:
    rows = []
    driver = driver_for(name, device, cpu_fallback=True)
    for dtype in DTYPES:
        row = {"backend": name, "check": f"finite inputs stay finite ({dtype})"}
        if dtype not in driver.dtypes:
            rows.append({**row, "passed": True, "detail": f"skipped: no {dtype} in {name}"})
            continue
        try:
            # m/d may overflow to Inf before the clip maps it to +-c: the
            # result is finite (checked below); numpy's warning is noise here.
            with np.errstate(over="ignore"):
                trajectory = driver.run(extreme_streams(dtype))
        except Exception as exc:  # a crash is a failed row
            rows.append({**row, "passed": False, "detail": f"{type(exc).__name__}: {exc}"})
            continue
        bad = [f"{kind}[{t}]" for kind in ("params", "ms", "hs")
               for t, arrays in enumerate([getattr(trajectory, kind)[0]])
               if not np.isfinite(arrays).all()]
        rows.append({**row, "passed": not bad,
                     "detail": "non-finite " + ", ".join(bad) if bad else ""})
    return rows


def run_part(backends: list[str], *, device: str = "cpu") -> list[dict]:
    rows = []
    for name in dict.fromkeys(["numpy", *backends]):
        rows.extend(_finite_rows(name, device))
        driver = driver_for(name, device, cpu_fallback=True)
        row = {"backend": name, "check": "NaN/Inf gradient: host skip mechanism"}
        try:
            detail = driver.host_skip_check()
            rows.append({**row, "passed": True, "detail": detail})
        except Exception as exc:  # an assertion or a crash
            rows.append({**row, "passed": False, "detail": f"{type(exc).__name__}: {exc}"})
    for row in rows:  # the table shows the mechanism in the detail column
        row.setdefault("detail", "")
    return [dataclasses.asdict(_Row(**r)) for r in rows]


@dataclasses.dataclass
class _Row:
    backend: str
    check: str
    passed: bool
    detail: str
