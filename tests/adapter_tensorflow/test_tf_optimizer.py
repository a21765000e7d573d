"""SophiaG / SophiaH as Keras optimizers, against the core run on numpy."""

from __future__ import annotations

import numpy as np
import pytest
from tf_support import bitwise_equal, keras, numpy_of, tf

import sophia_core
import sophia_tf

STEPS = 5
SHAPES = [(3, 4), (4,)]


def _stream(dtype, seed=0):
    rng = np.random.default_rng(seed)
    params = [rng.standard_normal(s).astype(dtype) for s in SHAPES]
    grads = [[rng.standard_normal(s).astype(dtype) for s in SHAPES] for _ in range(STEPS)]
    hhats = [[rng.standard_normal(s).astype(dtype) for s in SHAPES] for _ in range(STEPS)]
    return params, grads, hhats


def _reference(params, grads, hhats, *, lr, weight_decays, hessian_interval, b2=0.99,
               **options):
    """The trajectory by the core on numpy: refresh when due, then step."""
    params = list(params)
    states = [sophia_core.init_state(p, xp=np) for p in params]
    for t in range(STEPS):
        if sophia_core.refresh_due(t, hessian_interval=hessian_interval):
            states = [s._replace(h=sophia_core.hessian_ema(s.h, hh, b2=b2, xp=np))
                      for s, hh in zip(states, hhats[t], strict=True)]
        lr_t = lr(t) if callable(lr) else lr
        for i, (p, g) in enumerate(zip(params, grads[t], strict=True)):
            params[i], states[i] = sophia_core.sophia_update(
                p, g, states[i], step=t + 1, lr=np.asarray(lr_t, p.dtype),
                weight_decay=weight_decays[i], xp=np, **options)
    return params, states


def _keras_run(optimizer, params, grads, hhats, *, compiled=False, jit=False):
    variables = [keras.Variable(p) for p in params]
    optimizer.build(variables)

    def step(grads_t, hhats_t):
        tf.cond(optimizer.hessian_refresh_due(),
                lambda: [optimizer.update_hessian(hhats_t), tf.constant(True)][1],
                lambda: tf.constant(False))
        optimizer.apply_gradients(zip(grads_t, variables, strict=True))

    if compiled or jit:
        step = tf.function(step, jit_compile=jit)
    for t in range(STEPS):
        step([tf.constant(g) for g in grads[t]], [tf.constant(h) for h in hhats[t]])
    return variables


OPTIONS = dict(b1=0.9, gamma=0.04, eps=1e-12, clip_threshold=1.0)


@pytest.mark.parametrize("mode", ["eager", "tf.function"])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("flags", [dict(), dict(bias_correction=True, maximize=True)],
                         ids=["default", "bias_correction+maximize"])
def test_trajectory_matches_the_core_on_numpy_bitwise(mode, dtype, flags):
    params, grads, hhats = _stream(dtype)
    lr = float(np.float32(0.01))
    optimizer = sophia_tf.SophiaG(learning_rate=lr, beta_1=0.9, weight_decay=0.1,
                                  hessian_interval=2, **flags)
    variables = _keras_run(optimizer, params, grads, hhats, compiled=mode == "tf.function")
    want, states = _reference(params, grads, hhats, lr=lr, weight_decays=[0.1, 0.1],
                              hessian_interval=2, **OPTIONS, **flags)
    for v, w, s in zip(variables, want, states, strict=True):
        assert bitwise_equal(v, w)
        m, h = optimizer.sophia_slots(v)
        assert bitwise_equal(m, s.m) and bitwise_equal(h, s.h)
    assert int(optimizer.iterations) == STEPS


def test_jit_compile_matches_to_rounding():
    params, grads, hhats = _stream("float32")
    optimizer = sophia_tf.SophiaG(learning_rate=0.01, beta_1=0.9, hessian_interval=2)
    variables = _keras_run(optimizer, params, grads, hhats, jit=True)
    want, _ = _reference(params, grads, hhats, lr=float(np.float32(0.01)),
                         weight_decays=[0.1, 0.1], hessian_interval=2, **OPTIONS)
    for v, w in zip(variables, want, strict=True):
        # XLA contracts multiply-adds (FMA): a few ulps, not bitwise.
        np.testing.assert_allclose(numpy_of(v), w, rtol=1e-6, atol=1e-7)


