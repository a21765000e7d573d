"""The reference: the core itself on numpy (the golden trajectory).

numpy has no bfloat16: a bf16 parameter is a float32 array holding bf16
values; the core computes in float32 (as it does for bf16 on every backend)
and the result is rounded to bf16 (nearest, ties to even), which is the
cast ``xp.astype(theta, bfloat16)`` performs elsewhere.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from sophia_core import Hyperparameters, hessian_ema, init_state, portable, sophia_update

from ..scenarios import round_to_bfloat16, state_dtype, storage_dtype
from . import Driver, Snapshot, Trajectory


class NumpyDriver(Driver):
    name = "numpy"
    xp = np
    dtypes = ("float64", "float32", "bfloat16", "float16")

    def _asarray(self, array: np.ndarray, dtype: str):
        return self.xp.asarray(np.array(array, dtype=dtype))

    def _to_numpy(self, array) -> np.ndarray:
        return np.array(array, copy=True)

    def init(self, params, dtype, hyper, learning_rates=None):
        self.dtype = dtype
        # numpy's public API is the core: its validation is the backend's.
        self.hyper = Hyperparameters(**dataclasses.asdict(hyper))
        self.learning_rates = learning_rates
        self.params = [self._asarray(p, storage_dtype(dtype)) for p in params]
        self.states = [init_state(p, xp=self.xp) for p in self.params]
        self.completed = 0

    def refresh(self, hhats):
        compute = state_dtype(self.dtype)
        self.states = [
            s._replace(h=hessian_ema(s.h, self._asarray(hhat, compute), b2=self.hyper.b2,
                                     xp=self.xp))
            for s, hhat in zip(self.states, hhats, strict=True)
        ]

    def step(self, grads):
        kwargs = self.hyper.update_kwargs()
        if self.learning_rates is not None:
            kwargs["lr"] = float(self.learning_rates[self.completed])
        new = [
            sophia_update(p, self._asarray(g, storage_dtype(self.dtype)), s,
                          step=self.completed + 1, xp=self.xp, **kwargs)
            for p, g, s in zip(self.params, grads, self.states, strict=True)
        ]
        self.params = [p for p, _ in new]
        if self.dtype == "bfloat16":
            self.params = [self._asarray(round_to_bfloat16(self._to_numpy(p)), "float32")
                           for p in self.params]
        self.states = [s for _, s in new]
        self.completed += 1

    def read(self):
        return Snapshot(
            params=[self._to_numpy(p) for p in self.params],
            ms=[self._to_numpy(s.m) for s in self.states],
            hs=[self._to_numpy(s.h) for s in self.states],
            step=self.completed,
        )

    def export_state(self, path):
        portable.save_state(
            path, step=self.completed,
            ms=[self._to_numpy(s.m) for s in self.states],
            hs=[self._to_numpy(s.h) for s in self.states],
            hyperparameters=_portable_hyperparameters(self.hyper),
        )

    def import_state(self, path):
        loaded = portable.load_state(path, expect_shapes=[p.shape for p in self.params])
        compute = state_dtype(self.dtype)
        self.states = [s._replace(m=self._asarray(m, compute), h=self._asarray(h, compute))
                       for s, m, h in zip(self.states, loaded.ms, loaded.hs, strict=True)]
        self.completed = loaded.step


    def host_skip_check(self):
        # numpy has no skip mechanism: like any numpy code, a NaN gradient
        # gives NaN in that coordinate only (elementwise math), never elsewhere.
        self.init([np.array([1.0, -2.0, 3.0], np.float32)], "float32",
                  Hyperparameters(lr=1e-2, hessian_interval=1))
        self.refresh([np.ones(3, np.float32)])
        self.step([np.array([0.5, np.nan, np.inf], np.float32)])
        snap = self.read()
        theta, m = snap.params[0], snap.ms[0]
        assert np.isfinite(theta[0]) and np.isfinite(m[0]), "NaN/Inf spread to another coordinate"
        assert np.isnan(theta[1]) and np.isnan(m[1]), "a NaN gradient was hidden"
        # An infinite gradient makes m infinite; the clipped step is then +-lr*c.
        assert np.isinf(m[2]) and np.isfinite(theta[2]), "Inf gradient: unexpected result"
        return "numpy has no skip mechanism: NaN/Inf stays in its own coordinate"


class ReferenceDriver(NumpyDriver):
    """The golden trajectory: the core on one flat vector of all coordinates.

    The update and the EMA are elementwise, so concatenating the parameters
    changes no rounding; it makes the reference several times cheaper. (The
    ``numpy`` backend row runs the per-parameter protocol instead, 0-d and
    empty arrays included, and must match this bit for bit.)
    """

    def run(self, streams, *, start=0, stop=None, init=True):
        if not init or start != 0 or stop is not None:
            return super().run(streams, start=start, stop=stop, init=init)
        dtype, steps = streams.dtype, streams.steps
        compute = state_dtype(dtype)
        hyper = streams.scenario.hyper()
        kwargs = hyper.update_kwargs()
        shapes = [p.shape for p in streams.params]
        flat = lambda arrays, lead: np.concatenate(  # noqa: E731
            [a.reshape(*lead, -1) for a in arrays], axis=-1)
        store = storage_dtype(dtype)
        grads = flat(streams.grads, (steps,)).astype(store)
        hhats = flat(streams.hhats, (len(streams.refresh_steps),)).astype(compute)
        refresh_index = {int(t): i for i, t in enumerate(streams.refresh_steps)}
        xp = self.xp
        theta = self._asarray(flat(streams.params, ()), store)
        state = init_state(theta, xp=xp)
        record = {k: np.empty((steps, theta.shape[0]), dtype=compute) for k in "mh"}
        record["p"] = np.empty((steps, theta.shape[0]), dtype=store)
        for t in range(steps):
            if t in refresh_index:
                hhat = self._asarray(hhats[refresh_index[t]], compute)
                state = state._replace(h=hessian_ema(state.h, hhat, b2=hyper.b2, xp=xp))
            if streams.learning_rates is not None:
                kwargs["lr"] = float(streams.learning_rates[t])
            theta, state = sophia_update(theta, self._asarray(grads[t], store), state,
                                         step=t + 1, xp=xp, **kwargs)
            if dtype == "bfloat16":
                theta = self._asarray(round_to_bfloat16(self._to_numpy(theta)), store)
            record["p"][t] = self._to_numpy(theta)
            record["m"][t] = self._to_numpy(state.m)
            record["h"][t] = self._to_numpy(state.h)
        bounds = np.cumsum([0] + [int(np.prod(s)) for s in shapes])
        split = lambda a: [a[:, lo:hi].reshape(steps, *s)  # noqa: E731
                           for lo, hi, s in zip(bounds[:-1], bounds[1:], shapes, strict=True)]
        return Trajectory(params=split(record["p"]), ms=split(record["m"]),
                          hs=split(record["h"]), steps=np.arange(1, steps + 1, dtype=np.int64))


def _portable_hyperparameters(hyper) -> dict:
    values = dataclasses.asdict(hyper)
    if not isinstance(values["lr"], (int, float)):
        values["lr"] = None
    return values


DRIVER = NumpyDriver
