"""Sophia-G and Sophia-H refreshes: JAX autodiff and noise around the core's math."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sophia_core
import sophia_jax


def _linear_softmax(rng, n=6, d=4, v=5):
    x = jnp.asarray(rng.normal(size=(n, d)), jnp.float32)
    params = {"w": jnp.asarray(rng.normal(size=(d, v)) * 0.3, jnp.float32),
              "b": jnp.zeros(v, jnp.float32)}
    return x, params, lambda p: x @ p["w"] + p["b"]


def test_gnb_refresh_is_n_ghat_squared_of_sampled_labels(rng):
    x, params, logits_fn = _linear_softmax(rng)
    mask = jnp.asarray([True, True, False, True, False, True])
    tx = sophia_jax.sophia(1e-3, hessian_interval=1, b2=0.0, key=7)
    state = tx.init(params)
    estimator = sophia_jax.GaussNewtonBartlett(logits_fn, label_mask=mask)
    _, new_state = jax.jit(lambda p, s: tx.update(jax.tree.map(jnp.zeros_like, p), s, p,
                                                  sophia_estimator=estimator))(params, state)
    # The same draw by hand: the refresh splits the state's key once.
    _, subkey = jax.random.split(state.key)
    logits = logits_fn(params)
    uniform = jax.random.uniform(subkey, logits.shape, jnp.float32)
    labels = sophia_core.sample_labels(logits, uniform, mask=mask, xp=jnp)
    assert int(sophia_core.num_positions(labels, xp=jnp)) == 4
    ghat = jax.jit(jax.grad(lambda p: sophia_core.masked_mean_cross_entropy(
        logits_fn(p), labels, xp=jnp)))(params)
    for k in params:
        np.testing.assert_allclose(new_state.h[k], 4 * ghat[k] ** 2, rtol=1e-5, atol=1e-9)
    assert not np.array_equal(jax.random.key_data(new_state.key),
                              jax.random.key_data(state.key))


def test_gnb_refresh_under_jit_with_bf16_logits(rng):
    x, params, logits_fn = _linear_softmax(rng)
    params = jax.tree.map(lambda p: p.astype(jnp.bfloat16), params)
    tx = sophia_jax.sophia(1e-3, hessian_interval=2)
    estimator = sophia_jax.GaussNewtonBartlett(lambda q: x.astype(jnp.bfloat16) @ q["w"] + q["b"])
    step = jax.jit(lambda p, s: tx.update(jax.tree.map(jnp.zeros_like, p), s, p,
                                          sophia_estimator=estimator))
    state = tx.init(params)
    for _ in range(3):
        updates, state = step(params, state)
    assert state.h["w"].dtype == jnp.float32
    assert bool(jnp.all(state.h["w"] > 0)) and bool(jnp.all(jnp.isfinite(state.h["w"])))


def _quadratic(diag):
    return lambda p: 0.5 * jnp.sum(diag * p["x"] ** 2) + 0.25 * jnp.sum(p["y"] ** 4)


def test_hutchinson_rademacher_is_exact_on_a_diagonal_hessian():
    diag = jnp.asarray([1.0, -2.0, 3.0, 0.5], jnp.float64 if jax.config.jax_enable_x64
                       else jnp.float32)
    params = {"x": jnp.ones(4, diag.dtype), "y": jnp.full(2, 2.0, diag.dtype)}
    tx = sophia_jax.sophia(1e-3, hessian_interval=1, b2=0.0, probe="rademacher", n_probes=3)
    estimator = sophia_jax.Hutchinson(_quadratic(diag))
    _, state = jax.jit(lambda p, s: tx.update(p, s, p, sophia_estimator=estimator))(
        params, tx.init(params))
    np.testing.assert_allclose(state.h["x"], diag)
    np.testing.assert_allclose(state.h["y"], 3.0 * 2.0**2 * np.ones(2))


@pytest.mark.parametrize("n_probes", [1, 2])
def test_hutchinson_gaussian_is_u_squared_times_the_diagonal(n_probes):
    diag = jnp.asarray([1.0, -2.0, 3.0], jnp.float32)
    params = {"x": jnp.zeros(3, jnp.float32), "y": jnp.zeros(1, jnp.float32)}
    tx = sophia_jax.sophia(1e-3, hessian_interval=1, b2=0.0, n_probes=n_probes, key=3)
    state = tx.init(params)
    _, new_state = tx.update(params, state, params,
                             sophia_estimator=sophia_jax.Hutchinson(_quadratic(diag)))
    _, subkey = jax.random.split(state.key)
    # Probe j's key: the refresh's key for the first, then fold_in(key, j).
    keys = [subkey] + [jax.random.fold_in(subkey, j) for j in range(1, n_probes)]
    u2 = sum(jax.random.normal(optax.tree.split_key_like(k, params)["x"], (3,), jnp.float32) ** 2
             for k in keys) / n_probes
    np.testing.assert_allclose(new_state.h["x"], diag * u2, rtol=1e-6)
    assert bool(jnp.any(new_state.h["x"] < 0))  # negative curvature stays negative in h


def test_negative_hutchinson_estimate_gives_sign_steps():
    params = {"x": jnp.zeros(2, jnp.float32)}
    tx = sophia_jax.sophia(0.1, hessian_interval=1, b2=0.0, weight_decay=0.0, b1=0.0,
                           probe="rademacher")
    loss_fn = lambda p: -jnp.sum(p["x"] ** 2)  # noqa: E731
    grads = {"x": jnp.asarray([1e-9, -1e-9], jnp.float32)}
    updates, state = tx.update(grads, tx.init(params), params,
                               sophia_estimator=sophia_jax.Hutchinson(loss_fn))
    assert bool(jnp.all(state.h["x"] < 0))
    np.testing.assert_allclose(updates["x"], [-0.1, 0.1])  # bounded by lr, no reversal
