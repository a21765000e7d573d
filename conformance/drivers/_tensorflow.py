"""Keras 3: ``sophia_tf.SophiaG`` on Keras variables, on this process's Keras backend.

The registry's ``tensorflow`` entry is the Keras adapter. Keras picks its
backend once per process from ``KERAS_BACKEND`` (TensorFlow when unset), so
``KERAS_BACKEND=jax python -m conformance --backends tensorflow`` certifies
the same optimizer on Keras's JAX backend (and ``torch`` on torch);
``tests/adapter_tensorflow`` runs all three. The driver uses ``keras.ops``
only, except to compile a whole run: one ``tf.function`` loop on
TensorFlow, a ``jax.jit`` step over ``stateless_apply`` on JAX (torch runs
eagerly). A schedule is a ``keras.optimizers.schedules.LearningRateSchedule``.
State is read with ``opt.sophia_slots(variable)``, ``opt.iterations`` and
the counter properties.
"""

from __future__ import annotations

import keras
import numpy as np
from keras import ops

import sophia_tf
from sophia_tf._autodiff import grad_and_aux, hvp

from ..scenarios import state_dtype
from . import Driver, Snapshot, Trajectory

BACKEND = keras.backend.backend()
if BACKEND == "tensorflow":
    import tensorflow as tf

    # One optimizer, hence one trace, per scenario: the retracing warning is expected.
    tf.get_logger().setLevel("ERROR")


class _TableSchedule(keras.optimizers.schedules.LearningRateSchedule):
    """The scenario's per-step learning rates, looked up by the iteration count."""

    def __init__(self, table: np.ndarray) -> None:
        self.table = ops.convert_to_tensor(table)  # float64 (float32 on JAX without x64)

    def __call__(self, step):
        return ops.take(self.table, ops.cast(step, "int32"))

    def get_config(self):
        return {"table": ops.convert_to_numpy(self.table).tolist()}


def _numpy(value) -> np.ndarray:
    tensor = ops.convert_to_tensor(value)
    if keras.backend.standardize_dtype(tensor.dtype) == "bfloat16":
        tensor = ops.cast(tensor, "float32")
    return np.array(ops.convert_to_numpy(tensor), copy=True)


