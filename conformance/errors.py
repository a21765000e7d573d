"""Error cases (PyTorch ErrorOptimizerInput style): one table, every backend.

Every backend must reject each input with the same exception type and a
message naming the offending parameter (the core's name or the host's
spelling from ``sophia_core.ALIASES``), and leave parameters and optimizer
state exactly as they were.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
from typing import Any

import numpy as np

from sophia_core import ALIASES, DEFAULTS, portable

from .drivers import Driver, driver_for

__all__ = ["ERROR_CASES", "ErrorCase", "RawHyperparameters", "run_part"]


@dataclasses.dataclass(frozen=True)
class RawHyperparameters:
    """Hyperparameters *not* validated here: the backend under test must refuse them."""

    lr: Any = DEFAULTS["lr"]
    b1: Any = DEFAULTS["b1"]
    b2: Any = DEFAULTS["b2"]
    gamma: Any = DEFAULTS["gamma"]
    weight_decay: Any = DEFAULTS["weight_decay"]
    eps: Any = DEFAULTS["eps"]
    clip_threshold: Any = DEFAULTS["clip_threshold"]
    hessian_interval: Any = DEFAULTS["hessian_interval"]
    refresh_at_start: Any = DEFAULTS["refresh_at_start"]
    bias_correction: Any = DEFAULTS["bias_correction"]
    maximize: Any = DEFAULTS["maximize"]
    hessian_bias_correction: Any = DEFAULTS["hessian_bias_correction"]
    target_unclipped_share: Any = DEFAULTS["target_unclipped_share"]

    def update_kwargs(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in ("lr", "b1", "gamma", "weight_decay", "eps",
                                              "clip_threshold", "bias_correction", "maximize")}


@dataclasses.dataclass(frozen=True)
class ErrorCase:
    name: str
    #: "hyperparameter": construct with ``hyperparameters``, then step;
    #: "integer_params": int32 parameters; "hhat_shape": refresh with a
    #: wrongly shaped hhat; "import_shape": import a state file of other shapes.
    kind: str
    exception: type[Exception]
    #: The message must contain one of these (case-insensitive).
    names: tuple[str, ...]
    hyperparameters: dict[str, Any] = dataclasses.field(default_factory=dict)


def _hyper_case(name: str, value: Any, exception: type[Exception] = ValueError) -> ErrorCase:
    return ErrorCase(f"{name}={value!r}", "hyperparameter", exception,
                     (name, *ALIASES.get(name, ())), {name: value})


def _type_case(name: str, value: Any) -> ErrorCase:
    """A value of the wrong type (what a YAML file or a typo hands over): TypeError."""
    return _hyper_case(name, value, TypeError)


ERROR_CASES: tuple[ErrorCase, ...] = (
    _hyper_case("lr", -1e-3),
    _hyper_case("b1", 1.0),
    _hyper_case("b1", -0.1),
    _hyper_case("b2", 1.0),
    _hyper_case("gamma", -0.04),
    _hyper_case("eps", 0.0),
    _hyper_case("eps", -1e-12),
    _hyper_case("weight_decay", -0.1),
    _hyper_case("clip_threshold", 0.0),
    _hyper_case("hessian_interval", 0),
    _hyper_case("hessian_interval", 2**31),
    _hyper_case("target_unclipped_share", 1.5),
    # Wrong types, each measured to get through v0.1 somewhere.
    _type_case("lr", "1e-3"),
    _type_case("lr", True),
    _type_case("b1", None),
    _type_case("gamma", "0.05"),
    _type_case("eps", None),
    _type_case("clip_threshold", None),
    _type_case("weight_decay", 1j),
    _type_case("b2", [0.99]),
    _type_case("hessian_interval", 2.5),
    _type_case("refresh_at_start", None),
    _type_case("bias_correction", None),
    _type_case("maximize", 1),
    _type_case("hessian_bias_correction", "yes"),
    _type_case("target_unclipped_share", "0.3"),
    ErrorCase("integer parameters", "integer_params", TypeError, ("dtype", "floating")),
    ErrorCase("hhat shape mismatch", "hhat_shape", ValueError, ("shape",)),
    ErrorCase("state file shape mismatch", "import_shape", ValueError, ("shape",)),
)

_SHAPES = ((3,), (2, 2))


def _params(dtype: str = "float32") -> list[np.ndarray]:
    rng = np.random.default_rng(7)
    return [rng.standard_normal(s).astype(dtype) for s in _SHAPES]


def _grads() -> list[np.ndarray]:
    rng = np.random.default_rng(8)
    return [rng.standard_normal(s).astype(np.float32) for s in _SHAPES]


def _same(a: Any, b: Any) -> bool:
    arrays_a = [*a.params, *a.ms, *a.hs]
    arrays_b = [*b.params, *b.ms, *b.hs]
    return a.step == b.step and all(
        x.dtype == y.dtype and x.tobytes() == y.tobytes()
        for x, y in zip(arrays_a, arrays_b, strict=True))


def _check(case: ErrorCase, driver: Driver) -> tuple[bool, str]:
    """Run one case; (passed, detail)."""
    before = None
    try:
        if case.kind in ("hyperparameter", "integer_params"):
            dtype = "int32" if case.kind == "integer_params" else "float32"
            params = _params(dtype) if dtype == "float32" else [
                np.arange(int(np.prod(s)), dtype=np.int32).reshape(s) for s in _SHAPES]
            hyper = RawHyperparameters(**case.hyperparameters)
            driver.init(params, dtype, hyper)
            before = driver.read()
            driver.step([g.astype(dtype) for g in _grads()])
        else:
            # k=1: a refresh is due at every step (JAX folds hhat only when due).
            driver.init(_params(), "float32", RawHyperparameters(lr=1e-3, hessian_interval=1))
            driver.step(_grads())
            before = driver.read()
            if case.kind == "hhat_shape":
                # The last tensor is wrong: a backend that folds tensor by tensor
                # must not leave the first one updated. JAX folds inside the
                # step, so the step follows the refresh.
                driver.refresh([np.ones((3,), np.float32), np.ones((4,), np.float32)])
                driver.step(_grads())
            else:
                with tempfile.TemporaryDirectory() as tmp:
                    path = os.path.join(tmp, "state.npz")
                    portable.save_state(path, step=5, ms=[np.zeros((4,), np.float32),
                                                          np.zeros((2, 2), np.float32)],
                                        hs=[np.ones((4,), np.float32),
                                            np.ones((2, 2), np.float32)],
                                        hyperparameters={})
                    driver.import_state(path)
    except Exception as exc:  # the point: which exception, which message
        message = str(exc)
        if type(exc) is not case.exception:
            return False, f"raised {type(exc).__name__} (expected {case.exception.__name__}): " \
                          f"{message[:80]}"
        if not any(n.lower() in message.lower() for n in case.names):
            return False, f"message does not name {case.names[0]!r}: {message[:80]}"
        if before is not None:
            try:
                after = driver.read()
            except Exception as read_exc:  # noqa: BLE001
                return False, f"state unreadable after the error: {read_exc}"
            if not _same(before, after):
                return False, "parameters or state changed by the failed call"
        return True, f"{type(exc).__name__}: {message[:70]}"
    return False, "no exception"


def run_part(backends: list[str], *, device: str = "cpu") -> list[dict]:
    """Every error case on every backend (and the numpy reference)."""
    rows = []
    for name in dict.fromkeys(["numpy", *backends]):
        driver = driver_for(name, device, cpu_fallback=True)
        for case in ERROR_CASES:
            passed, detail = _check(case, driver)
            rows.append({"backend": name, "case": case.name,
                         "expected": case.exception.__name__, "passed": passed,
                         "detail": detail})
    return rows
