"""The update, the Hessian EMA and the refresh schedule on every namespace.

Expected values are written out with numpy in float64 (or the tested dtype),
independently of the core's code, following SPEC section 1 line by line.
"""

from __future__ import annotations

import numpy as np
import pytest

import sophia_core as sc
from backend_support import to_numpy

PARAM = np.array([[1.0, -2.0, 0.5], [3.0, 0.0, -0.25]])
GRAD = np.array([[0.1, -0.2, 0.0], [5.0, 1e-3, -0.3]])
M0 = np.array([[0.05, 0.0, -0.01], [-1.0, 2e-3, 0.0]])
H0 = np.array([[2.0, 0.0, 0.5], [-1.0, 4.0, 1e-14]])


def _expected(param, grad, m, h, *, step, lr, b1, gamma, weight_decay, eps,
              clip_threshold, bias_correction, maximize):
    """SPEC section 1, written out directly in numpy."""
    g = -grad if maximize else grad
    m = b1 * m + (1 - b1) * g
    mhat = m / (1 - b1**step) if bias_correction else m
    theta = param * (1 - lr * weight_decay)
    d = np.maximum(gamma * h, eps)
    u = np.clip(mhat / d, -clip_threshold, clip_threshold)
    return theta - lr * u, m


OPTIONS = [
    {},
    {"maximize": True},
    {"bias_correction": True, "step": 3},
    {"weight_decay": 0.0},
    {"clip_threshold": 0.3},
    {"gamma": 1.5, "eps": 1e-3},
    {"lr": 0.5, "weight_decay": 0.2, "b1": 0.5},
]


def _kwargs(**options):
    kwargs = dict(step=1, lr=0.1, b1=0.9, gamma=0.04, weight_decay=0.1, eps=1e-12,
                  clip_threshold=1.0, bias_correction=False, maximize=False)
    kwargs.update(options)
    return kwargs


@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: ",".join(o) or "defaults")
def test_single_step_matches_closed_form(xp, dtype_name, options):
    dtype = getattr(xp, dtype_name)
    kwargs = _kwargs(**options)
    arrays = [xp.asarray(a, dtype=dtype) for a in (PARAM, GRAD, M0, H0)]
    new_param, new_state = sc.sophia_update(
        arrays[0], arrays[1], sc.SophiaState(arrays[2], arrays[3]), **kwargs
    )
    np_dtype = np.dtype(dtype_name)
    want_param, want_m = _expected(*(a.astype(np_dtype) for a in (PARAM, GRAD, M0, H0)), **kwargs)
    assert new_param.dtype == dtype and new_state.m.dtype == dtype
    assert new_state.h is arrays[3], "the update must not touch h"
    tol = dict(rtol=1e-6, atol=1e-7) if dtype_name == "float32" else dict(rtol=1e-14, atol=1e-15)
    np.testing.assert_allclose(to_numpy(new_param), want_param, **tol)
    np.testing.assert_allclose(to_numpy(new_state.m), want_m, **tol)


def test_update_is_bitwise_the_numpy_sequence(xp, dtype_name):
    """Elementwise work is the same IEEE sequence on every namespace (SPEC 5)."""
    dtype = getattr(xp, dtype_name)
    kwargs = _kwargs(bias_correction=True, step=7, maximize=True)
    ref_param, ref_state = sc.sophia_update(
        PARAM.astype(dtype_name), GRAD.astype(dtype_name),
        sc.SophiaState(M0.astype(dtype_name), H0.astype(dtype_name)), **kwargs,
    )
    arrays = [xp.asarray(a, dtype=dtype) for a in (PARAM, GRAD, M0, H0)]
    param, state = sc.sophia_update(arrays[0], arrays[1], sc.SophiaState(*arrays[2:]), **kwargs)
    np.testing.assert_array_equal(to_numpy(param), ref_param)
    np.testing.assert_array_equal(to_numpy(state.m), ref_state.m)


