"""The array parts of the estimators (SPEC section 3) on every namespace."""

from __future__ import annotations

import math

import numpy as np
import pytest
from backend_support import to_numpy

import sophia_core as sc


def softmax(z):
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def test_gumbel_max_frequencies_match_softmax(xp):
    """20,000 draws per row; each frequency within 5 standard errors.

    For a category of probability p the count is Binomial(n, p): the standard
    error of the frequency is sqrt(p(1-p)/n). With 3 x 5 frequencies, a
    5-sigma bound fails by chance with probability below 1e-5 (and the seed
    is fixed, so the test is deterministic).
    """
    rng = np.random.default_rng(0)
    n = 20_000
    logits = np.array([[0.0, 1.0, 2.0, -1.0, 0.5], [3.0, 3.0, 0.0, 0.0, -5.0], [0.0] * 5])
    uniform = rng.random((n, *logits.shape))
    labels = sc.sample_labels(xp.asarray(np.broadcast_to(logits, uniform.shape).copy()),
                              xp.asarray(uniform))
    labels = to_numpy(labels)
    assert labels.shape == (n, 3)
    probs = softmax(logits)
    for row in range(3):
        freq = np.bincount(labels[:, row], minlength=5) / n
        stderr = np.sqrt(probs[row] * (1 - probs[row]) / n)
        assert np.all(np.abs(freq - probs[row]) <= 5 * stderr + 1e-12), (row, freq, probs[row])


def test_sample_labels_masks_ignored_positions(xp):
    logits = xp.asarray(np.zeros((2, 3, 4)))
    uniform = xp.asarray(np.full((2, 3, 4), 0.5))
    mask = xp.asarray(np.array([[True, False, True], [False, False, True]]))
    labels = to_numpy(sc.sample_labels(logits, uniform, mask=mask))
    assert labels.shape == (2, 3)
    np.testing.assert_array_equal(labels == sc.IGNORE_INDEX, ~to_numpy(mask))
    assert int(to_numpy(sc.num_positions(xp.asarray(labels)))) == 3


@pytest.mark.filterwarnings("ignore:divide by zero:RuntimeWarning")  # log(0) = -inf, by design
def test_uniform_zero_is_never_sampled(xp):
    logits = xp.asarray(np.array([[10.0, 0.0, 0.0]]))
    uniform = xp.asarray(np.array([[0.0, 0.3, 0.2]]))
    assert to_numpy(sc.sample_labels(logits, uniform)).tolist() == [1]


def test_masked_cross_entropy_equals_direct_computation(xp, dtype_name):
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(4, 6, 7)).astype(dtype_name) * 3
    labels = rng.integers(0, 7, size=(4, 6))
    labels[0, :2] = sc.IGNORE_INDEX
    labels[3, 5] = sc.IGNORE_INDEX
    loss = sc.masked_mean_cross_entropy(xp.asarray(logits), xp.asarray(labels))
    z = logits.astype(np.float64)
    keep = labels != sc.IGNORE_INDEX
    log_probs = z - np.log(np.exp(z).sum(-1, keepdims=True))
    direct = -np.mean(log_probs[keep, labels[keep]])
    rtol = 1e-5 if dtype_name == "float32" else 1e-12
    assert float(to_numpy(loss)) == pytest.approx(direct, rel=rtol)


def test_cross_entropy_with_no_counted_position_is_zero(xp):
    logits = xp.asarray(np.ones((2, 3)))
    labels = xp.asarray(np.full((2,), sc.IGNORE_INDEX))
    assert float(to_numpy(sc.masked_mean_cross_entropy(logits, labels))) == 0.0


def test_cross_entropy_is_stable_for_large_logits(xp):
    logits = xp.asarray(np.array([[1e4, 0.0], [0.0, -1e4]], dtype=np.float32))
    labels = xp.asarray(np.array([1, 0]))
    loss = float(to_numpy(sc.masked_mean_cross_entropy(logits, labels)))
    assert loss == pytest.approx(1e4 / 2, rel=1e-6)


