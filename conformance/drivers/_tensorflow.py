"""TensorFlow/Keras: ``sophia_tf.SophiaG`` on Keras variables.

A scenario runs as one ``tf.function`` loop over ``apply_gradients`` and
``update_hessian`` (eager dispatch per step would dominate the run); the
protocol methods run eagerly.
A schedule is a ``keras.optimizers.schedules.LearningRateSchedule``. State
is read with ``opt.sophia_slots(variable)`` and ``opt.iterations``.
"""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf

import sophia_tf

from ..scenarios import state_dtype
from . import Driver, Snapshot, Trajectory

# One optimizer, hence one trace, per scenario: the retracing warning is expected.
tf.get_logger().setLevel("ERROR")


class _TableSchedule(keras.optimizers.schedules.LearningRateSchedule):
    """The scenario's per-step learning rates, looked up by the iteration count."""

    def __init__(self, table: np.ndarray) -> None:
        self.table = tf.constant(table, dtype=tf.float64)

    def __call__(self, step):
        return tf.gather(self.table, tf.cast(step, tf.int64))  # float64: Keras casts

    def get_config(self):
        return {"table": self.table.numpy().tolist()}


def _numpy(value) -> np.ndarray:
    tensor = tf.convert_to_tensor(value)
    if tensor.dtype == tf.bfloat16:
        tensor = tf.cast(tensor, tf.float32)
    return np.array(tensor.numpy(), copy=True)


class TensorflowDriver(Driver):
    name = "tensorflow"
    devices = ("cpu",)
    dtypes = ("float64", "float32", "bfloat16", "float16")

    def expected_mode(self, scenario, dtype):
        if scenario.name == "tiny_gradients" and dtype != "float64":
            return ("tolerance", "TensorFlow graph kernels (tf.function) flush subnormal "
                    "results to zero (FTZ); eager ones do not")
        if scenario.hyperparameters.get("bias_correction"):
            return ("tolerance", "1 - b1**t with the iteration variable as step runs in "
                    "the parameter dtype (numpy: Python float64 power, then one rounding)")
        return super().expected_mode(scenario, dtype)

    def _tensor(self, array, dtype):
        return tf.cast(tf.constant(np.array(array, dtype=state_dtype(dtype))), dtype)

    def init(self, params, dtype, hyper, learning_rates=None):
        self.dtype = dtype
        self.variables = [keras.Variable(self._tensor(p, dtype), dtype=dtype, name=f"p{i}")
                          for i, p in enumerate(params)]
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
                maximize=hyper.maximize,
            )
            self.opt.build(self.variables)
        finally:
            keras.config.set_floatx(floatx)

    # The protocol calls run eagerly (short runs: errors, estimators, portable
    # state); ``run`` compiles the 1,000-step loop.
    def refresh(self, hhats):
        self.opt.update_hessian([self._tensor(h, state_dtype(self.dtype)) for h in hhats])

    def step(self, grads):
        self.opt.apply_gradients(
            zip([self._tensor(g, self.dtype) for g in grads], self.variables, strict=True))

    def read(self):
        slots = [self.opt.sophia_slots(v) for v in self.variables]
        return Snapshot(
            params=[_numpy(v) for v in self.variables],
            ms=[_numpy(m) for m, _ in slots],
            hs=[_numpy(h) for _, h in slots],
            step=int(_numpy(self.opt.iterations)),
        )

    def run(self, streams, *, start=0, stop=None, init=True):
        """The whole run as one ``tf.function`` loop over the public calls.

        ``update_hessian`` (under ``tf.cond`` when a refresh is due) and
        ``apply_gradients`` inside ``tf.range``: one trace per scenario
        instead of a Python dispatch per step.
        """
        if not init or start != 0 or stop is not None:
            return super().run(streams, start=start, stop=stop, init=init)
        self.init(streams.params, streams.dtype, streams.scenario.hyper(),
                  streams.learning_rates)
        dtype, steps = streams.dtype, streams.steps
        grads = [self._tensor(g, dtype) for g in streams.grads]
        hhats = [self._tensor(h, state_dtype(dtype)) for h in streams.hhats_per_step()]
        due = tf.constant(np.isin(np.arange(steps), streams.refresh_steps))
        variables, opt = self.variables, self.opt
        slots = [opt.sophia_slots(v) for v in variables]

        @tf.function
        def loop(grads, hhats, due):
            n = tf.shape(due)[0]
            out = {
                "p": [tf.TensorArray(v.dtype, size=n) for v in variables],
                "m": [tf.TensorArray(m.dtype, size=n) for m, _ in slots],
                "h": [tf.TensorArray(h.dtype, size=n) for _, h in slots],
                "t": tf.TensorArray(tf.int64, size=n),
            }
            for t in tf.range(n):
                if due[t]:
                    opt.update_hessian([h[t] for h in hhats])
                opt.apply_gradients(zip([g[t] for g in grads], variables, strict=True))
                out = {
                    "p": [a.write(t, v.value) for a, v in zip(out["p"], variables, strict=True)],
                    "m": [a.write(t, m.value) for a, (m, _) in zip(out["m"], slots, strict=True)],
                    "h": [a.write(t, h.value) for a, (_, h) in zip(out["h"], slots, strict=True)],
                    "t": out["t"].write(t, tf.cast(opt.iterations, tf.int64)),
                }
            return {k: [a.stack() for a in v] if isinstance(v, list) else v.stack()
                    for k, v in out.items()}

        result = loop(grads, hhats, due)
        return Trajectory(params=[_numpy(x) for x in result["p"]],
                          ms=[_numpy(x) for x in result["m"]],
                          hs=[_numpy(x) for x in result["h"]],
                          steps=_numpy(result["t"]).astype(np.int64))

    def export_state(self, path):
        self.opt.export_state(path)

    def import_state(self, path):
        self.opt.import_state(path)