def test_keras_weight_decay_is_sophias_once_and_exclusions_work():
    params, grads, hhats = _stream("float32", seed=1)
    optimizer = sophia_tf.SophiaG(learning_rate=0.01, beta_1=0.9, weight_decay=0.5,
                                  hessian_interval=2)
    optimizer.exclude_from_weight_decay(var_names=["bias"])
    variables = [keras.Variable(params[0], name="kernel"), keras.Variable(params[1], name="bias")]
    optimizer.build(variables)
    for t in range(STEPS):
        if sophia_core.refresh_due(t, hessian_interval=2):
            optimizer.update_hessian([tf.constant(h) for h in hhats[t]])
        optimizer.apply_gradients(zip([tf.constant(g) for g in grads[t]], variables,
                                      strict=True))
    want, _ = _reference(params, grads, hhats, lr=float(np.float32(0.01)),
                         weight_decays=[0.5, 0.0], hessian_interval=2, **OPTIONS)
    for v, w in zip(variables, want, strict=True):
        assert bitwise_equal(v, w)
    assert optimizer.weight_decay == 0.5
    assert sophia_tf.SophiaG(weight_decay=None).weight_decay == 0.0


def test_learning_rate_schedule():
    schedule = keras.optimizers.schedules.ExponentialDecay(0.01, decay_steps=1, decay_rate=0.5)
    params, grads, hhats = _stream("float32", seed=2)
    optimizer = sophia_tf.SophiaG(learning_rate=schedule, beta_1=0.9, hessian_interval=2)
    variables = _keras_run(optimizer, params, grads, hhats, compiled=True)
    want, _ = _reference(params, grads, hhats, lr=lambda t: numpy_of(schedule(t)),
                         weight_decays=[0.1, 0.1], hessian_interval=2, **OPTIONS)
    for v, w in zip(variables, want, strict=True):
        np.testing.assert_allclose(numpy_of(v), w, rtol=1e-6, atol=1e-8)
    restored = sophia_tf.SophiaG.from_config(optimizer.get_config())
    assert isinstance(restored.learning_rate, tf.Tensor | tf.Variable | object)
    assert isinstance(restored._learning_rate, keras.optimizers.schedules.ExponentialDecay)


@pytest.mark.parametrize("cls,extra", [(sophia_tf.SophiaG, {}),
                                       (sophia_tf.SophiaH, dict(n_probes=3, probe="rademacher"))])
def test_config_round_trip(cls, extra):
    optimizer = cls(learning_rate=0.003, beta_1=0.95, beta_2=0.98, gamma=0.02,
                    weight_decay=0.05, epsilon=1e-10, clip_threshold=0.5, hessian_interval=4,
                    refresh_at_start=False, bias_correction=True, maximize=True, **extra)
    config = optimizer.get_config()
    clone = cls.from_config(config)
    assert clone.get_config() == config
    again = keras.optimizers.deserialize(keras.optimizers.serialize(optimizer))
    assert type(again) is cls and again.get_config() == config
    for key, value in dict(beta_1=0.95, beta_2=0.98, gamma=0.02, weight_decay=0.05,
                           epsilon=1e-10, clip_threshold=0.5, hessian_interval=4,
                           refresh_at_start=False, bias_correction=True, maximize=True,
                           **extra).items():
        assert config[key] == value, key


@pytest.mark.parametrize("kwargs,spelling", [
    (dict(beta_1=1.5), "beta_1"), (dict(beta_2=-0.1), "beta_2"), (dict(epsilon=0.0), "epsilon"),
    (dict(gamma=-1.0), "gamma"), (dict(hessian_interval=0), "hessian_interval"),
    (dict(learning_rate=-1.0), "learning_rate"), (dict(clip_threshold=0.0), "clip"),
])
def test_invalid_hyperparameters_are_rejected_naming_the_keras_spelling(kwargs, spelling):
    with pytest.raises(ValueError, match=spelling):
        sophia_tf.SophiaG(**kwargs)


def test_invalid_probe_settings():
    with pytest.raises(ValueError, match="probe"):
        sophia_tf.SophiaH(probe="uniform")
    with pytest.raises(ValueError, match="n_probes"):
        sophia_tf.SophiaH(n_probes=0)


def test_narrow_parameters_get_float32_state_and_stay_finite():
    variable = keras.Variable(np.linspace(-1, 1, 6).reshape(2, 3), dtype="bfloat16")
    optimizer = sophia_tf.SophiaG(learning_rate=0.01)
    optimizer.build([variable])
    m, h = optimizer.sophia_slots(variable)
    assert m.dtype == "float32" and h.dtype == "float32"
    optimizer.update_hessian([tf.fill((2, 3), tf.constant(-1.0, tf.bfloat16))])
    for _ in range(3):
        optimizer.apply_gradients([(tf.ones((2, 3), tf.bfloat16), variable)])
    assert variable.dtype == "bfloat16"
    assert np.isfinite(numpy_of(tf.cast(variable.value, tf.float32))).all()


