"""Drivers: one small class per backend, behind one protocol.

A driver runs a backend's *public* optimizer API on given inputs:

- ``init(params, dtype, hyper, learning_rates)``: create parameters from numpy
  arrays and the optimizer (``learning_rates`` is a per-step array when the
  scenario has a schedule: the driver installs it through the host's own
  schedule mechanism);
- ``refresh(hhats)``: fold the given Hessian estimates into h (called exactly
  when the schedule says a refresh is due, before the next step);
- ``step(grads)``: one optimizer step with the given gradients;
- ``read()``: the current ``Snapshot`` (parameters, m, h, completed steps) as
  numpy arrays, and the counters the optimizer keeps (:data:`COUNTERS`),
  read through its public API.

``run(streams)`` drives those four over a whole scenario and records the
trajectory; a driver may override it (JAX scans the whole run under one
``jax.jit``) as long as it calls the same public API.

Drivers are found by backend name (the registry, ``sophia_core.backends``):
``conformance.drivers._<name>`` defines ``DRIVER``. Certifying a new backend
(MLX, CuPy, ...) means adding it to the registry and writing that module.
"""

from __future__ import annotations

import abc
import dataclasses
import importlib
from typing import Any, ClassVar

import numpy as np

from sophia_core import Hyperparameters

from ..scenarios import Streams

__all__ = ["COUNTERS", "Driver", "Snapshot", "Trajectory", "driver_for", "has_driver"]

#: What every optimizer counts and reports (``sophia_core`` CORE_V2 names):
#: folds so far, estimate coordinates the non-finite policy kept out of h,
#: and -- when ``target_unclipped_share`` is set -- the gamma in use.
COUNTERS = ("hessian_refreshes", "rejected_hessian_coordinates", "gamma")


@dataclasses.dataclass
class Snapshot:
    """Optimizer state read back as numpy (bf16 values as float32 arrays)."""

    params: list[np.ndarray]
    ms: list[np.ndarray]
    hs: list[np.ndarray]
    step: int
    #: Counters from :data:`COUNTERS` as Python numbers (``gamma`` only when
    #: the scenario sets a target unclipped share).
    counters: dict[str, float] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class Trajectory:
    """The state after every step: ``params[p][t]`` is parameter p after t+1 steps."""

    params: list[np.ndarray]
    ms: list[np.ndarray]
    hs: list[np.ndarray]
    steps: np.ndarray
    #: Each reported counter after every step (float64; exact for counts).
    counters: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)

    @classmethod
    def from_snapshots(cls, snapshots: list[Snapshot]) -> Trajectory:
        n = len(snapshots[0].params)
        stack = lambda field, p: np.stack([getattr(s, field)[p] for s in snapshots])  # noqa: E731
        names = [k for k in COUNTERS if all(k in s.counters for s in snapshots)]
        return cls(
            params=[stack("params", p) for p in range(n)],
            ms=[stack("ms", p) for p in range(n)],
            hs=[stack("hs", p) for p in range(n)],
            steps=np.asarray([s.step for s in snapshots], dtype=np.int64),
            counters={k: np.asarray([s.counters[k] for s in snapshots], dtype=np.float64)
                      for k in names},
        )


class Driver(abc.ABC):
    """The protocol every backend driver implements (see the module docstring)."""

    #: Backend name in ``sophia_core.backends``.
    name: ClassVar[str]
    #: Parameter dtypes the backend supports.
    dtypes: ClassVar[tuple[str, ...]] = ("float64", "float32", "bfloat16")
    #: Devices the driver can run on.
    devices: ClassVar[tuple[str, ...]] = ("cpu",)

    def __init__(self, device: str = "cpu") -> None:
        if device not in self.devices:
            raise ValueError(f"driver {self.name!r} cannot run on device {device!r}")
        self.device = device

    def expected_mode(self, scenario: Any, dtype: str) -> tuple[str, str]:
        """``("bitwise", "")`` or ``("tolerance", why the operation sequence differs)``.

        On CPU every backend runs the core's operation sequence, so the
        default is bitwise; on other devices kernels differ (FMA, fusion).
        """
        if self.device == "cpu":
            return "bitwise", ""
        return "tolerance", f"{self.device}: fused kernels / FMA"

    @abc.abstractmethod
    def init(self, params: list[np.ndarray], dtype: str, hyper: Hyperparameters,
             learning_rates: np.ndarray | None = None) -> None:
        """Create the parameters (in ``dtype``) and the optimizer."""

    @abc.abstractmethod
    def refresh(self, hhats: list[np.ndarray]) -> None:
        """Fold ``hhats`` into h now (the caller decides that a refresh is due)."""

    @abc.abstractmethod
    def step(self, grads: list[np.ndarray]) -> None:
        """One optimizer step with ``grads``."""

    @abc.abstractmethod
    def read(self) -> Snapshot:
        """The current state as numpy arrays."""

    def host_skip_check(self) -> str:
        """Show the host's own skip mechanism handling a NaN/Inf gradient.

        Raises AssertionError if parameters or state change on the skipped
        step; returns a one-line description of the mechanism.
        """
        raise NotImplementedError(f"{self.name}: no non-finite gradient check")

    def export_state(self, path: str) -> None:
        """Write the optimizer state to a portable file (``sophia_core.portable``)."""
        raise NotImplementedError(f"{self.name}: no portable state export")

    def import_state(self, path: str) -> None:
        """Load the optimizer state from a portable file."""
        raise NotImplementedError(f"{self.name}: no portable state import")

    def run(self, streams: Streams, *, start: int = 0, stop: int | None = None,
            init: bool = True) -> Trajectory:
        """Run steps ``start..stop-1`` of ``streams`` and record the state after each."""
        stop = streams.steps if stop is None else stop
        if init:
            self.init(streams.params, streams.dtype, streams.scenario.hyper(),
                      streams.learning_rates)
        refresh_index = {int(t): i for i, t in enumerate(streams.refresh_steps)}
        snapshots = []
        for t in range(start, stop):
            if t in refresh_index:
                i = refresh_index[t]
                self.refresh([h[i] for h in streams.hhats])
            self.step([g[t] for g in streams.grads])
            snapshots.append(self.read())
        return Trajectory.from_snapshots(snapshots)


def has_driver(name: str) -> bool:
    """Whether ``conformance.drivers._<name>`` exists."""
    return importlib.util.find_spec(f"{__name__}._{name}") is not None


def driver_for(name: str, device: str = "cpu", *, cpu_fallback: bool = False) -> Driver:
    """The driver of backend ``name`` on ``device`` (imports the framework).

    With ``cpu_fallback``, a backend that has no such device (the numpy
    reference on a GPU run) runs on the CPU instead of raising.
    """
    module = importlib.import_module(f"{__name__}._{name}")
    cls: Any = module.DRIVER
    if cpu_fallback and device not in cls.devices:
        device = "cpu"
    return cls(device=device)