def test_gnb_estimate_is_n_g_squared(xp, dtype_name):
    g = np.array([[0.5, -2.0], [0.0, 1e-3]], dtype=dtype_name)
    hhat = sc.gnb_estimate(xp.asarray(g), 128)
    np.testing.assert_array_equal(to_numpy(hhat), 128 * (g * g))
    hhat = sc.gnb_estimate(xp.asarray(g), xp.asarray(128))
    np.testing.assert_array_equal(to_numpy(hhat), 128 * (g * g))


@pytest.mark.parametrize("n_probes", [1, 4])
def test_rademacher_hutchinson_on_a_diagonal_quadratic_is_exact(xp, n_probes):
    """l(x) = x^T A x / 2 with A diagonal: u * (A u) = diag(A) for u = +-1."""
    rng = np.random.default_rng(2)
    diag = rng.normal(size=(5,))  # negative curvature included
    hessian = xp.asarray(np.diag(diag))
    probes, hvps = [], []
    for _ in range(n_probes):
        u = sc.probe_from_noise(xp.asarray(rng.random(5)), probe="rademacher")
        assert set(to_numpy(u).tolist()) <= {-1.0, 1.0}
        probes.append(u)
        hvps.append(xp.matmul(hessian, u))  # the framework's HVP, here explicit
    hhat = sc.hutchinson_estimate(probes, hvps)
    np.testing.assert_array_equal(to_numpy(hhat), diag)


def test_gaussian_hutchinson_is_unbiased(xp):
    """Mean of u*(Au) over 4,000 Gaussian probes: within 5 standard errors.

    For a diagonal A, u_i^2 a_i has standard deviation sqrt(2)|a_i|.
    """
    rng = np.random.default_rng(3)
    diag = np.array([1.0, -2.0, 0.5])
    n = 4000
    probes = [sc.probe_from_noise(xp.asarray(rng.normal(size=3))) for _ in range(n)]
    hhat = to_numpy(sc.hutchinson_estimate(probes, [xp.asarray(diag) * u for u in probes]))
    assert np.all(np.abs(hhat - diag) <= 5 * math.sqrt(2) * np.abs(diag) / math.sqrt(n))


def test_probe_kind_is_validated(xp):
    with pytest.raises(ValueError, match="probe"):
        sc.probe_from_noise(xp.asarray(np.zeros(3)), probe="bernoulli")


def test_rademacher_probe_is_minus_one_for_exactly_half_of_the_noise(xp):
    """u = -1 iff noise < 0.5: on an even grid of [0, 1) exactly half are -1."""
    grid = np.arange(4096) / 4096
    u = to_numpy(sc.probe_from_noise(xp.asarray(grid), probe="rademacher"))
    assert set(u.tolist()) == {-1.0, 1.0}
    np.testing.assert_array_equal(u, np.where(grid < 0.5, -1.0, 1.0))


@pytest.mark.parametrize("probe", ["rademacher", "gaussian"])
def test_hutchinson_is_unbiased_for_a_dense_hessian(xp, probe):
    """E[u * (A u)] = diag(A) needs E[u_i u_j] = 0: mean-zero, independent probes.

    A probe whose -1 had probability 0.25 would give diag(A) + 0.25 * (row
    sums off the diagonal) and fail here; a diagonal A cannot tell.
    """
    rng = np.random.default_rng(7)
    # Off-diagonal rows summing to 3: such a probe would be off by 0.75.
    hessian = np.ones((4, 4)) + np.diag([2.0, -2.0, -0.5, 1.0])
    n = 3000
    draw = rng.random if probe == "rademacher" else rng.standard_normal
    probes = [sc.probe_from_noise(xp.asarray(draw(4)), probe=probe) for _ in range(n)]
    hvps = [xp.matmul(xp.asarray(hessian), u) for u in probes]
    hhat = to_numpy(sc.hutchinson_estimate(probes, hvps))
    # per-probe variance of u_i (A u)_i is at most sum_j A_ij^2 (+ A_ii^2 for Gaussian)
    sd = np.sqrt((hessian**2).sum(1) + np.diag(hessian) ** 2)
    assert np.all(np.abs(hhat - np.diag(hessian)) <= 5 * sd / np.sqrt(n))