def test_schedule_helpers_and_update_hessian_conventions():
    variable = keras.Variable(np.ones((2, 2), "float32"))
    optimizer = sophia_tf.SophiaG(hessian_interval=3, refresh_at_start=False)
    with pytest.raises(ValueError, match="build"):
        optimizer.update_hessian([tf.ones((2, 2))])
    optimizer.build([variable])
    due = []
    for _ in range(7):
        due.append(bool(optimizer.hessian_refresh_due()))
        optimizer.apply_gradients([(tf.ones((2, 2)), variable)])
    assert due == [False, False, False, True, False, False, True]
    grads = tf.constant([[0.5, -1.0], [2.0, 0.0]])
    optimizer.update_hessian(sampled_grads=[grads], positions=8)
    _, h = optimizer.sophia_slots(variable)
    want = sophia_core.hessian_ema(np.zeros((2, 2), "float32"),
                                   sophia_core.gnb_estimate(grads.numpy(), 8, xp=np), b2=0.99)
    assert bitwise_equal(h, want)
    with pytest.raises(ValueError, match="Hessian estimates"):
        optimizer.update_hessian([grads, grads])
    with pytest.raises(ValueError, match="exactly one"):
        optimizer.update_hessian()


def test_sparse_gradients_from_an_embedding():
    model = keras.Sequential([keras.Input((3,), dtype="int32"), keras.layers.Embedding(10, 4),
                              keras.layers.GlobalAveragePooling1D(), keras.layers.Dense(2)])
    optimizer = sophia_tf.SophiaG(learning_rate=0.01)
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    x, y = tf.constant([[1, 2, 3], [4, 5, 1]]), tf.constant([0, 1])

    @tf.function
    def step():
        with tf.GradientTape() as tape:
            loss = loss_fn(y, model(x))
        grads = tape.gradient(loss, model.trainable_variables)
        assert isinstance(grads[0], tf.IndexedSlices)
        optimizer.apply_gradients(zip(grads, model.trainable_variables, strict=True))
        return loss

    before = numpy_of(model.trainable_variables[0])
    step()
    after = numpy_of(model.trainable_variables[0])
    assert not np.array_equal(before[1], after[1])
    np.testing.assert_allclose(after[9], before[9] * (1 - 0.01 * 0.1), rtol=1e-6)  # decay only


def test_keras_spelled_attributes_are_the_validated_hyperparameters():
    optimizer = sophia_tf.SophiaG(beta_1=0.9, gamma=0.02)
    assert optimizer.beta_1 == 0.9 and optimizer.gamma == 0.02
    optimizer.gamma = 0.05
    assert optimizer._hyperparameters.gamma == 0.05 and optimizer.get_config()["gamma"] == 0.05
    with pytest.raises(ValueError, match="beta_1"):
        optimizer.beta_1 = 1.0


def test_loss_scale_optimizer_skips_non_finite_steps():
    variable = keras.Variable(np.ones((2, 2), "float32"))
    optimizer = keras.optimizers.LossScaleOptimizer(sophia_tf.SophiaG(learning_rate=0.1))
    optimizer.build([variable])
    inner = optimizer.inner_optimizer
    optimizer.apply_gradients([(tf.constant([[1.0, np.nan], [1.0, 1.0]]), variable)])
    assert np.array_equal(numpy_of(variable), np.ones((2, 2)))  # the host skipped it
    assert np.array_equal(numpy_of(inner.sophia_slots(variable)[0]), np.zeros((2, 2)))
    scale = float(numpy_of(optimizer.dynamic_scale))
    optimizer.apply_gradients([(tf.fill((2, 2), scale), variable)])  # a finite, scaled grad
    assert np.isfinite(numpy_of(variable)).all()
    assert not np.array_equal(numpy_of(variable), np.ones((2, 2)))


def test_mixed_precision_fit_refreshes_through_the_loss_scale_optimizer():
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        class Model(sophia_tf.SophiaTrainStep, keras.Sequential):
            pass

        model = Model([keras.Input((4,)), keras.layers.Dense(8, activation="tanh"),
                       keras.layers.Dense(3, dtype="float32")])
        model.compile(optimizer=sophia_tf.SophiaG(learning_rate=0.01, hessian_interval=2),
                      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
        x = np.random.default_rng(0).standard_normal((32, 4)).astype("float32")
        model.fit(x, (x[:, 0] > 0).astype("int64"), batch_size=8, epochs=1, verbose=0)
        inner = model.optimizer.inner_optimizer
        h = [numpy_of(inner.sophia_slots(v)[1]) for v in model.trainable_variables]
        assert all(np.isfinite(a).all() for a in h) and sum(a.sum() for a in h) > 0
    finally:
        keras.mixed_precision.set_global_policy("float32")


def test_refresh_is_due_once_per_gradient_accumulation_window():
    variable = keras.Variable(np.ones((2,), "float32"))
    optimizer = sophia_tf.SophiaG(hessian_interval=2, gradient_accumulation_steps=3)
    optimizer.build([variable])
    due = []
    for _ in range(12):  # 4 real steps of 3 micro-batches
        due.append(bool(optimizer.hessian_refresh_due()))
        optimizer.apply_gradients([(tf.ones((2,)), variable)])
    assert int(optimizer.iterations) == 4
    assert [i for i, d in enumerate(due) if d] == [0, 6]  # after 0 and 2 real steps
