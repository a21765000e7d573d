"""The Hessian fold: the non-finite policy, the count, and h's bias correction.

Expected values are written out in numpy from SPEC section 2 and the
issue's definition ``b2n = 1 - (1-b2)/(1-b2**n)``.
"""

from __future__ import annotations

import numpy as np
import pytest
from backend_support import to_numpy

import sophia_core as sc


def _fold(xp, h, hhat, **kwargs):
    fold = sc.fold_hessian(xp.asarray(h), xp.asarray(hhat), **kwargs)
    return to_numpy(fold.h), int(to_numpy(fold.rejected))


def test_non_finite_estimates_never_enter_h(xp, dtype_name):
    h = np.array([2.0, 3.0, 4.0, 5.0], dtype=dtype_name)
    hhat = np.array([np.nan, np.inf, -np.inf, 1.0], dtype=dtype_name)
    new_h, rejected = _fold(xp, h, hhat, b2=0.9)
    assert rejected == 3
    want = h.copy()
    want[3] = np.asarray(0.9 * h[3] + (1 - 0.9) * hhat[3], dtype=dtype_name)
    np.testing.assert_array_equal(new_h, want)


def test_a_poisoned_refresh_is_forgotten_by_later_finite_ones(xp):
    """The measured failure: [nan, inf, -inf, 1] once, then 50 finite refreshes."""
    rng = np.random.default_rng(0)
    h = xp.asarray(np.zeros(4))
    h = sc.fold_hessian(h, xp.asarray(np.array([np.nan, np.inf, -np.inf, 1.0])), b2=0.99).h
    reference = np.array([0.0, 0.0, 0.0, 0.01])
    for _ in range(50):
        hhat = rng.random(4)
        h = sc.fold_hessian(h, xp.asarray(hhat), b2=0.99).h
        reference = 0.99 * reference + (1 - 0.99) * hhat
    np.testing.assert_array_equal(to_numpy(h), reference)


def test_an_estimate_that_overflows_h_dtype_is_rejected(xp):
    h = xp.asarray(np.array([1.0, 1.0], dtype=np.float32))
    hhat = xp.asarray(np.array([1e300, 2.0], dtype=np.float64))  # 1e300 is inf in float32
    fold = sc.fold_hessian(h, hhat, b2=0.99)
    np.testing.assert_array_equal(to_numpy(fold.h),
                                  np.array([1.0, 0.99 + 0.01 * 2.0], dtype=np.float32))
    assert int(to_numpy(fold.rejected)) == 1
    assert to_numpy(fold.h).dtype == np.float32


def test_hessian_ema_keeps_the_policy(xp):
    h = sc.hessian_ema(xp.asarray(np.ones(2)), xp.asarray(np.array([np.nan, 3.0])), b2=0.5)
    np.testing.assert_array_equal(to_numpy(h), [1.0, 2.0])


def test_hessian_decay_follows_its_definition():
    assert sc.hessian_decay(0.99) == 0.99
    assert sc.hessian_decay(0.99, 7) == 0.99  # no bias correction: b2 itself
    assert sc.hessian_decay(0.99, 1, bias_correction=True) == 0.0
    for n in (2, 5, 100, 10_000):
        assert sc.hessian_decay(0.99, n, bias_correction=True) == 1 - (1 - 0.99) / (1 - 0.99**n)
    with pytest.raises(ValueError, match="refresh"):
        sc.hessian_decay(0.99, bias_correction=True)
    with pytest.raises(ValueError, match="refresh"):
        sc.hessian_decay(0.99, 0, bias_correction=True)


def test_first_bias_corrected_fold_sets_h_to_the_estimate(xp, dtype_name):
    hhat = np.array([0.25, 3.0, -1.0], dtype=dtype_name)
    new_h, _ = _fold(xp, np.full(3, 7.0, dtype=dtype_name), hhat, b2=0.99, refresh=1,
                     bias_correction=True)
    np.testing.assert_array_equal(new_h, hhat)


def test_bias_corrected_h_is_the_corrected_average_of_the_estimates(xp):
    """h_n = sum_i b2**(n-i) (1-b2) hhat_i / (1 - b2**n), the bias-corrected EMA."""
    rng = np.random.default_rng(1)
    b2, estimates = 0.9, rng.random((30, 5))
    h = xp.asarray(np.zeros(5))
    for n, hhat in enumerate(estimates, start=1):
        h = sc.fold_hessian(h, xp.asarray(hhat), b2=b2, refresh=n, bias_correction=True).h
        weights = (1 - b2) * b2 ** np.arange(n - 1, -1, -1)
        want = weights @ estimates[:n] / (1 - b2**n)
        np.testing.assert_allclose(to_numpy(h), want, rtol=1e-12)


def test_array_refresh_count_matches_the_python_one(xp):
    """A float64 count array gives the double-precision decay bit for bit."""
    h, hhat = xp.asarray(np.full(3, 0.5)), xp.asarray(np.array([1.0, 2.0, 3.0]))
    for n in (1, 2, 37):
        python = sc.fold_hessian(h, hhat, b2=0.99, refresh=n, bias_correction=True).h
        array = sc.fold_hessian(h, hhat, b2=0.99, refresh=xp.asarray(float(n)),
                                bias_correction=True).h
        np.testing.assert_array_equal(to_numpy(array), to_numpy(python))
