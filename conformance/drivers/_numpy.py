"""The reference: the core itself on numpy (the golden trajectory).

numpy has no bfloat16: a bf16 parameter is a float32 array holding bf16
values; the core computes in float32 (as it does for bf16 on every backend)
and the result is rounded to bf16 (nearest, ties to even), which is the
cast ``xp.astype(theta, bfloat16)`` performs elsewhere.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from sophia_core import (
    Hyperparameters,
    fold_hessian,
    gamma_for_unclipped_share,
    init_state,
    portable,
    sophia_update,
)

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
        self.refreshes = self.rejected = 0
        self.gamma = self.hyper.gamma

    def refresh(self, hhats):
        compute = state_dtype(self.dtype)
        hs, rejected = fold_all([s.h for s in self.states],
                                [self._asarray(hhat, compute) for hhat in hhats],
                                self.hyper, self.refreshes + 1, self.xp)
        self.states = [s._replace(h=h) for s, h in zip(self.states, hs, strict=True)]
        self.refreshes += 1
        self.rejected += rejected
        self.gamma = next_gamma([s.m for s in self.states], hs, self.hyper, self.gamma,
                                self.completed, self.xp)

    def step(self, grads):
        kwargs = self.hyper.update_kwargs()
        kwargs["gamma"] = self.gamma
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
            counters=counters(self.hyper, self.refreshes, self.rejected, self.gamma),
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
        refreshes = rejected = 0
        gamma = hyper.gamma
        recorded_counters = []
        for t in range(steps):
            if t in refresh_index:
                hhat = self._asarray(hhats[refresh_index[t]], compute)
                (h,), count = fold_all([state.h], [hhat], hyper, refreshes + 1, xp)
                state = state._replace(h=h)
                refreshes, rejected = refreshes + 1, rejected + count
                gamma = next_gamma([state.m], [h], hyper, gamma, t, xp)
            if streams.learning_rates is not None:
                kwargs["lr"] = float(streams.learning_rates[t])
            kwargs["gamma"] = gamma
            theta, state = sophia_update(theta, self._asarray(grads[t], store), state,
                                         step=t + 1, xp=xp, **kwargs)
            if dtype == "bfloat16":
                theta = self._asarray(round_to_bfloat16(self._to_numpy(theta)), store)
            record["p"][t] = self._to_numpy(theta)
            record["m"][t] = self._to_numpy(state.m)
            record["h"][t] = self._to_numpy(state.h)
            recorded_counters.append(counters(hyper, refreshes, rejected, gamma))
        bounds = np.cumsum([0] + [int(np.prod(s)) for s in shapes])
        split = lambda a: [a[:, lo:hi].reshape(steps, *s)  # noqa: E731
                           for lo, hi, s in zip(bounds[:-1], bounds[1:], shapes, strict=True)]
        return Trajectory(params=split(record["p"]), ms=split(record["m"]),
                          hs=split(record["h"]), steps=np.arange(1, steps + 1, dtype=np.int64),
                          counters={k: np.asarray([c[k] for c in recorded_counters])
                                    for k in recorded_counters[0]})


def fold_all(hs, hhats, hyper, refresh, xp):
    """Fold one estimate per parameter (SPEC 2 with the non-finite policy):
    the new h's and the number of rejected coordinates."""
    folds = [fold_hessian(h, hhat, b2=hyper.b2, refresh=refresh,
                          bias_correction=hyper.hessian_bias_correction, xp=xp)
             for h, hhat in zip(hs, hhats, strict=True)]
    return [f.h for f in folds], sum(int(f.rejected) for f in folds)


def next_gamma(ms, hs, hyper, gamma, completed, xp):
    """gamma after a refresh: from the target unclipped share, if one is set."""
    if hyper.target_unclipped_share is None:
        return gamma
    return gamma_for_unclipped_share(
        ms, hs, target=hyper.target_unclipped_share, gamma=gamma,
        clip_threshold=hyper.clip_threshold, b1=hyper.b1, step=max(completed, 1),
        bias_correction=hyper.bias_correction, xp=xp)


def counters(hyper, refreshes, rejected, gamma) -> dict:
    """The counters a Snapshot reports (see ``drivers.COUNTERS``)."""
    values = {"hessian_refreshes": refreshes, "rejected_hessian_coordinates": rejected}
    if hyper.target_unclipped_share is not None:
        values["gamma"] = float(gamma)
    return values


def _portable_hyperparameters(hyper) -> dict:
    values = dataclasses.asdict(hyper)
    if not isinstance(values["lr"], (int, float)):
        values["lr"] = None
    return values


DRIVER = NumpyDriver
