"""Portable state across backends: export from A mid-run, import into B, continue.

For every ordered pair (A, B) of backends (A = B included): A runs the first
``SPLIT`` steps of a scheduled scenario and writes its optimizer state with
``export_state`` (``sophia_core.portable``); B is created on A's parameters,
reads the file with ``import_state`` and runs the remaining steps. The
spliced trajectory must match the numpy reference exactly as an unbroken
run would: bitwise where both A and B are bitwise for the scenario,
otherwise inside the same tolerance model. The step count travels in the
file, so the learning-rate schedule, the refresh phase and bias correction
continue where A stopped.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile

import numpy as np

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


def _splice(a: Trajectory, b: Trajectory) -> Trajectory:
    join = lambda x, y: [np.concatenate([p, q]) for p, q in zip(x, y, strict=True)]  # noqa: E731
    return Trajectory(params=join(a.params, b.params), ms=join(a.ms, b.ms),
                      hs=join(a.hs, b.hs), steps=np.concatenate([a.steps, b.steps]))


def run_part(backends: list[str], *, device: str = "cpu") -> list[dict]:
    names = list(dict.fromkeys(["numpy", *backends]))
    scenario = dataclasses.replace(by_name("cosine_schedule"), steps=STEPS)
    rows = []
    for dtype in DTYPES:
        streams = make_streams(scenario, dtype)
        golden = ReferenceDriver("cpu").run(streams)
        for source in names:
            for target in names:
                a = driver_for(source, device, cpu_fallback=True)
                b = driver_for(target, device, cpu_fallback=True)
                if dtype not in a.dtypes or dtype not in b.dtypes:
                    continue
                modes = {a.expected_mode(scenario, dtype)[0], b.expected_mode(scenario, dtype)[0]}
                mode = "bitwise" if modes == {"bitwise"} else "tolerance"
                row = {"from": source, "to": target, "dtype": dtype, "mode": mode}
                try:
                    first = a.run(streams, stop=SPLIT)
                    with tempfile.TemporaryDirectory() as tmp:
                        path = os.path.join(tmp, "sophia-state.npz")
                        a.export_state(path)
                        b.init(a.read().params, dtype, scenario.hyper(), streams.learning_rates)
                        b.import_state(path)
                    second = b.run(streams, start=SPLIT, init=False)
                    result = compare(golden, _splice(first, second), streams,
                                     backend=f"{source}->{target}", device=device, mode=mode)
                except Exception as exc:  # a crash is a failed row
                    rows.append({**row, "bitwise": "no", "max ulp": "-", "passed": False,
                                 "detail": f"{type(exc).__name__}: {exc}"})
                    continue
                rows.append({**row, "bitwise": "yes" if result.bitwise else "no",
                             "max ulp": f"{result.max_ulp:.3g}", "passed": result.passed,
                             "detail": "; ".join(result.problems)})
    return rows
