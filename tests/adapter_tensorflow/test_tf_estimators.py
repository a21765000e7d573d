"""The tape-based estimates: GNB against a closed form, Hutchinson on quadratics."""

from __future__ import annotations

import numpy as np
import pytest
from tf_support import keras, numpy_of, tf

import sophia_core
import sophia_tf

RNG = np.random.default_rng(7)
X = RNG.standard_normal((6, 5, 3))
W = RNG.standard_normal((3, 4))
B = RNG.standard_normal((4,))
MASK = RNG.uniform(size=(6, 5)) < 0.6


def _softmax(z):
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "tf.function"])
def test_gnb_matches_the_closed_form_for_a_linear_softmax(compiled):
    w, b = keras.Variable(W), keras.Variable(B)  # float64
    seed = tf.constant([3, 11], tf.int64)

    def estimate():
        return sophia_tf.gnb_hessian(lambda: tf.matmul(tf.constant(X), w.value) + b.value,
                                     [w, b], mask=tf.constant(MASK), seed=seed)

    hw, hb = (tf.function(estimate) if compiled else estimate)()
    logits = X @ W + B
    bits = tf.random.stateless_uniform(logits.shape, seed=seed, dtype=tf.uint64, minval=None,
                                       maxval=None, alg="philox").numpy()
    uniform = (bits >> np.uint64(11)).astype(np.float64) * 2.0 ** -53
    labels = sophia_core.sample_labels(logits, uniform, mask=MASK, xp=np)
    n = int(MASK.sum())
    dz = (_softmax(logits) - np.eye(4)[np.where(MASK, labels, 0)]) * MASK[..., None] / n
    gw = np.einsum("bti,btj->ij", X, dz)
    gb = dz.sum((0, 1))
    np.testing.assert_allclose(numpy_of(hw), n * gw * gw, rtol=1e-10, atol=1e-15)
    np.testing.assert_allclose(numpy_of(hb), n * gb * gb, rtol=1e-10, atol=1e-15)


def test_gnb_is_reproducible_with_a_generator():
    w = keras.Variable(W)

    def run(generator):
        return numpy_of(sophia_tf.gnb_hessian(lambda: tf.matmul(tf.constant(X), w.value),
                                              [w], generator=generator)[0])

    first = run(tf.random.Generator.from_seed(5))
    assert np.array_equal(first, run(tf.random.Generator.from_seed(5)))
    assert not np.array_equal(first, run(tf.random.Generator.from_seed(6)))


A = np.array([0.5, 2.0, -1.0, 3.0])


def _quadratic(w):
    return 0.5 * tf.reduce_sum(tf.constant(A) * w.value * w.value)


@pytest.mark.parametrize("hvp", ["forward_over_reverse", "reverse_over_reverse"])
def test_hutchinson_with_rademacher_probes_is_exact_for_a_diagonal_hessian(hvp):
    w = keras.Variable(RNG.standard_normal(4))
    hhat = sophia_tf.hutchinson_hessian(lambda: _quadratic(w), [w], probe="rademacher",
                                        n_probes=2, seed=tf.constant([1, 2], tf.int64),
                                        hvp=hvp)[0]
    np.testing.assert_array_equal(numpy_of(hhat), A)


def test_hutchinson_gaussian_hvp_methods_agree_and_average_to_the_diagonal():
    full = RNG.standard_normal((4, 4))
    hessian = full @ full.T
    w = keras.Variable(RNG.standard_normal(4))

    def loss():
        return 0.5 * tf.tensordot(w.value, tf.linalg.matvec(tf.constant(hessian), w.value), 1)

    seed = tf.constant([9, 9], tf.int64)
    forward = sophia_tf.hutchinson_hessian(loss, [w], n_probes=3, seed=seed)[0]
    reverse = sophia_tf.hutchinson_hessian(loss, [w], n_probes=3, seed=seed,
                                           hvp="reverse_over_reverse")[0]
    np.testing.assert_allclose(numpy_of(forward), numpy_of(reverse), rtol=1e-12)
    probes = 16  # seeded: deterministic, and 5 sigma is far from the edge
    mean = sophia_tf.hutchinson_hessian(loss, [w], n_probes=probes, seed=seed)[0]
    spread = np.sqrt(2 * (hessian ** 2).sum(1) / probes)  # std of the mean of u_i (H u)_i
    assert (np.abs(numpy_of(mean) - np.diag(hessian)) < 5 * spread).all()
    generator_hhat = sophia_tf.hutchinson_hessian(loss, [w], generator=tf.random.Generator
                                                  .from_seed(1))[0]
    assert np.array_equal(numpy_of(generator_hhat), numpy_of(sophia_tf.hutchinson_hessian(
        loss, [w], generator=tf.random.Generator.from_seed(1))[0]))


def test_estimates_run_under_jit_compile():
    w = keras.Variable(W.astype("float32"))
    x = tf.constant(X, tf.float32)
    seed = tf.constant([1, 1], tf.int64)

    @tf.function(jit_compile=True)
    def both():
        g = sophia_tf.gnb_hessian(lambda: tf.matmul(x, w.value), [w], seed=seed)[0]
        h = sophia_tf.hutchinson_hessian(
            lambda: tf.reduce_sum(tf.matmul(x, w.value) ** 2), [w], seed=seed)[0]
        return g, h

    g, h = both()
    eager_g = sophia_tf.gnb_hessian(lambda: tf.matmul(x, w.value), [w], seed=seed)[0]
    # The same labels (the noise is bit-identical); XLA's reductions round differently.
    np.testing.assert_allclose(numpy_of(g), numpy_of(eager_g), rtol=1e-4, atol=1e-7)
    assert np.isfinite(numpy_of(h)).all()
