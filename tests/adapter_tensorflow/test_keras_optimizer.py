"""SophiaG / SophiaH as Keras optimizers, against the core run on numpy.

Backend-neutral: runs on TensorFlow here and on JAX and torch in
``test_keras_backends.py``. "compiled" is ``tf.function`` on TensorFlow and
``jax.jit`` over ``stateless_apply`` on JAX (torch runs eagerly).
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from keras_support import BACKEND, bitwise_equal, float64_ok, keras, numpy_of

import sophia_core
import sophia_tf

ops = keras.ops
STEPS = 6
SHAPES = [(3, 4), (4,)]
DTYPES = ["float32", pytest.param("float64", marks=pytest.mark.skipif(
    not float64_ok(), reason="no float64 on this backend (JAX without x64)"))]
MODES = ["eager", pytest.param("compiled", marks=pytest.mark.skipif(
    BACKEND == "torch", reason="Keras on torch runs eagerly"))]


def _stream(dtype, seed=0):
    rng = np.random.default_rng(seed)
    params = [rng.standard_normal(s).astype(dtype) for s in SHAPES]
    grads = [[rng.standard_normal(s).astype(dtype) for s in SHAPES] for _ in range(STEPS)]
    hhats = [[(rng.standard_normal(s) * 20).astype(dtype) for s in SHAPES] for _ in range(STEPS)]
    return params, grads, hhats


def _reference(params, grads, hhats, *, lr, weight_decays, hessian_interval, b1=0.9, b2=0.99,
               gamma=0.04, eps=1e-12, clip_threshold=1.0, bias_correction=False,
               maximize=False, hessian_bias_correction=False, target_unclipped_share=None):
    """The trajectory by the core on numpy: refresh when due, then step."""
    params = list(params)
    states = [sophia_core.init_state(p, xp=np) for p in params]
    refreshes = 0
    for t in range(STEPS):
        if sophia_core.refresh_due(t, hessian_interval=hessian_interval):
            refreshes += 1
            states = [s._replace(h=sophia_core.fold_hessian(
                s.h, hh, b2=b2, refresh=refreshes, bias_correction=hessian_bias_correction,
                xp=np).h) for s, hh in zip(states, hhats[t], strict=True)]
            if target_unclipped_share is not None:
                gamma = sophia_core.gamma_for_unclipped_share(
                    [s.m for s in states], [s.h for s in states], target=target_unclipped_share,
                    gamma=gamma, clip_threshold=clip_threshold, b1=b1, step=max(t, 1),
                    bias_correction=bias_correction, xp=np)
        lr_t = lr(t) if callable(lr) else lr
        for i, (p, g) in enumerate(zip(params, grads[t], strict=True)):
            params[i], states[i] = sophia_core.sophia_update(
                p, g, states[i], step=t + 1, lr=np.asarray(lr_t, p.dtype), b1=b1, gamma=gamma,
                weight_decay=weight_decays[i], eps=eps, clip_threshold=clip_threshold,
                bias_correction=bias_correction, maximize=maximize, xp=np)
    return params, states


def _keras_run(optimizer, variables, grads, hhats, mode="eager"):
    """Refresh when due, then step, through the public API."""
    optimizer.build(variables)
    tensors = [[[ops.convert_to_tensor(a) for a in arrays] for arrays in per_step]
               for per_step in (grads, hhats)]
    if mode == "eager":
        for g, hh in zip(*tensors, strict=True):
            if bool(optimizer.hessian_refresh_due()):
                optimizer.update_hessian(hh)
            optimizer.apply_gradients(zip(g, variables, strict=True))
    elif BACKEND == "tensorflow":
        import tensorflow as tf

        @tf.function
        def step(g, hh):
            ops.cond(optimizer.hessian_refresh_due(), lambda: optimizer.update_hessian(hh),
                     lambda: None)
            optimizer.apply_gradients(zip(g, variables, strict=True))

        for g, hh in zip(*tensors, strict=True):
            step(g, hh)
    else:  # JAX: the stateless form a custom train step uses
        import jax

        @jax.jit
        def step(optimizer_values, values, g, hh):
            mapping = list(zip(optimizer.variables, optimizer_values, strict=True))
            with keras.StatelessScope(state_mapping=mapping) as scope:
                current = [v.value for v in optimizer.hessian_state()]
                optimizer.assign_hessian_state(ops.cond(
                    optimizer.hessian_refresh_due(),
                    lambda: optimizer.folded_hessian_state(hh), lambda: current))
            optimizer_values = [scope.get_current_value(v) for v in optimizer.variables]
            return optimizer.stateless_apply(optimizer_values, g, values)

        values = [v.value for v in variables]
        optimizer_values = [v.value for v in optimizer.variables]
        for g, hh in zip(*tensors, strict=True):
            values, optimizer_values = step(optimizer_values, values, g, hh)
        for variable, value in zip([*variables, *optimizer.variables],
                                   [*values, *optimizer_values], strict=True):
            variable.assign(value)
    return variables


FLAGS = {
    "default": {},
    "bias_correction+maximize": dict(bias_correction=True, maximize=True),
    "hessian_bias_correction": dict(hessian_bias_correction=True),
    "target_unclipped_share": dict(target_unclipped_share=0.3),
}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("flags", list(FLAGS))
def test_trajectory_matches_the_core_on_numpy_bitwise(mode, dtype, flags):
    params, grads, hhats = _stream(dtype)
    lr = float(np.float32(0.01))  # Keras keeps lr in a float32 variable
    floatx = keras.config.floatx()
    keras.config.set_floatx(dtype)
    try:
        optimizer = sophia_tf.SophiaG(learning_rate=lr, beta_1=0.9, weight_decay=0.1,
                                      hessian_interval=2, **FLAGS[flags])
        variables = _keras_run(optimizer, [keras.Variable(p) for p in params], grads, hhats,
                               mode)
    finally:
        keras.config.set_floatx(floatx)
    want, states = _reference(params, grads, hhats, lr=lr, weight_decays=[0.1, 0.1],
                              hessian_interval=2, **FLAGS[flags])
    for v, w, s in zip(variables, want, states, strict=True):
        m, h = optimizer.sophia_slots(v)
        assert bitwise_equal(v, w) and bitwise_equal(m, s.m) and bitwise_equal(h, s.h)
    assert int(numpy_of(optimizer.iterations)) == STEPS
    assert int(numpy_of(optimizer.hessian_refreshes)) == STEPS // 2
    assert int(numpy_of(optimizer.rejected_hessian_coordinates)) == 0


def test_non_finite_estimates_keep_h_and_are_counted():
    variable = keras.Variable(np.ones((2, 3), "float32"))
    optimizer = sophia_tf.SophiaG()
    optimizer.build([variable])
    optimizer.update_hessian([ops.convert_to_tensor(np.full((2, 3), 2.0, "float32"))])
    hhat = np.array([[np.nan, np.inf, 1.0], [-np.inf, 3.0, 3.0]], "float32")
    optimizer.update_hessian([ops.convert_to_tensor(hhat)])
    h = numpy_of(optimizer.sophia_slots(variable)[1])
    want = sophia_core.fold_hessian(np.full((2, 3), 0.02, "float32"), hhat, b2=0.99, xp=np).h
    assert h.tobytes() == want.tobytes() and np.isfinite(h).all()
    assert int(numpy_of(optimizer.rejected_hessian_coordinates)) == 3
    assert int(numpy_of(optimizer.hessian_refreshes)) == 2


def test_weight_decay_is_sophias_once_and_exclusion_after_build_is_honoured():
    params, grads, hhats = _stream("float32", seed=1)
    optimizer = sophia_tf.SophiaG(learning_rate=0.01, beta_1=0.9, weight_decay=0.5,
                                  hessian_interval=2)
    variables = [keras.Variable(params[0], name="kernel"), keras.Variable(params[1], name="bias")]
    optimizer.build(variables)
    optimizer.exclude_from_weight_decay(var_names=["bias"])  # after build, as AdamW allows
    _keras_run(optimizer, variables, grads, hhats)
    want, _ = _reference(params, grads, hhats, lr=float(np.float32(0.01)),
                         weight_decays=[0.5, 0.0], hessian_interval=2)
    for v, w in zip(variables, want, strict=True):
        assert bitwise_equal(v, w)
    assert optimizer.weight_decay == 0.5
    assert sophia_tf.SophiaG(weight_decay=None).weight_decay == 0.0


def test_learning_rate_schedule():
    schedule = keras.optimizers.schedules.ExponentialDecay(0.01, decay_steps=1, decay_rate=0.5)
    params, grads, hhats = _stream("float32", seed=2)
    optimizer = sophia_tf.SophiaG(learning_rate=schedule, beta_1=0.9, hessian_interval=2)
    variables = _keras_run(optimizer, [keras.Variable(p) for p in params], grads, hhats)
    want, _ = _reference(params, grads, hhats, lr=lambda t: numpy_of(schedule(t)),
                         weight_decays=[0.1, 0.1], hessian_interval=2)
    for v, w in zip(variables, want, strict=True):
        np.testing.assert_allclose(numpy_of(v), w, rtol=1e-6, atol=1e-8)
    restored = sophia_tf.SophiaG.from_config(optimizer.get_config())
    assert isinstance(restored._learning_rate, keras.optimizers.schedules.ExponentialDecay)


SETTINGS = dict(beta_1=0.95, beta_2=0.98, gamma=0.02, weight_decay=0.05, epsilon=1e-10,
                clip_threshold=0.5, hessian_interval=4, refresh_at_start=False,
                bias_correction=True, maximize=True, hessian_bias_correction=True,
                target_unclipped_share=0.2, hessian_batch_fraction=0.5,
                require_refresh=False, warn_sign_momentum=False)


@pytest.mark.parametrize("cls,extra", [(sophia_tf.SophiaG, {}),
                                       (sophia_tf.SophiaH, dict(n_probes=3, probe="rademacher"))])
def test_config_round_trip(cls, extra):
    optimizer = cls(learning_rate=0.003, **SETTINGS, **extra)
    config = optimizer.get_config()
    assert cls.from_config(config).get_config() == config
    again = keras.optimizers.deserialize(keras.optimizers.serialize(optimizer))
    assert type(again) is cls and again.get_config() == config
    for key, value in {**SETTINGS, **extra}.items():
        assert config[key] == value, key


BAD = [
    (dict(beta_1=1.5), ValueError, "beta_1"), (dict(beta_2=-0.1), ValueError, "beta_2"),
    (dict(epsilon=0.0), ValueError, "epsilon"), (dict(gamma=-1.0), ValueError, "gamma"),
    (dict(hessian_interval=0), ValueError, "hessian_interval"),
    (dict(learning_rate=-1.0), ValueError, "learning_rate"),
    (dict(clip_threshold=0.0), ValueError, "clip"),
    (dict(target_unclipped_share=1.5), ValueError, "target_unclipped_share"),
    (dict(hessian_batch_fraction=0.0), ValueError, "hessian_batch_fraction"),
    (dict(learning_rate="1e-3"), TypeError, "learning_rate"),
    (dict(beta_1=None), TypeError, "beta_1"), (dict(gamma="0.05"), TypeError, "gamma"),
    (dict(hessian_interval=2.5), TypeError, "hessian_interval"),
    (dict(maximize=1), TypeError, "maximize"), (dict(require_refresh="yes"), TypeError,
                                                 "require_refresh"),
]


@pytest.mark.parametrize("kwargs,error,spelling", BAD, ids=[str(b[0]) for b in BAD])
def test_invalid_values_are_rejected_by_the_core_everywhere(kwargs, error, spelling):
    with pytest.raises(error, match=spelling):
        sophia_tf.SophiaG(**kwargs)
    config = sophia_tf.SophiaG().get_config()
    with pytest.raises(error, match=spelling):
        sophia_tf.SophiaG.from_config({**config, **kwargs})
    name, value = next(iter(kwargs.items()))
    if name != "learning_rate":
        optimizer = sophia_tf.SophiaG()
        with pytest.raises(error, match=spelling):
            setattr(optimizer, name, value)


def test_setters_validate_and_take_effect():
    optimizer = sophia_tf.SophiaG(beta_1=0.9, gamma=0.02)
    optimizer.gamma = 0.05
    assert optimizer.gamma == 0.05 and optimizer.get_config()["gamma"] == 0.05
    with pytest.raises(ValueError, match="beta_1"):
        optimizer.beta_1 = 1.0
    assert optimizer.beta_1 == 0.9
    with pytest.raises(ValueError, match="probe"):
        sophia_tf.SophiaH(probe="uniform")
    with pytest.raises(ValueError, match="n_probes"):
        sophia_tf.SophiaH(n_probes=0)


def test_eps_that_underflows_the_parameter_dtype_fails_at_build():
    optimizer = sophia_tf.SophiaG(epsilon=1e-40)
    with pytest.raises(ValueError, match="eps"):
        optimizer.build([keras.Variable(np.ones(2, "float32"))])


def test_narrow_parameters_get_float32_state_and_stay_finite():
    variable = keras.Variable(np.linspace(-1, 1, 6).reshape(2, 3), dtype="bfloat16")
    optimizer = sophia_tf.SophiaG(learning_rate=0.01)
    optimizer.build([variable])
    m, h = optimizer.sophia_slots(variable)
    assert m.dtype == "float32" and h.dtype == "float32"
    optimizer.update_hessian([ops.full((2, 3), -1.0, "bfloat16")])
    for _ in range(3):
        optimizer.apply_gradients([(ops.ones((2, 3), "bfloat16"), variable)])
    assert variable.dtype == "bfloat16" and np.isfinite(numpy_of(variable)).all()


def test_refresh_schedule_and_update_hessian_errors():
    variable = keras.Variable(np.ones((2, 2), "float32"))
    optimizer = sophia_tf.SophiaG(hessian_interval=3, refresh_at_start=False,
                                  require_refresh=False)
    with pytest.raises(ValueError, match="build"):
        optimizer.update_hessian([ops.ones((2, 2))])
    optimizer.build([variable])
    due = []
    for _ in range(7):
        due.append(bool(optimizer.hessian_refresh_due()))
        optimizer.apply_gradients([(ops.ones((2, 2)), variable)])
    assert due == [False, False, False, True, False, False, True]
    with pytest.raises(ValueError, match="Hessian estimates"):
        optimizer.update_hessian([ops.ones((2, 2)), ops.ones((2, 2))])
    with pytest.raises(ValueError, match="shape"):
        optimizer.update_hessian([ops.ones((4,))])
    assert int(numpy_of(optimizer.hessian_refreshes)) == 0


def test_refresh_is_due_once_per_gradient_accumulation_window():
    variable = keras.Variable(np.ones((2,), "float32"))
    optimizer = sophia_tf.SophiaG(hessian_interval=2, gradient_accumulation_steps=3,
                                  require_refresh=False)
    optimizer.build([variable])
    due = []
    for _ in range(12):  # 4 real steps of 3 micro-batches
        due.append(bool(optimizer.hessian_refresh_due()))
        optimizer.apply_gradients([(ops.ones((2,)), variable)])
    assert int(numpy_of(optimizer.iterations)) == 4
    assert [i for i, d in enumerate(due) if d] == [0, 6]  # after 0 and 2 real steps


def test_loss_scale_optimizer_skips_non_finite_steps():
    variable = keras.Variable(np.ones((2, 2), "float32"))
    optimizer = keras.optimizers.LossScaleOptimizer(sophia_tf.SophiaG(learning_rate=0.1))
    optimizer.build([variable])
    inner = optimizer.inner_optimizer

    def apply(gradient):
        if BACKEND != "jax":
            optimizer.apply_gradients([(gradient, variable)])
            return
        # On JAX Keras's LossScaleOptimizer works statelessly only (as in fit).
        values, optimizer_values = optimizer.stateless_apply(
            [v.value for v in optimizer.variables], [gradient], [variable.value])
        for v, value in zip([variable, *optimizer.variables], [*values, *optimizer_values],
                            strict=True):
            v.assign(value)

    apply(ops.convert_to_tensor([[1.0, np.nan], [1.0, 1.0]]))
    assert np.array_equal(numpy_of(variable), np.ones((2, 2)))  # the host skipped it
    assert np.array_equal(numpy_of(inner.sophia_slots(variable)[0]), np.zeros((2, 2)))
    apply(ops.full((2, 2), float(numpy_of(optimizer.dynamic_scale))))  # finite, scaled
    assert np.isfinite(numpy_of(variable)).all()
    assert not np.array_equal(numpy_of(variable), np.ones((2, 2)))


def _sophia_messages(caught):
    return [str(w.message) for w in caught if "Sophia" in str(w.message)]


def test_missing_refresh_warns_once_naming_the_fix():
    variable = keras.Variable(np.ones(3, "float32"))
    optimizer = sophia_tf.SophiaG(hessian_interval=2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            optimizer.apply_gradients([(ops.ones(3), variable)])
        assert not _sophia_messages(caught)  # first due after 0 steps; not yet k past it
        for _ in range(5):
            optimizer.apply_gradients([(ops.ones(3), variable)])
    messages = _sophia_messages(caught)
    assert len(messages) == 1 and "without any Hessian estimate" in messages[0]
    assert "sophia_tf.Sequential" in messages[0] and "require_refresh=False" in messages[0]
    quiet = sophia_tf.SophiaG(hessian_interval=2, require_refresh=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(6):
            quiet.apply_gradients([(ops.ones(3), variable)])
    assert not _sophia_messages(caught)


def test_sign_momentum_regime_warns_once_and_reports_the_share():
    variable = keras.Variable(np.ones(50, "float32"))
    hhat = [ops.full((50,), 1e-6)]  # tiny curvature: every step clipped

    def run(optimizer):
        optimizer.build([variable])
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for _ in range(sophia_core.SIGN_MOMENTUM_WARMUP + sophia_core.SIGN_MOMENTUM_PATIENCE
                           + 3):
                optimizer.update_hessian(hhat)
                optimizer.apply_gradients([(ops.ones(50), variable)])
        return _sophia_messages(caught)

    messages = run(sophia_tf.SophiaG(hessian_interval=1))
    assert len(messages) == 1 and "sign momentum" in messages[0]
    assert run(sophia_tf.SophiaG(hessian_interval=1, warn_sign_momentum=False)) == []
    optimizer = sophia_tf.SophiaG(hessian_interval=1, gamma=1e9)
    optimizer.build([variable])
    optimizer.apply_gradients([(ops.ones(50), variable)])
    optimizer.update_hessian([ops.full((50,), 1.0)])
    assert float(numpy_of(optimizer.unclipped_share)) == 1.0