class TensorflowDriver(Driver):
    name = "tensorflow"
    devices = ("cpu",)
    dtypes = ("float64", "float32", "bfloat16", "float16")

    def expected_mode(self, scenario, dtype):
        if BACKEND == "tensorflow" and scenario.name == "tiny_gradients" and dtype != "float64":
            return ("tolerance", "TensorFlow graph kernels (tf.function) flush subnormal "
                    "results to zero (FTZ); eager ones do not")
        if BACKEND == "jax" and scenario.name == "tiny_gradients" and dtype != "float64":
            return "tolerance", "XLA's CPU code flushes subnormal results to zero (FTZ)"
        return super().expected_mode(scenario, dtype)

    def _tensor(self, array, dtype):
        return ops.cast(ops.convert_to_tensor(np.array(array, dtype=state_dtype(dtype))), dtype)

    def init(self, params, dtype, hyper, learning_rates=None):
        self.dtype = dtype
        self.hyper = hyper
        # Keras on torch cannot hold trainable integer variables: the error
        # case hands the optimizer non-trainable ones.
        trainable = "float" in dtype
        self.variables = [keras.Variable(self._tensor(p, dtype), dtype=dtype, name=str(i),
                                         trainable=trainable) for i, p in enumerate(params)]
        lr = hyper.lr if learning_rates is None else _TableSchedule(learning_rates)
        # Keras keeps the learning rate in a variable of dtype floatx: a float64
        # model sets floatx to float64, as a Keras user training in float64 does.
        floatx = keras.config.floatx()
        keras.config.set_floatx("float64" if dtype == "float64" else "float32")
        try:
            self.opt = sophia_tf.SophiaG(
                learning_rate=lr, beta_1=hyper.b1, beta_2=hyper.b2, gamma=hyper.gamma,
                weight_decay=hyper.weight_decay, epsilon=hyper.eps,
                clip_threshold=hyper.clip_threshold, hessian_interval=hyper.hessian_interval,
                refresh_at_start=hyper.refresh_at_start, bias_correction=hyper.bias_correction,
                maximize=hyper.maximize, hessian_bias_correction=hyper.hessian_bias_correction,
                target_unclipped_share=hyper.target_unclipped_share,
                require_refresh=False, warn_sign_momentum=False,  # scenarios are no training
            )
            self.opt.build(self.variables)
        finally:
            keras.config.set_floatx(floatx)

    def refresh(self, hhats):
        self.opt.update_hessian([self._tensor(h, state_dtype(self.dtype)) for h in hhats])

    def step(self, grads):
        self.opt.apply_gradients(
            zip([self._tensor(g, self.dtype) for g in grads], self.variables, strict=True))

    def _counters(self) -> dict[str, float]:
        counters = {"hessian_refreshes": int(_numpy(self.opt.hessian_refreshes)),
                    "rejected_hessian_coordinates": int(_numpy(
                        self.opt.rejected_hessian_coordinates))}
        if self.hyper.target_unclipped_share is not None:
            counters["gamma"] = float(_numpy(self.opt.current_gamma))
        return counters

    def read(self):
        slots = [self.opt.sophia_slots(v) for v in self.variables]
        return Snapshot(params=[_numpy(v) for v in self.variables],
                        ms=[_numpy(m) for m, _ in slots], hs=[_numpy(h) for _, h in slots],
                        step=int(_numpy(self.opt.iterations)), counters=self._counters())

    def run(self, streams, *, start=0, stop=None, init=True):
        """The whole run compiled (TensorFlow, JAX) over the public calls."""
        if BACKEND not in ("tensorflow", "jax") or not init or start != 0 or stop is not None:
            return super().run(streams, start=start, stop=stop, init=init)
        self.init(streams.params, streams.dtype, streams.scenario.hyper(),
                  streams.learning_rates)
        dtype = streams.dtype
        grads = [self._tensor(g, dtype) for g in streams.grads]
        hhats = [self._tensor(h, state_dtype(dtype)) for h in streams.hhats_per_step()]
        due = np.isin(np.arange(streams.steps), streams.refresh_steps)
        run = _tensorflow_run if BACKEND == "tensorflow" else _jax_run
        record = run(self.opt, self.variables, grads, hhats, due)
        counters = {"hessian_refreshes": record["refreshes"].astype(np.float64),
                    "rejected_hessian_coordinates": record["rejected"].astype(np.float64)}
        if self.hyper.target_unclipped_share is not None:
            counters["gamma"] = record["gamma"].astype(np.float64)
        return Trajectory(params=record["p"], ms=record["m"], hs=record["h"],
                          steps=record["t"].astype(np.int64), counters=counters)

    def export_state(self, path):
        self.opt.export_state(path)

    def import_state(self, path):
        self.opt.import_state(path)


def _state(opt, variables):
    """What a run records after every step."""
    slots = [opt.sophia_slots(v) for v in variables]
    return {"p": [v.value for v in variables], "m": [m.value for m, _ in slots],
            "h": [h.value for _, h in slots], "t": ops.convert_to_tensor(opt.iterations),
            "refreshes": opt.hessian_refreshes.value,
            "rejected": opt.rejected_hessian_coordinates.value, "gamma": opt.current_gamma.value}


def _tensorflow_run(opt, variables, grads, hhats, due):
    """One ``tf.function`` loop: ``update_hessian`` when due, ``apply_gradients``."""

    @tf.function
    def loop(grads, hhats, due):
        n = tf.shape(due)[0]
        record = tf.nest.map_structure(lambda x: tf.TensorArray(x.dtype, size=n),
                                       _state(opt, variables))
        for t in tf.range(n):
            if due[t]:
                opt.update_hessian([h[t] for h in hhats])
            opt.apply_gradients(zip([g[t] for g in grads], variables, strict=True))
            record = tf.nest.map_structure(lambda a, x, t=t: a.write(t, x), record,
                                           _state(opt, variables))
        return tf.nest.map_structure(lambda a: a.stack(), record)

    return tf.nest.map_structure(_numpy, loop(grads, hhats, tf.constant(due)))


