"""Property-based tests of the SPEC section 1 invariants, on every namespace.

Hypothesis draws the arrays and hyperparameters in numpy; each namespace gets
the same draw.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from backend_support import require, to_numpy
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import sophia_core as sc

DTYPES = {"float32": np.float32, "float64": np.float64}


def finite(dtype, max_value):
    # No subnormals: XLA on CPU flushes them to zero (jax turned a
    # 2.2e-311 parameter into 0 with lr = 0), which is not the optimizer's doing.
    return st.floats(min_value=-max_value, max_value=max_value, allow_nan=False,
                     allow_infinity=False, allow_subnormal=False,
                     width=np.dtype(dtype).itemsize * 8)


@st.composite
def cases(draw, dtype_name):
    dtype = DTYPES[dtype_name]
    n = draw(st.integers(1, 12))
    big = float(np.finfo(dtype).max)  # up to the largest finite value
    arrays = [draw(hnp.arrays(dtype, (n,), elements=finite(dtype, big))) for _ in range(4)]
    hp = dict(
        step=draw(st.integers(1, 10_000)),
        lr=draw(st.floats(0.0, 1.0)),
        # b1 = 0.5 exactly: XLA may rewrite 0.5*m + 0.5*g as 0.5*(m + g)
        b1=draw(st.one_of(st.just(0.5), st.floats(0.0, 0.999))),
        # gamma > 1 with bias correction overflowed gamma*h and mhat together
        gamma=draw(st.one_of(st.floats(0.0, 100.0), finite(dtype, big).map(abs))),
        weight_decay=draw(st.floats(0.0, 1.0)),
        eps=draw(st.sampled_from([1e-12, 1e-8, 1e-3])),
        clip_threshold=draw(st.floats(0.01, 10.0)),
        bias_correction=draw(st.booleans()),
        maximize=draw(st.booleans()),
    )
    return arrays, hp


def run(xp, dtype_name, arrays, hp):
    dtype = getattr(xp, dtype_name)
    param, grad, m, h = (xp.asarray(a, dtype=dtype) for a in arrays)
    new_param, new_state = sc.sophia_update(param, grad, sc.SophiaState(m, h), **hp)
    return to_numpy(new_param).astype(np.float64), to_numpy(new_state.m).astype(np.float64)


SETTINGS = settings(max_examples=60, deadline=None, derandomize=True)


@SETTINGS
@given(data=st.data())
def test_step_is_bounded_and_finite(xp, dtype_name, data):
    arrays, hp = data.draw(cases(dtype_name))
    new_param, new_m = run(xp, dtype_name, arrays, hp)
    assert np.all(np.isfinite(new_param)), "the update produced NaN/Inf from finite inputs"
    assert not np.any(np.isnan(new_m))
    param = arrays[0].astype(np.float64)
    decayed = param * (1 - hp["lr"] * hp["weight_decay"])
    bound = hp["lr"] * hp["clip_threshold"]
    # one rounding of each term of theta*(1-lr*wd) - lr*u in the tested dtype,
    # and XLA/TensorFlow flush subnormal results to zero
    info = np.finfo(DTYPES[dtype_name])
    slack = 4 * info.eps * (np.abs(decayed) + bound) + info.smallest_normal
    assert np.all(np.abs(new_param - decayed) <= bound + slack)


@SETTINGS
@given(data=st.data())
def test_nonpositive_h_gives_a_sign_step(xp, dtype_name, data):
    arrays, hp = data.draw(cases(dtype_name))
    arrays[3] = -np.abs(arrays[3])  # h <= 0: a fresh state or a negative Hutchinson EMA
    hp.update(weight_decay=0.0, lr=0.5)
    new_param, new_m = run(xp, dtype_name, arrays, hp)
    dtype = DTYPES[dtype_name]
    mhat = new_m / (1 - hp["b1"] ** hp["step"]) if hp["bias_correction"] else new_m
    big = np.abs(mhat) >= hp["eps"] * hp["clip_threshold"]  # |mhat/eps| >= c: a full sign step
    want = arrays[0].astype(np.float64) - 0.5 * hp["clip_threshold"] * np.sign(mhat)
    tol = 4 * np.finfo(dtype).eps * (np.abs(want) + 1)
    assert np.all(np.abs(new_param - want)[big] <= tol[big])
    # never uphill: the step has the sign of -mhat
    step = new_param - arrays[0].astype(np.float64)
    assert np.all(step * np.sign(mhat) <= tol)


@SETTINGS
@given(data=st.data())
def test_zero_momentum_gives_no_step(xp, dtype_name, data):
    arrays, hp = data.draw(cases(dtype_name))
    arrays[1] = np.zeros_like(arrays[1])  # g = 0
    arrays[2] = np.zeros_like(arrays[2])  # m = 0, so the new m is exactly 0
    new_param, new_m = run(xp, dtype_name, arrays, hp)
    assert np.all(new_m == 0)
    dtype = DTYPES[dtype_name]
    decayed = (arrays[0] * dtype(1 - hp["lr"] * hp["weight_decay"])).astype(np.float64)
    # Only weight decay acts: exactly, except that XLA (jax) flushes subnormal
    # results to zero, so agreement is to the smallest normal number.
    tiny = float(np.finfo(dtype).smallest_normal)
    np.testing.assert_allclose(new_param, decayed, rtol=0, atol=tiny)


@pytest.mark.parametrize("narrow", ["float16", "bfloat16"])
@SETTINGS
@given(data=st.data())
def test_narrow_dtypes_stay_finite(xp, narrow, data):
    if not hasattr(xp, narrow):
        pytest.skip(f"{xp.__name__} has no {narrow}")
    arrays, hp = data.draw(cases("float32"))
    dtype = getattr(xp, narrow)
    limit = 60000.0 if narrow == "float16" else 1e30  # stay representable
    param, grad = (xp.asarray(np.clip(a, -limit, limit), dtype=dtype) for a in arrays[:2])
    state = sc.SophiaState(*(xp.asarray(a) for a in arrays[2:]))
    new_param, new_state = sc.sophia_update(param, grad, state, **hp)
    assert new_param.dtype == dtype
    assert np.all(np.isfinite(to_numpy(xp.astype(new_param, xp.float32))))


EXTREMES = {"float32": float(np.finfo(np.float32).max), "float64": float(np.finfo(np.float64).max)}


def extreme_grid(dtype_name):
    """Every combination of the largest finite values that made NaN before."""
    big = EXTREMES[dtype_name]
    values = np.array([big, -big, 1.0, 0.0], dtype=dtype_name)
    m, h, g = (a.ravel() for a in np.meshgrid(values, np.abs(values), values))
    param = np.full_like(m, 1.0)
    for bias_correction, gamma, b1 in itertools.product(
            (False, True), (0.04, 2.0, 1e30, big), (0.5, 0.9, 0.999)):
        hp = dict(step=1, lr=1e-3, b1=b1, gamma=gamma, weight_decay=0.1, eps=1e-12,
                  clip_threshold=1.0, bias_correction=bias_correction, maximize=False)
        yield [param, g, m, h], hp


def test_largest_finite_values_give_a_bounded_step(xp, dtype_name):
    """No NaN from finite inputs: overflow of mhat or gamma*h still gives |step| <= lr*c."""
    for arrays, hp in extreme_grid(dtype_name):
        new_param, new_m = run(xp, dtype_name, arrays, hp)
        assert np.all(np.isfinite(new_param)), hp
        assert not np.any(np.isnan(new_m)), hp
        decayed = arrays[0].astype(np.float64) * (1 - hp["lr"] * hp["weight_decay"])
        slack = 4 * np.finfo(dtype_name).eps * (np.abs(decayed) + hp["lr"])
        assert np.all(np.abs(new_param - decayed) <= hp["lr"] + slack), hp


def test_jitted_update_of_the_largest_values_stays_finite():
    """Under jax.jit XLA rewrites 0.5*m + 0.5*g as 0.5*(m + g), which overflows."""
    jax = require("jax")
    import jax.numpy as jnp

    for dtype_name in ("float32", "float64"):
        if dtype_name == "float64" and not jax.config.jax_enable_x64:
            continue
        for arrays, hp in extreme_grid(dtype_name):
            def update(param, grad, m, h, hp=hp):
                return sc.sophia_update(param, grad, sc.SophiaState(m, h), xp=jnp, **hp)

            new_param, state = jax.jit(update)(*(jnp.asarray(a) for a in arrays))
            assert np.all(np.isfinite(np.asarray(new_param))), (dtype_name, hp)
            assert not np.any(np.isnan(np.asarray(state.m))), (dtype_name, hp)
