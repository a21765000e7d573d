"""The keras.ops namespace: exactly the core's functions, bitwise equal to numpy.

Every core entry point runs on the Keras backend's tensors (eagerly and
compiled: ``tf.function`` or ``jax.jit``) and must agree with the core on
numpy: bitwise for elementwise work, to rounding where there are reductions.
"""

from __future__ import annotations

import numpy as np
import pytest
from keras_support import BACKEND, bitwise_equal, float64_ok, keras, numpy_of

import sophia_core
from sophia_core import SophiaState
from sophia_tf import keras_namespace

ops = keras.ops
DTYPES = ["float32", pytest.param("float64", marks=pytest.mark.skipif(
    not float64_ok(), reason="no float64 on this backend (JAX without x64)"))]


def test_namespace_provides_exactly_the_core_functions():
    assert set(vars(keras_namespace)) == set(sophia_core.NAMESPACE_FUNCTIONS)


def test_dtypes_are_the_backends_own():
    x = ops.ones((2,), "float32")
    assert x.dtype == keras_namespace.float32
    assert keras_namespace.astype(x, keras_namespace.int32).dtype == keras_namespace.int32
    assert keras_namespace.isdtype(x.dtype, "real floating")
    assert keras_namespace.isdtype(ops.ones((1,), "bfloat16").dtype, "real floating")
    assert not keras_namespace.isdtype(keras_namespace.int32, "real floating")
    with pytest.raises(ValueError, match="real floating"):
        keras_namespace.isdtype(keras_namespace.int32, "integral")


def test_clip_keeps_nan_and_where_takes_python_scalars():
    xp = keras_namespace
    x = ops.convert_to_tensor([-2.0, 0.5, np.nan, 3.0])
    np.testing.assert_array_equal(numpy_of(xp.clip(x, min=-1.0, max=1.0)),
                                  np.clip(np.array([-2.0, 0.5, np.nan, 3.0], "float32"), -1, 1))
    assert numpy_of(xp.where(x > 0, x, 0.0)).tolist()[:2] == [0.0, 0.5]
    assert numpy_of(xp.sum(x > 0, dtype=xp.float32)) == 2.0
    assert numpy_of(xp.sort(xp.concat([x[:2], x[3:]]))).tolist() == [-2.0, 0.5, 3.0]


# -- the core's scenarios, run on numpy and on keras.ops ---------------------

RNG = np.random.default_rng(20240501)
P = RNG.standard_normal((4, 5))
G = RNG.standard_normal((4, 5))
M = RNG.standard_normal((4, 5)) * 0.1
H = RNG.standard_normal((4, 5))  # negative entries too: the sign-step branch
M[0, :2] = 0.0  # m = 0 gives u = 0
LOGITS = RNG.standard_normal((3, 4, 6))
UNIFORM = RNG.uniform(size=(3, 4, 6))
MASK = RNG.uniform(size=(3, 4)) < 0.7
NOISE = RNG.standard_normal((4, 5))
HHAT = np.where(RNG.uniform(size=(4, 5)) < 0.2, np.inf, G * G)


def _update(xp, a, dtype, **options):
    kwargs = dict(step=a(3, "int32"), lr=0.01, b1=0.9, gamma=0.04, weight_decay=0.1,
                  eps=1e-12, clip_threshold=1.0)
    kwargs.update(options)
    p, s = sophia_core.sophia_update(
        a(P, dtype), a(G, dtype), SophiaState(a(M, dtype), a(H, dtype)), xp=xp, **kwargs)
    return [p, s.m]