DRIVER = TensorflowDriver


def _host_skip_check(driver: TensorflowDriver) -> str:
    v = keras.Variable(np.array([1.0, -2.0, 3.0], np.float32), name="skip_check")
    inner = sophia_tf.SophiaG(learning_rate=1e-2, hessian_interval=1)
    opt = keras.optimizers.LossScaleOptimizer(inner, initial_scale=2.0 ** 4)
    opt.apply_gradients([(tf.constant([0.5, -0.5, 1.0]), v)])
    inner.update_hessian([tf.ones(3)])

    def snapshot():
        m, h = inner.sophia_slots(v)
        return [_numpy(x) for x in (v, m, h, inner.iterations)]

    before = snapshot()
    for bad in (np.nan, np.inf):
        scale = float(_numpy(opt.dynamic_scale))
        opt.apply_gradients([(tf.constant([0.5, bad, 1.0]), v)])
        assert float(_numpy(opt.dynamic_scale)) < scale, "scale not reduced: step not skipped"
        after = snapshot()
        assert all(np.array_equal(a, b) for a, b in zip(before, after, strict=True)), \
            f"{bad} gradient changed the variable or the optimizer state"
    return "keras.optimizers.LossScaleOptimizer(SophiaG) skips the step"


TensorflowDriver.host_skip_check = _host_skip_check


class TensorflowModelOps:
    """The estimator model in TF ops, differentiated with tf.GradientTape."""

    def __init__(self, dtype: str) -> None:
        self.xp = sophia_tf.tf_namespace
        self.dtype = tf.as_dtype(dtype)

    def tensor(self, array):
        return tf.constant(np.asarray(array), dtype=self.dtype)

    def labels(self, array):
        return tf.constant(np.asarray(array))

    def params(self, arrays):
        return [self.tensor(a) for a in arrays]

    def logits(self, params, x):
        w1, b1, w2, b2 = params
        return tf.matmul(tf.tanh(tf.matmul(x, w1) + b1), w2) + b2

    def grad(self, fn, params):
        with tf.GradientTape() as tape:
            tape.watch(params)
            loss = fn(params)
        return tape.gradient(loss, params)

    def hvp(self, fn, params, vectors):
        with tf.GradientTape() as outer:
            outer.watch(params)
            with tf.GradientTape() as inner:
                inner.watch(params)
                loss = fn(params)
            grads = inner.gradient(loss, params)
        return outer.gradient(grads, params, output_gradients=vectors)

    def stop_gradient(self, tensor):
        return tf.stop_gradient(tensor)

    def numpy(self, tensor):
        return np.array(tensor.numpy(), copy=True)


TensorflowDriver.model_ops = lambda self, dtype: TensorflowModelOps(dtype)
