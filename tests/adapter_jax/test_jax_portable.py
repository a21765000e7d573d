"""export_state / import_state: the optax state through sophia_core.portable files."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sophia_jax


def _trained(rng, tx, params, steps=3):
    state = tx.init(params)
    for _ in range(steps):
        grads = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), p.dtype), params)
        hhat = jax.tree.map(lambda p: jnp.asarray(rng.random(size=p.shape), p.dtype), params)
        updates, state = tx.update(grads, state, params, hhat=hhat)
        params = optax.apply_updates(params, updates)
    return params, state


def test_round_trip_inside_a_chain(rng, tmp_path):
    params = {"w": jnp.asarray(rng.normal(size=(3, 2)), jnp.float32),
              "b": jnp.zeros(2, jnp.bfloat16)}
    sophia = sophia_jax.sophia(1e-2, hessian_interval=2)
    tx = optax.chain(optax.clip_by_global_norm(1.0), sophia)
    params, state = _trained(rng, tx, params)
    path = tmp_path / "state.npz"
    sophia_jax.export_state(path, state, hyperparameters=sophia.hyperparameters)

    from sophia_core import portable

    loaded = portable.load_state(path)
    assert loaded.step == 3 and loaded.hyperparameters["hessian_interval"] == 2
    assert [m.shape for m in loaded.ms] == [(2,), (3, 2)]  # jax.tree.leaves order: b, w
    assert loaded.ms[0].dtype == np.float32  # bf16 parameter, float32 state

    fresh = tx.init(params)
    restored = sophia_jax.import_state(path, fresh)
    a, b = sophia_jax.sophia_state(state), sophia_jax.sophia_state(restored)
    assert int(b.count) == 3
    for x, y in zip(jax.tree.leaves((a.m, a.h)), jax.tree.leaves((b.m, b.h)), strict=True):
        assert x.dtype == y.dtype
        np.testing.assert_array_equal(x, y)


def test_import_rejects_mismatched_shapes(rng, tmp_path):
    tx = sophia_jax.sophia(1e-2)
    _, state = _trained(rng, tx, {"w": jnp.zeros(3, jnp.float32)}, steps=1)
    sophia_jax.export_state(tmp_path / "s.npz", state)
    with pytest.raises(ValueError, match="shape"):
        sophia_jax.import_state(tmp_path / "s.npz", tx.init({"w": jnp.zeros(4, jnp.float32)}))