def test_hessian_ema_after_one_and_two_refreshes_is_exact(xp, dtype_name):
    dtype = getattr(xp, dtype_name)
    b2 = 0.99
    hhat1 = np.array([1.0, 4.0, -2.0, 0.0], dtype=dtype_name)
    hhat2 = np.array([3.0, 0.5, 1.0, 1e-20], dtype=dtype_name)
    h0 = xp.zeros((4,), dtype=dtype)
    h1 = sc.hessian_ema(h0, xp.asarray(hhat1), b2=b2)
    h2 = sc.hessian_ema(h1, xp.asarray(hhat2), b2=b2)
    c = np.dtype(dtype_name).type
    want1 = c(b2) * np.zeros(4, dtype_name) + c(1 - b2) * hhat1
    want2 = c(b2) * want1 + c(1 - b2) * hhat2
    np.testing.assert_array_equal(to_numpy(h1), want1)
    np.testing.assert_array_equal(to_numpy(h2), want2)
    # and the closed form, no bias correction: h1 = (1-b2) hhat1
    np.testing.assert_allclose(to_numpy(h1), (1 - b2) * hhat1, rtol=1e-6)


@pytest.mark.parametrize("narrow", ["float16", "bfloat16"])
def test_narrow_parameters_compute_in_float32(xp, narrow):
    if not hasattr(xp, narrow):
        pytest.skip(f"{xp.__name__} has no {narrow}")
    dtype = getattr(xp, narrow)
    param = xp.asarray(PARAM, dtype=dtype)
    state = sc.init_state(param)
    assert state.m.dtype == xp.float32 and state.h.dtype == xp.float32
    grad = xp.asarray(GRAD, dtype=dtype)
    new_param, new_state = sc.sophia_update(param, grad, state, **_kwargs())
    assert new_param.dtype == dtype
    assert new_state.m.dtype == xp.float32
    want_param, want_m = _expected(
        to_numpy(xp.astype(param, xp.float32)).astype(np.float32),
        to_numpy(xp.astype(grad, xp.float32)).astype(np.float32),
        np.zeros((2, 3), np.float32), np.zeros((2, 3), np.float32), **_kwargs(),
    )
    np.testing.assert_array_equal(to_numpy(new_state.m), want_m)
    got = to_numpy(xp.astype(new_param, xp.float32))
    np.testing.assert_allclose(got, want_param, rtol=1e-2)  # one rounding to the narrow dtype


def test_zero_state_step_is_a_sign_step(xp):
    """Before the first refresh h = 0: u = c*sign(m), bounded by lr*c."""
    param = xp.asarray(PARAM)
    grad = xp.asarray(GRAD)
    new_param, _ = sc.sophia_update(param, grad, sc.init_state(param), **_kwargs(weight_decay=0.0))
    delta = to_numpy(new_param) - PARAM
    np.testing.assert_allclose(delta, -0.1 * np.sign(GRAD), rtol=1e-12)


def test_array_step_count_for_bias_correction(xp):
    param = xp.asarray(PARAM)
    kwargs = _kwargs(bias_correction=True, step=4)
    state = sc.SophiaState(xp.asarray(M0), xp.asarray(H0))
    by_int, _ = sc.sophia_update(param, xp.asarray(GRAD), state, **kwargs)
    kwargs["step"] = xp.asarray(4)
    by_array, _ = sc.sophia_update(param, xp.asarray(GRAD), state, **kwargs)
    np.testing.assert_allclose(to_numpy(by_array), to_numpy(by_int), rtol=1e-15)


@pytest.mark.parametrize(
    ("k", "at_start", "due_steps"),
    [(10, True, [0, 10, 20]), (10, False, [10, 20]), (1, True, list(range(25))),
     (1, False, list(range(1, 25))), (7, True, [0, 7, 14, 21])],
)
def test_refresh_schedule(k, at_start, due_steps):
    due = [t for t in range(25) if sc.refresh_due(t, hessian_interval=k, refresh_at_start=at_start)]
    assert due == due_steps


def test_refresh_schedule_on_arrays(xp):
    steps = xp.asarray([0, 3, 10, 20, 21])
    got = sc.refresh_due(steps, hessian_interval=10, refresh_at_start=False)
    assert to_numpy(got).tolist() == [False, False, True, True, False]


def test_clip_fraction(xp):
    m = xp.asarray([1.0, -1.0, 0.0, 1e-3])
    h = xp.asarray([0.0, 100.0, 5.0, 1.0])
    # ratios: inf (clipped), 1/(0.04*100)=0.25, 0, 1e-3/0.04=0.025 -> 3 of 4 unclipped
    frac = sc.clip_fraction([m], [h], gamma=0.04, eps=1e-12, clip_threshold=1.0)
    assert float(to_numpy(frac)) == pytest.approx(0.75)
    both = sc.clip_fraction([m, xp.asarray([5.0])], [h, xp.asarray([0.0])],
                            gamma=0.04, eps=1e-12, clip_threshold=1.0)
    assert float(to_numpy(both)) == pytest.approx(3 / 5)
