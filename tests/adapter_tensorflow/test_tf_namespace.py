"""The namespace shim: exactly the core's functions, and the core runs on it.

Every core entry point runs on plain TF tensors (eager and in tf.function)
and must agree with numpy: bitwise for elementwise work, to rounding where
there are reductions.
"""

from __future__ import annotations

import numpy as np
import pytest
from tf_support import bitwise_equal, numpy_of, tf

import sophia_core
from sophia_core import SophiaState
from sophia_tf import tf_namespace


def test_shim_provides_exactly_the_core_functions():
    assert set(vars(tf_namespace)) == set(sophia_core.NAMESPACE_FUNCTIONS)


def test_python_operators_on_plain_tensors_do_what_the_core_needs():
    m = tf.constant([0.5, -1.0], tf.float64)
    b1 = 0.965
    assert (b1 * m).dtype == tf.float64
    assert numpy_of(b1 * m + (1.0 - b1) * m).tolist() == (b1 * np.array([0.5, -1.0])
                                                          + (1.0 - b1) * np.array([0.5, -1.0])
                                                          ).tolist()
    labels = tf.constant([[1, -100], [2, 0]], tf.int64)
    assert numpy_of(labels != -100).tolist() == [[True, False], [True, True]]
    assert tuple(labels[..., None].shape) == (2, 2, 1)
    classes = tf_namespace.arange(3, dtype=labels.dtype)
    assert tuple((labels[..., None] == classes).shape) == (2, 2, 3)
    count = tf.constant(7, tf.int64)
    assert bool(((count % 7) == 0) & (count > 0))
    assert numpy_of(0.9 ** tf.constant(2.0)) == pytest.approx(0.81)


def test_shim_clip_where_isdtype_follow_the_array_api():
    xp = tf_namespace
    x = tf.constant([-2.0, 0.5, np.nan, 3.0])
    clipped = numpy_of(xp.clip(x, min=-1.0, max=1.0))
    np.testing.assert_array_equal(clipped, np.clip(np.array([-2.0, 0.5, np.nan, 3.0]), -1, 1)
                                  .astype(np.float32))
    assert numpy_of(xp.where(x > 0, x, xp.zeros_like(x))).tolist()[:2] == [0.0, 0.5]
    assert xp.isdtype(tf.float32, "real floating")
    assert xp.isdtype(tf.bfloat16, "real floating")
    assert not xp.isdtype(tf.int64, "real floating")
    assert xp.isdtype(tf.int32, ("bool", "integral"))
    assert xp.isdtype(tf.float64, tf.float64)
    assert numpy_of(xp.argmax(tf.constant([[1.0, 3.0], [4.0, 2.0]]), axis=-1)).tolist() == [1, 0]
    assert numpy_of(xp.sum(tf.constant([True, True, False]), dtype=tf.float32)) == 2.0


# -- the core's scenarios, run on numpy and on the shim ----------------------

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


def _update(xp, a, dtype, **options):
    kwargs = dict(step=a(3, "int64"), lr=0.01, b1=0.9, gamma=0.04, weight_decay=0.1,
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
    "sophia_update_bfloat16_param": lambda xp, a, dt: _update_narrow(xp, a),
    "init_state": lambda xp, a, dt: list(sophia_core.init_state(a(P, dt), xp=xp)),
    "hessian_ema": lambda xp, a, dt: [
        sophia_core.hessian_ema(a(H, dt), a(G, dt), b2=0.99, xp=xp)],
    "refresh_due": lambda xp, a, dt: [
        sophia_core.refresh_due(a(t, "int64"), hessian_interval=3, refresh_at_start=start)
        for t in (0, 3, 4) for start in (True, False)],
    "clip_fraction": lambda xp, a, dt: [sophia_core.clip_fraction(
        [a(M, dt)], [a(H, dt)], gamma=0.04, eps=1e-12, clip_threshold=1.0, xp=xp)],
    "sample_labels": lambda xp, a, dt: [
        sophia_core.sample_labels(a(LOGITS, dt), a(UNIFORM, dt), xp=xp),
        sophia_core.sample_labels(a(LOGITS, dt), a(UNIFORM, dt), mask=a(MASK, "bool"), xp=xp)],
    "num_positions": lambda xp, a, dt: [sophia_core.num_positions(
        sophia_core.sample_labels(a(LOGITS, dt), a(UNIFORM, dt), mask=a(MASK, "bool"), xp=xp),
        xp=xp)],
    "gnb_estimate": lambda xp, a, dt: [sophia_core.gnb_estimate(a(G, dt), a(7, "int64"), xp=xp),
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


def _update_narrow(xp, a):
    return _update(xp, a, "bfloat16")


def _numpy_array(value, dtype):
    if dtype == "bfloat16":  # numpy has none: the same values, rounded, in float32
        return tf.cast(tf.cast(np.asarray(value, np.float32), tf.bfloat16), tf.float32).numpy()
    return np.asarray(value, dtype=dtype)


def _tf_array(value, dtype):
    return tf.constant(np.asarray(value), dtype=dtype)


def _run(scenario, dtype, compiled):
    if compiled:
        results_tf = tf.function(lambda: scenario(tf_namespace, _tf_array, dtype))()
    else:
        results_tf = scenario(tf_namespace, _tf_array, dtype)
    results_np = scenario(np, _numpy_array, dtype)
    return [numpy_of(r) for r in results_tf], [np.asarray(r) for r in results_np]


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "tf.function"])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_core_scenario_on_shim_matches_numpy_bitwise(name, dtype, compiled):
    got, want = _run(SCENARIOS[name], dtype, compiled)
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        if name == "sophia_update_bfloat16_param":
            g = g.astype(np.float32)  # bf16 param and f32 state vs numpy's f32 emulation
            np.testing.assert_allclose(g, w.astype(np.float32), rtol=2 ** -7, atol=0)
            continue
        assert g.shape == w.shape, name
        np.testing.assert_array_equal(g, w.astype(g.dtype) if w.dtype == bool else w)
        if g.dtype.kind == "f":
            assert g.dtype == w.dtype


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("name", sorted(REDUCING))
def test_core_reducing_scenario_on_shim_matches_numpy(name, dtype):
    got, want = _run(REDUCING[name], dtype, compiled=False)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g, w, rtol=4 * np.finfo(dtype).eps)


def test_update_keeps_bfloat16_params_in_float32_state():
    p = tf.constant(P, tf.bfloat16)
    state = sophia_core.init_state(p, xp=tf_namespace)
    assert state.m.dtype == tf.float32
    new_p, new_state = sophia_core.sophia_update(
        p, tf.constant(G, tf.bfloat16), state, step=1, lr=0.01, b1=0.9, gamma=0.04,
        weight_decay=0.1, eps=1e-12, clip_threshold=1.0, xp=tf_namespace)
    assert new_p.dtype == tf.bfloat16 and new_state.m.dtype == tf.float32
    assert np.isfinite(numpy_of(tf.cast(new_p, tf.float32))).all()
    assert bitwise_equal(new_state.h, state.h)
