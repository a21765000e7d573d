"""The estimates: GNB against a closed form, Hutchinson on quadratics, every backend.

Both take a function of *values* (as ``model.stateless_call`` gives); the
refresh in ``fit`` (test_keras_fit.py) runs them on models with an
Embedding, whose TensorFlow gradient is ``IndexedSlices``.
"""

from __future__ import annotations

import numpy as np
import pytest
from keras_support import float64_ok, keras, numpy_of

import sophia_core
import sophia_tf
from sophia_tf._estimators import noise

ops = keras.ops
DTYPE = "float64" if float64_ok() else "float32"
RTOL = 1e-10 if DTYPE == "float64" else 2e-4
RNG = np.random.default_rng(7)
X = RNG.standard_normal((6, 5, 3))
W = RNG.standard_normal((3, 4))
B = RNG.standard_normal((4,))
MASK = RNG.uniform(size=(6, 5)) < 0.6


def _softmax(z):
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _tensor(array):
    return ops.convert_to_tensor(np.asarray(array, DTYPE))


@pytest.mark.parametrize("from_logits", [True, False], ids=["logits", "probabilities"])
def test_gnb_matches_the_closed_form_for_a_linear_softmax(from_logits):
    x, seed = _tensor(X), (3, 11)

    def outputs(values):
        z = x @ values[0] + values[1]  # ops.matmul: float32 on torch (Keras 3.15)
        return z if from_logits else ops.softmax(z, axis=-1)

    hw, hb = sophia_tf.gnb_hessian(outputs, [_tensor(W), _tensor(B)], seed=seed,
                                   mask=ops.convert_to_tensor(MASK), from_logits=from_logits)
    logits = X @ W + B
    uniform = numpy_of(noise("uniform", logits.shape, DTYPE, seed)).astype(np.float64)
    labels = sophia_core.sample_labels(logits, uniform, mask=MASK, xp=np)
    n = int(MASK.sum())
    dz = (_softmax(logits) - np.eye(4)[np.where(MASK, labels, 0)]) * MASK[..., None] / n
    gw, gb = np.einsum("bti,btj->ij", X, dz), dz.sum((0, 1))
    rtol = RTOL if from_logits else max(RTOL, 1e-5)  # log(softmax) rounds
    np.testing.assert_allclose(numpy_of(hw), n * gw * gw, rtol=rtol, atol=1e-12)
    np.testing.assert_allclose(numpy_of(hb), n * gb * gb, rtol=rtol, atol=1e-12)


def test_the_same_seed_gives_the_same_estimate():
    def run(seed):
        return numpy_of(sophia_tf.gnb_hessian(lambda v: _tensor(X) @ v[0],
                                              [_tensor(W)], seed=seed)[0])

    assert np.array_equal(run((5, 0)), run((5, 0)))
    assert not np.array_equal(run((5, 0)), run((5, 1)))
    assert not np.array_equal(run((5, 0)), run((6, 0)))


A = np.array([0.5, 2.0, -1.0, 3.0])


def test_hutchinson_with_rademacher_probes_is_exact_for_a_diagonal_hessian():
    def loss(values):
        return 0.5 * ops.sum(_tensor(A) * values[0] * values[0])

    hhat = sophia_tf.hutchinson_hessian(loss, [_tensor(RNG.standard_normal(4))],
                                        probe="rademacher", n_probes=2, seed=(1, 2))[0]
    np.testing.assert_array_equal(numpy_of(hhat), A.astype(DTYPE))


def test_hutchinson_gaussian_probes_average_to_the_diagonal():
    full = RNG.standard_normal((4, 4))
    hessian = full @ full.T

    def loss(values):
        w = values[0]
        return 0.5 * ops.sum(w * ops.sum(_tensor(hessian) * w, axis=1))  # H w

    probes = 16  # seeded: deterministic, and 5 sigma is far from the edge
    mean = sophia_tf.hutchinson_hessian(loss, [_tensor(RNG.standard_normal(4))],
                                        n_probes=probes, seed=(9, 9))[0]
    spread = np.sqrt(2 * (hessian ** 2).sum(1) / probes)  # std of the mean of u_i (H u)_i
    assert (np.abs(numpy_of(mean) - np.diag(hessian)) < 5 * spread).all()
