"""export_state / import_state: the optax state through sophia_core.portable files."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax_helpers import given

import sophia_jax
from sophia_core import portable

HYPER = dict(hessian_interval=2, target_unclipped_share=0.3)


def _trained(rng, tx, params, steps=3):
    state = tx.init(params)
    for _ in range(steps):
        grads = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), p.dtype), params)
        hhat = jax.tree.map(lambda p: jnp.asarray(rng.random(size=p.shape), p.dtype), params)
        updates, state = tx.update(grads, state, params, sophia_estimator=given(hhat))
        params = optax.apply_updates(params, updates)
    return params, state


def test_round_trip_inside_a_chain_by_name(rng, tmp_path):
    params = {"layer": {"w": jnp.asarray(rng.normal(size=(3, 2)), jnp.float32),
                        "b": jnp.zeros(2, jnp.bfloat16)}}
    tx = optax.chain(optax.clip_by_global_norm(1.0), sophia_jax.sophia(1e-2, **HYPER))
    params, state = _trained(rng, tx, params)
    path = tmp_path / "state.npz"
    sophia_jax.export_state(path, state, hyperparameters=HYPER)

    loaded = portable.load_state(path)
    assert loaded.step == 3 and loaded.hyperparameters["hessian_interval"] == 2
    assert loaded.names == ["layer.b", "layer.w"]  # jax.tree_util.keystr, "." separated
    assert loaded.ms[0].dtype == np.float32  # bf16 parameter, float32 state
    ours = sophia_jax.sophia_state(state)
    assert loaded.counters["hessian_refreshes"] == 2
    assert loaded.counters["gamma"] == float(ours.gamma)

    restored = sophia_jax.import_state(path, tx.init(params))
    b = sophia_jax.sophia_state(restored)
    assert int(b.count) == 3 and int(b.hessian_refreshes) == 2
    assert float(b.gamma) == float(ours.gamma)
    for x, y in zip(jax.tree.leaves((ours.m, ours.h)), jax.tree.leaves((b.m, b.h)), strict=True):
        assert x.dtype == y.dtype
        np.testing.assert_array_equal(x, y)


def test_import_matches_by_name_and_names_the_mismatch(rng, tmp_path):
    tx = sophia_jax.sophia(1e-2)
    _, state = _trained(rng, tx, {"w": jnp.zeros(3, jnp.float32)}, steps=1)
    sophia_jax.export_state(tmp_path / "s.npz", state)
    with pytest.raises(ValueError, match="shape"):
        sophia_jax.import_state(tmp_path / "s.npz", tx.init({"w": jnp.zeros(4, jnp.float32)}))
    with pytest.raises(ValueError, match="v"):
        sophia_jax.import_state(tmp_path / "s.npz", tx.init({"v": jnp.zeros(3, jnp.float32)}))


def test_masked_state_exports_its_own_leaves(rng, tmp_path):
    params = {"w": jnp.ones((2, 2), jnp.float32), "b": jnp.ones(2, jnp.float32)}
    tx = optax.masked(sophia_jax.sophia(1e-2, require_refresh=False), {"w": True, "b": False})
    state = tx.init(params)
    sophia_jax.export_state(tmp_path / "m.npz", state)

    assert portable.load_state(tmp_path / "m.npz").names == ["w"]
    sophia_jax.import_state(tmp_path / "m.npz", state)