def _jax_run(opt, variables, grads, hhats, due):
    """A ``jax.jit`` step over the optimizer's stateless form, one call per step."""
    import jax

    @jax.jit
    def step(optimizer_values, values, grads_t, hhats_t, due_t):
        mapping = list(zip(opt.variables, optimizer_values, strict=True))
        with keras.StatelessScope(state_mapping=mapping) as scope:
            current = [v.value for v in opt.hessian_state()]
            opt.assign_hessian_state(ops.cond(
                due_t, lambda: opt.folded_hessian_state(hhats_t), lambda: current))
        optimizer_values = [scope.get_current_value(v) for v in opt.variables]
        values, optimizer_values = opt.stateless_apply(optimizer_values, grads_t, values)
        mapping = list(zip([*variables, *opt.variables], [*values, *optimizer_values],
                           strict=True))
        with keras.StatelessScope(state_mapping=mapping):
            return optimizer_values, values, _state(opt, variables)

    optimizer_values, values = [v.value for v in opt.variables], [v.value for v in variables]
    records = []
    for t in range(len(due)):
        optimizer_values, values, record = step(
            optimizer_values, values, [g[t] for g in grads], [h[t] for h in hhats],
            bool(due[t]))
        records.append(record)
    for variable, value in zip([*variables, *opt.variables], [*values, *optimizer_values],
                               strict=True):
        variable.assign(value)
    return jax.tree.map(lambda *xs: _numpy(np.stack([_numpy(x) for x in xs])), *records)


DRIVER = TensorflowDriver


def _host_skip_check(driver: TensorflowDriver) -> str:
    v = keras.Variable(np.array([1.0, -2.0, 3.0], np.float32), name="skip_check")
    inner = sophia_tf.SophiaG(learning_rate=1e-2, hessian_interval=1)
    opt = keras.optimizers.LossScaleOptimizer(inner, initial_scale=2.0 ** 4)
    opt.build([v])

    def apply(gradient):  # on JAX, Keras's LossScaleOptimizer works statelessly only
        if BACKEND != "jax":
            opt.apply_gradients([(gradient, v)])
            return
        values, optimizer_values = opt.stateless_apply(
            [x.value for x in opt.variables], [gradient], [v.value])
        for variable, value in zip([v, *opt.variables], [*values, *optimizer_values],
                                   strict=True):
            variable.assign(value)

    apply(ops.convert_to_tensor([0.5, -0.5, 1.0]))
    inner.update_hessian([ops.ones(3)])

    def snapshot():
        m, h = inner.sophia_slots(v)
        return [_numpy(x) for x in (v, m, h, inner.iterations)]

    before = snapshot()
    for bad in (np.nan, np.inf):
        scale = float(_numpy(opt.dynamic_scale))
        apply(ops.convert_to_tensor([0.5, bad, 1.0]))
        assert float(_numpy(opt.dynamic_scale)) < scale, "scale not reduced: step not skipped"
        after = snapshot()
        assert all(np.array_equal(a, b) for a, b in zip(before, after, strict=True)), \
            f"{bad} gradient changed the variable or the optimizer state"
    return "keras.optimizers.LossScaleOptimizer(SophiaG) skips the step"


TensorflowDriver.host_skip_check = _host_skip_check


class KerasModelOps:
    """The estimator model in ``keras.ops``, differentiated by the adapter's autodiff."""

    xp = sophia_tf.keras_namespace

    def __init__(self, dtype: str) -> None:
        self.dtype = dtype

    def tensor(self, array):
        return ops.convert_to_tensor(np.asarray(array), self.dtype)

    def labels(self, array):
        return ops.convert_to_tensor(np.asarray(array))

    def params(self, arrays):
        return [self.tensor(a) for a in arrays]

    def logits(self, params, x):
        # Keras 3.15 computes float64 in float32 in ops.tanh (JAX) and
        # ops.matmul (torch): ``@`` and tanh from exp keep the dtype.
        w1, b1, w2, b2 = params
        hidden = 1.0 - 2.0 / (ops.exp(2.0 * (x @ w1 + b1)) + 1.0)
        return hidden @ w2 + b2

    def grad(self, fn, params):
        return grad_and_aux(lambda q: (fn(q), ()), params)[0]

    def hvp(self, fn, params, vectors):
        return hvp(fn, params, vectors)

    def stop_gradient(self, tensor):
        return ops.stop_gradient(tensor)

    def numpy(self, tensor):
        return _numpy(tensor)


TensorflowDriver.model_ops = lambda self, dtype: KerasModelOps(dtype)
