"""JAX: ``sophia_jax.exact_sophia`` (``sophia``'s step, returning the parameters).

``run`` scans ``tx.apply(grads, state, params, sophia_estimator=...)`` over
the steps under one ``jax.jit`` (per-step dispatch would cost more than the
math); every step gets a ``HessianDiagonalFn`` returning that step's slot of
the hhat stream, and the adapter's ``lax.cond`` calls it exactly when the
schedule says a refresh is due. ``exact_sophia`` returns the parameters as
the core computes them (``optax.apply_updates`` would add back
``new - old``, which rounds). A schedule is an optax schedule (a function of
the step count). The protocol methods (init/refresh/step/read) run eager,
with ``refresh_when="given"``: the suite says when to refresh.
"""

from __future__ import annotations

import dataclasses

import jax

jax.config.update("jax_enable_x64", True)  # float64 scenarios  # noqa: E402

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import sophia_jax  # noqa: E402

from .. import fma_guarded  # noqa: E402
from ..scenarios import state_dtype  # noqa: E402
from . import Driver, Snapshot, Trajectory  # noqa: E402


def xla_expected_mode(scenario, dtype: str) -> tuple[str, str] | None:
    """Where XLA on CPU cannot run numpy's operation sequence.

    (Bias correction is bitwise: with x64 on, as here, sophia_jax raises b1 to
    a float64 step and rounds once, as numpy does.)
    """
    if scenario.name == "tiny_gradients" and dtype != "float64":
        return "tolerance", "XLA's CPU code flushes subnormal results to zero (FTZ)"
    return None


def _jax_dtype(dtype: str):
    return jnp.bfloat16 if dtype == "bfloat16" else jnp.dtype(dtype)


def _numpy(array) -> np.ndarray:
    array = jnp.asarray(array)
    if array.dtype == jnp.bfloat16:
        array = array.astype(jnp.float32)
    return np.array(array, copy=True)


class JaxDriver(Driver):
    name = "jax"
    devices = ("cpu", "cuda")
    dtypes = ("float64", "float32", "bfloat16", "float16")

    def __init__(self, device: str = "cpu") -> None:
        super().__init__(device)
        self.jax_device = jax.devices("gpu" if device == "cuda" else "cpu")[0]

    def expected_mode(self, scenario, dtype):
        if self.device == "cpu" and not fma_guarded():
            return "tolerance", "XLA contracts multiply-adds into FMA (no --xla_cpu_max_isa=AVX)"
        return xla_expected_mode(scenario, dtype) or super().expected_mode(scenario, dtype)

    def _put(self, array: np.ndarray, dtype: str):
        return jax.device_put(jnp.asarray(array, dtype=_jax_dtype(dtype)), self.jax_device)

    def make_optimizer(self, hyper, learning_rates, refresh_when="given"):
        if learning_rates is None:
            lr = hyper.lr
        else:
            table = self._put(learning_rates, "float64")
            lr = lambda count: table[count]  # noqa: E731  (an optax schedule)
        return sophia_jax.exact_sophia(
            lr, b1=hyper.b1, b2=hyper.b2, gamma=hyper.gamma,
            weight_decay=hyper.weight_decay, eps=hyper.eps,
            clip_threshold=hyper.clip_threshold, hessian_interval=hyper.hessian_interval,
            refresh_at_start=hyper.refresh_at_start, bias_correction=hyper.bias_correction,
            maximize=hyper.maximize, hessian_bias_correction=hyper.hessian_bias_correction,
            target_unclipped_share=hyper.target_unclipped_share, refresh_when=refresh_when,
            warn_sign_momentum=False,
        )

    def init(self, params, dtype, hyper, learning_rates=None):
        self.dtype = dtype
        self.hyper = hyper
        self.tx = self.make_optimizer(hyper, learning_rates)
        self.params = [self._put(p, dtype) for p in params]
        self.opt_state = self.tx.init(self.params)
        self.pending = None

    def refresh(self, hhats):
        # optax folds hhat inside update when due; hand it to the next step.
        self.pending = [self._put(h, state_dtype(self.dtype)) for h in hhats]

    def step(self, grads):
        extra = {} if self.pending is None else {"sophia_estimator": _given(self.pending)}
        self.params, self.opt_state = self.tx.apply(
            [self._put(g, self.dtype) for g in grads], self.opt_state, self.params, **extra)
        self.pending = None

    def read(self):
        state = sophia_jax.sophia_state(self.opt_state)
        return Snapshot(
            params=[_numpy(p) for p in self.params],
            ms=[_numpy(m) for m in state.m],
            hs=[_numpy(h) for h in state.h],
            step=int(state.count),
            counters=_counters(state, self.hyper),
        )

    def export_state(self, path):
        sophia_jax.export_state(path, self.opt_state,
                                hyperparameters=dataclasses.asdict(self.hyper))

    def import_state(self, path):
        self.opt_state = sophia_jax.import_state(path, self.opt_state)

    def run(self, streams, *, start=0, stop=None, init=True):
        if not init or start != 0 or stop is not None:
            return super().run(streams, start=start, stop=stop, init=init)
        self.init(streams.params, streams.dtype, streams.scenario.hyper(),
                  streams.learning_rates)
        tx = self.make_optimizer(self.hyper, streams.learning_rates, refresh_when="due")
        grads = [self._put(g, streams.dtype) for g in streams.grads]
        hhats = [self._put(h, state_dtype(streams.dtype)) for h in streams.hhats_per_step()]

        def body(carry, xs):
            params, opt_state = carry
            # Every step offers its slot of the stream; lax.cond takes it when due.
            g, hhat = xs
            params, opt_state = tx.apply(g, opt_state, params, sophia_estimator=_given(hhat))
            state = sophia_jax.sophia_state(opt_state)
            return (params, opt_state), (params, state.m, state.h, state.count,
                                         state.hessian_refreshes,
                                         state.rejected_hessian_coordinates, state.gamma)

        @jax.jit
        def scan(params, opt_state, grads, hhats):
            return jax.lax.scan(body, (params, opt_state), (grads, hhats))

        (self.params, self.opt_state), (ps, ms, hs, counts, *counters) = scan(
            self.params, self.opt_state, grads, hhats)
        names = ("hessian_refreshes", "rejected_hessian_coordinates", "gamma")
        reported = {k: np.asarray(v, dtype=np.float64) for k, v in zip(names, counters,
                                                                         strict=True)}
        if self.hyper.target_unclipped_share is None:
            del reported["gamma"]
        return Trajectory(params=[_numpy(p) for p in ps], ms=[_numpy(m) for m in ms],
                          hs=[_numpy(h) for h in hs], steps=np.asarray(counts, dtype=np.int64),
                          counters=reported)


