"""Portable state across backends: export from A mid-run, import into B, continue.

For every ordered pair (A, B) of backends (A = B included): A runs the first
``SPLIT`` steps of a scheduled scenario and writes its optimizer state with
``export_state`` (``sophia_core.portable``); B is created on A's parameters,
reads the file with ``import_state`` and runs the remaining steps. The
spliced trajectory (parameters, m, h and the counters) must match the numpy
reference exactly as an unbroken run would: bitwise where both A and B are
bitwise for the scenario, otherwise inside the same tolerance model. The
step count and the counters travel in the file, so the learning-rate
schedule, the refresh phase and bias correction continue where A stopped.

Names: every driver names its parameters by position, ``"0", "1", ...``
(the scenario's parameter order), so A's file must carry exactly those
names; an importer matches them by name (``load_state(expect=...)``).

The ``reversed`` rows (float32) rewrite A's file with its tensors in the
opposite order, each keeping its name: an exporter that lists parameters in
another order than the importer (torch ``[q, k]`` into a JAX ``{k, q}``).
B must either continue exactly (it matched by name) or refuse the file with
a ValueError that names the mismatch (an importer that still matches by
position, version 1, sees the shapes differ); continuing with swapped state
is a failure.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile

import numpy as np

from sophia_core import portable

from .compare import compare
from .drivers import Trajectory, driver_for
from .drivers._numpy import ReferenceDriver
from .scenarios import by_name, make_streams

__all__ = ["SPLIT", "STEPS", "run_part"]

#: Steps of the portable-state runs and where the state changes hands (not a
#: refresh step, so the next refresh happens in B and must be on time).
STEPS = 100
SPLIT = 55
DTYPES = ("float32", "bfloat16")
#: The dtype of the rows whose file lists the tensors in reverse order.
REVERSED_DTYPE = "float32"


def _splice(a: Trajectory, b: Trajectory) -> Trajectory:
    join = lambda x, y: [np.concatenate([p, q]) for p, q in zip(x, y, strict=True)]  # noqa: E731
    counters = {k: np.concatenate([a.counters[k], b.counters[k]])
                for k in a.counters if k in b.counters}
    return Trajectory(params=join(a.params, b.params), ms=join(a.ms, b.ms),
                      hs=join(a.hs, b.hs), steps=np.concatenate([a.steps, b.steps]),
                      counters=counters)


def _positional_names(count: int) -> list[str]:
    return [str(i) for i in range(count)]


def _check_names(path: str, count: int) -> None:
    """A's file must name its tensors "0", "1", ... (the drivers' convention)."""
    names = portable.load_state(path).names
    if names != _positional_names(count):
        raise AssertionError(f"the exporter names its tensors {names[:5]}, the conformance "
                             f"convention is {_positional_names(min(count, 5))}")


def _reverse(path: str, reversed_path: str) -> None:
    """Rewrite ``path`` with its tensors in reverse order, every tensor keeping its name."""
    state = portable.load_state(path)
    portable.save_state(reversed_path, step=state.step, ms=state.ms[::-1], hs=state.hs[::-1],
                        names=state.names[::-1], hyperparameters=state.hyperparameters,
                        counters=state.counters)


def _clear_refusal(exc: Exception) -> bool:
    """A refusal of the reversed file that says what does not match."""
    message = str(exc).lower()
    return isinstance(exc, ValueError) and ("shape" in message or "name" in message)


def _row(source: str, target: str, dtype: str, order: str, scenario, streams, golden,
         device: str) -> dict | None:
    """One row, or None when A or B does not have ``dtype``."""
    a = driver_for(source, device, cpu_fallback=True)
    b = driver_for(target, device, cpu_fallback=True)
    if dtype not in a.dtypes or dtype not in b.dtypes:
        return None
    modes = {a.expected_mode(scenario, dtype)[0], b.expected_mode(scenario, dtype)[0]}
    mode = "bitwise" if modes == {"bitwise"} else "tolerance"
    row = {"from": source, "to": target, "dtype": dtype, "file order": order, "mode": mode}
    try:
        first = a.run(streams, stop=SPLIT)
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "sophia-state.npz")
            a.export_state(path)
            _check_names(path, len(streams.params))
            if order == "reversed":
                path, exported = os.path.join(tmp, "reversed.npz"), path
                _reverse(exported, path)
            b.init(a.read().params, dtype, scenario.hyper(), streams.learning_rates)
            try:
                b.import_state(path)
            except Exception as exc:
                if order == "reversed" and _clear_refusal(exc):
                    message = str(exc).split("): ", 1)[-1]  # without load_state('/tmp/...')
                    return {**row, "bitwise": "-", "max ulp": "-", "passed": True,
                            "detail": f"refused: {message}"}
                raise
        second = b.run(streams, start=SPLIT, init=False)
        result = compare(golden, _splice(first, second), streams,
                         backend=f"{source}->{target}", device=device, mode=mode)
    except Exception as exc:  # a crash is a failed row
        return {**row, "bitwise": "no", "max ulp": "-", "passed": False,
                "detail": f"{type(exc).__name__}: {exc}"}
    detail = "; ".join(result.problems)
    if order == "reversed" and result.passed:
        detail = "loaded by name" + (f"; {detail}" if detail else "")
    return {**row, "bitwise": "yes" if result.bitwise else "no",
            "max ulp": f"{result.max_ulp:.3g}", "passed": result.passed, "detail": detail}


def run_part(backends: list[str], *, device: str = "cpu") -> list[dict]:
    names = list(dict.fromkeys(["numpy", *backends]))
    scenario = dataclasses.replace(by_name("cosine_schedule"), steps=STEPS)
    rows = []
    for dtype in DTYPES:
        streams = make_streams(scenario, dtype)
        golden = ReferenceDriver("cpu").run(streams)
        orders = ("same", "reversed") if dtype == REVERSED_DTYPE else ("same",)
        for order in orders:
            for source in names:
                for target in names:
                    row = _row(source, target, dtype, order, scenario, streams, golden,
                               device)
                    if row is not None:
                        rows.append(row)
    return rows