SCENARIOS = {
    "sophia_update": lambda xp, a, dt: _update(xp, a, dt),
    "sophia_update_bias_correction_maximize": lambda xp, a, dt: _update(
        xp, a, dt, bias_correction=True, maximize=True),
    "sophia_update_tensor_lr": lambda xp, a, dt: _update(xp, a, dt, lr=a(0.01, dt)),
    "fold_hessian": lambda xp, a, dt: list(sophia_core.fold_hessian(
        a(H, dt), a(HHAT, dt), b2=0.99, xp=xp)),
    "fold_hessian_bias_correction": lambda xp, a, dt: list(sophia_core.fold_hessian(
        a(H, dt), a(G, dt), b2=0.99, refresh=3, bias_correction=True, xp=xp)),
    "refresh_due": lambda xp, a, dt: [
        sophia_core.refresh_due(a(t, "int32"), hessian_interval=3, refresh_at_start=start)
        for t in (0, 3, 4) for start in (True, False)],
    "unclipped_count": lambda xp, a, dt: [sophia_core.unclipped_count(
        [a(M, dt)], [a(H, dt)], gamma=0.04, eps=1e-12, clip_threshold=1.0, xp=xp)[0]],
    "gamma_for_unclipped_share": lambda xp, a, dt: [sophia_core.gamma_for_unclipped_share(
        [a(M, dt)], [a(np.abs(H), dt)], target=0.3, gamma=0.04, clip_threshold=1.0, xp=xp)],
    "sample_labels": lambda xp, a, dt: [
        sophia_core.sample_labels(a(LOGITS, dt), a(UNIFORM, dt), xp=xp),
        sophia_core.sample_labels(a(LOGITS, dt), a(UNIFORM, dt), mask=a(MASK, "bool"), xp=xp)],
    "gnb_estimate": lambda xp, a, dt: [sophia_core.gnb_estimate(a(G, dt), a(7, "int32"), xp=xp),
                                       sophia_core.gnb_estimate(a(G, dt), 7, xp=xp)],
    "hutchinson_estimate": lambda xp, a, dt: [sophia_core.hutchinson_estimate(
        [a(NOISE, dt), a(G, dt)], [a(H, dt), a(M, dt)], xp=xp)],
    "probe_from_noise": lambda xp, a, dt: [
        sophia_core.probe_from_noise(a(NOISE, dt), xp=xp),
        sophia_core.probe_from_noise(a(UNIFORM[0, :, :5], dt), probe="rademacher", xp=xp)],
}
#: Scenarios with reductions: equal to rounding, not bitwise.
REDUCING = {
    "masked_mean_cross_entropy": lambda xp, a, dt: [sophia_core.masked_mean_cross_entropy(
        a(LOGITS, dt),
        sophia_core.sample_labels(a(LOGITS, dt), a(UNIFORM, dt), mask=a(MASK, "bool"), xp=xp),
        xp=xp)],
}


def _numpy_array(value, dtype):
    return np.asarray(value, dtype=dtype)


def _keras_array(value, dtype):
    return ops.convert_to_tensor(np.asarray(value), dtype=dtype)


def _compiled(function):
    if BACKEND == "tensorflow":
        import tensorflow as tf

        return tf.function(function)
    if BACKEND == "jax":
        import jax

        return jax.jit(function)
    pytest.skip("torch runs eagerly")


def _run(scenario, dtype, compiled):
    def on_keras():
        return scenario(keras_namespace, _keras_array, dtype)

    results = (_compiled(on_keras) if compiled else on_keras)()
    want = scenario(np, _numpy_array, dtype)
    return [numpy_of(r) for r in results], [np.asarray(r) for r in want]


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_core_scenario_matches_numpy_bitwise(name, dtype, compiled):
    got, want = _run(SCENARIOS[name], dtype, compiled)
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        assert g.shape == w.shape, name
        if w.dtype.kind in "iub":
            np.testing.assert_array_equal(g, w)
        else:
            assert g.dtype == w.dtype and g.tobytes() == w.tobytes(), (name, g, w)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", sorted(REDUCING))
def test_core_reducing_scenario_matches_numpy(name, dtype):
    got, want = _run(REDUCING[name], dtype, compiled=False)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g, w, rtol=4 * np.finfo(dtype).eps)


def test_update_keeps_bfloat16_params_in_float32_state():
    p = ops.convert_to_tensor(P, "bfloat16")
    state = sophia_core.init_state(p, xp=keras_namespace)
    assert state.m.dtype == keras_namespace.float32
    new_p, new_state = sophia_core.sophia_update(
        p, ops.convert_to_tensor(G, "bfloat16"), state, step=1, lr=0.01, b1=0.9, gamma=0.04,
        weight_decay=0.1, eps=1e-12, clip_threshold=1.0, xp=keras_namespace)
    assert keras.backend.standardize_dtype(new_p.dtype) == "bfloat16"
    assert new_state.m.dtype == keras_namespace.float32
    assert np.isfinite(numpy_of(new_p)).all()
    assert bitwise_equal(new_state.h, state.h)
