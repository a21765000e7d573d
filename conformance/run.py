"""Run the scenario table on a set of backends and collect the comparisons."""

from __future__ import annotations

import dataclasses
import importlib
import time
from collections.abc import Callable, Iterable

from sophia_core.backends import BACKENDS, by_name

from .compare import Comparison, compare
from .drivers import Driver, driver_for, has_driver
from .scenarios import DTYPES, SCENARIOS, Scenario, make_streams

__all__ = ["available_backends", "certified_backends", "run_trajectories"]


def certified_backends() -> list[str]:
    """Backends of the registry that have a conformance driver."""
    return [b.name for b in BACKENDS if has_driver(b.name)]


def available_backends() -> list[str]:
    """Certified backends whose framework imports here."""
    names = []
    for name in certified_backends():
        backend = by_name(name)
        try:
            importlib.import_module(backend.module)
            if backend.adapter is not None:
                importlib.import_module(backend.adapter)
        except ImportError:
            continue
        names.append(name)
    return names


def _truncate(scenario: Scenario, steps: int | None) -> Scenario:
    if steps is None or steps >= scenario.steps:
        return scenario
    return dataclasses.replace(scenario, steps=steps)


def run_trajectories(
    backends: Iterable[str],
    *,
    scenarios: Iterable[Scenario] = SCENARIOS,
    dtypes: Iterable[str] = DTYPES,
    device: str = "cpu",
    steps: int | None = None,
    progress: Callable[[str], None] | None = None,
) -> tuple[list[Comparison], dict[str, float]]:
    """Every backend x scenario x dtype against the numpy reference.

    Returns the comparisons and the seconds spent per backend.
    """
    backends = list(backends)
    drivers: dict[str, Driver] = {name: driver_for(name, device) for name in backends}
    from .drivers._numpy import ReferenceDriver

    reference = ReferenceDriver("cpu")
    seconds = dict.fromkeys(["reference", *backends], 0.0)
    rows: list[Comparison] = []
    for scenario in scenarios:
        scenario = _truncate(scenario, steps)
        for dtype in dtypes:
            if dtype not in scenario.dtypes:
                continue
            streams = make_streams(scenario, dtype)
            start = time.perf_counter()
            golden = reference.run(streams)
            seconds["reference"] += time.perf_counter() - start
            for name, driver in drivers.items():
                if dtype not in driver.dtypes:
                    continue
                mode, reason = driver.expected_mode(scenario, dtype)
                start = time.perf_counter()
                try:
                    trajectory = driver.run(streams)
                except Exception as exc:  # a crash is a failed row, not a dead suite
                    seconds[name] += time.perf_counter() - start
                    rows.append(Comparison(name, scenario.name, dtype, device, mode, False,
                                           float("inf"), float("inf"), float("inf"), 0, 0,
                                           [f"{type(exc).__name__}: {exc}"], reason))
                    continue
                seconds[name] += time.perf_counter() - start
                row = compare(golden, trajectory, streams, backend=name, device=device,
                              mode=mode, reason=reason)
                rows.append(row)
                if progress is not None:
                    progress(f"{name:>16} {scenario.name:<22} {dtype:<9} "
                             f"{'ok' if row.passed else 'FAIL'}")
    return rows, seconds