DRIVER = JaxDriver


def _given(hhats):
    """The estimator that hands over the suite's hhat (called only when refreshing)."""
    return sophia_jax.HessianDiagonalFn(lambda params, key: hhats)


def _bits(array) -> np.ndarray:
    """An array's values; a typed PRNG key's data."""
    if jax.dtypes.issubdtype(array.dtype, jax.dtypes.prng_key):
        array = jax.random.key_data(array)
    return np.asarray(array)


def _counters(state, hyper) -> dict:
    """The counters every driver reports (``drivers.COUNTERS``), from the optax state."""
    values = {"hessian_refreshes": int(state.hessian_refreshes),
              "rejected_hessian_coordinates": int(state.rejected_hessian_coordinates)}
    if hyper.target_unclipped_share is not None:
        values["gamma"] = float(state.gamma)
    return values


def _host_skip_check(driver: JaxDriver) -> str:
    import optax

    tx = optax.apply_if_finite(sophia_jax.sophia(1e-2, hessian_interval=1),
                               max_consecutive_errors=3)
    params = [jnp.array([1.0, -2.0, 3.0], jnp.float32)]
    state = tx.init(params)
    hhat = _given([jnp.ones(3, jnp.float32)])
    updates, state = tx.update([jnp.array([0.5, -0.5, 1.0], jnp.float32)], state, params,
                               sophia_estimator=hhat)
    params = optax.apply_updates(params, updates)
    before = (params, sophia_jax.sophia_state(state))
    for bad in (np.nan, np.inf):
        grads = [jnp.array([0.5, bad, 1.0], jnp.float32)]
        updates, state = tx.update(grads, state, params, sophia_estimator=hhat)
        params = optax.apply_updates(params, updates)
        after = (params, sophia_jax.sophia_state(state))
        same = jax.tree.map(lambda a, b: bool((_bits(a) == _bits(b)).all()), before, after)
        assert all(jax.tree.leaves(same)), f"{bad} gradient changed params or state"
    assert int(state.notfinite_count) == 2, state.notfinite_count
    return "optax.apply_if_finite(sophia_jax.sophia(...)) skips NaN/Inf steps"


JaxDriver.host_skip_check = _host_skip_check


class JaxModelOps:
    """The estimator model in jax.numpy, differentiated with jax.grad / jax.jvp."""

    xp = jnp

    def __init__(self, dtype: str, device) -> None:
        self.dtype = _jax_dtype(dtype)
        self.device = device

    def tensor(self, array):
        return jax.device_put(jnp.asarray(array, dtype=self.dtype), self.device)

    def labels(self, array):
        return jax.device_put(jnp.asarray(array), self.device)

    def params(self, arrays):
        return [self.tensor(a) for a in arrays]

    def logits(self, params, x):
        w1, b1, w2, b2 = params
        return jnp.tanh(x @ w1 + b1) @ w2 + b2

    def grad(self, fn, params):
        return list(jax.grad(fn)(params))

    def hvp(self, fn, params, vectors):
        return list(jax.jvp(jax.grad(fn), (params,), (vectors,))[1])  # forward-over-reverse

    def stop_gradient(self, array):
        return jax.lax.stop_gradient(array)

    def numpy(self, array):
        return np.array(array, copy=True)


JaxDriver.model_ops = lambda self, dtype: JaxModelOps(dtype, self.jax_device)
