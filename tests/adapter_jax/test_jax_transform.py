"""sophia_jax.sophia / scale_by_sophia: the core's trajectory inside optax."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax_helpers import HYPER, given, numpy_trajectory, stream

import sophia_core
import sophia_jax

SHAPES = {"w": (4, 3), "b": (5,)}


def _tx(factory=sophia_jax.sophia, **overrides):
    hyper = {**HYPER, **overrides}
    return factory(hyper.pop("lr"), **hyper)


def _as_jax(tree):
    return jax.tree.map(jnp.asarray, tree)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("refresh_at_start", [True, False])
def test_eager_trajectory_is_the_cores_bitwise(rng, dtype, refresh_at_start):
    if dtype == np.float64 and not jax.config.jax_enable_x64:
        pytest.skip("float64 needs JAX_ENABLE_X64=1 (set by the nox jax session)")
    params = {k: rng.normal(size=s).astype(dtype) for k, s in SHAPES.items()}
    steps = stream(rng, SHAPES, dtype, 7)
    expected = numpy_trajectory(params, steps, refresh_at_start=refresh_at_start)
    tx = _tx(sophia_jax.exact_sophia, refresh_at_start=refresh_at_start)
    theta, state = _as_jax(params), tx.init(_as_jax(params))
    for t, ((grads, hhats), (p_ref, m_ref, h_ref)) in enumerate(zip(steps, expected, strict=True)):
        theta, state = tx.apply(_as_jax(grads), state, theta,
                                sophia_estimator=given(_as_jax(hhats)))
        assert int(state.count) == t + 1
        for k in SHAPES:
            assert theta[k].dtype == dtype
            np.testing.assert_array_equal(np.asarray(theta[k]), p_ref[k])
            np.testing.assert_array_equal(np.asarray(state.m[k]), m_ref[k])
            np.testing.assert_array_equal(np.asarray(state.h[k]), h_ref[k])


def test_apply_updates_gives_the_cores_parameters(rng):
    """updates = new - old, so optax.apply_updates lands on the core's values."""
    params = _as_jax({k: rng.normal(size=s).astype(np.float32) for k, s in SHAPES.items()})
    tx, exact_tx = _tx(), _tx(sophia_jax.exact_sophia)
    state = tx.init(params)
    for grads, hhats in stream(rng, SHAPES, np.float32, 5):
        estimator = given(_as_jax(hhats))
        updates, new_state = tx.update(_as_jax(grads), state, params, sophia_estimator=estimator)
        exact, exact_state = exact_tx.apply(_as_jax(grads), state, params,
                                            sophia_estimator=estimator)
        added = optax.apply_updates(params, updates)
        for k in SHAPES:
            assert updates[k].dtype == jnp.float32
            # Sterbenz: |step| << |theta| here, so the subtraction is exact.
            np.testing.assert_array_equal(np.asarray(added[k]), np.asarray(exact[k]))
        params, state = exact, new_state
        assert jax.tree.all(jax.tree.map(jnp.array_equal, new_state, exact_state))


def test_jit_matches_eager_and_does_not_retrace(rng):
    params = _as_jax({k: rng.normal(size=s).astype(np.float32) for k, s in SHAPES.items()})
    tx = optax.chain(optax.clip_by_global_norm(1.0), _tx())
    traces = []

    @jax.jit
    def train_step(params, state, grads, hhats):
        traces.append(1)
        updates, state = tx.update(grads, state, params, sophia_estimator=given(hhats))
        return optax.apply_updates(params, updates), state

    state = tx.init(params)
    eager_params, eager_state = params, state
    for grads, hhats in stream(rng, SHAPES, np.float32, 4):
        params, state = train_step(params, state, _as_jax(grads), _as_jax(hhats))
        updates, eager_state = tx.update(_as_jax(grads), eager_state, eager_params,
                                         sophia_estimator=given(_as_jax(hhats)))
        eager_params = optax.apply_updates(eager_params, updates)
    assert len(traces) == 1
    assert int(sophia_jax.sophia_state(state).count) == 4
    for k in SHAPES:  # XLA may contract multiply-adds into FMAs: a few ulps
        np.testing.assert_allclose(params[k], eager_params[k], rtol=1e-6, atol=1e-7)


def test_bf16_params_keep_dtype_with_float32_state(rng):
    params = {"w": jnp.asarray(rng.normal(size=(8, 8)), jnp.bfloat16)}
    tx = sophia_jax.sophia(1e-2)
    state = tx.init(params)
    assert state.m["w"].dtype == jnp.float32 and state.h["w"].dtype == jnp.float32
    step = jax.jit(lambda p, s, g, h: tx.update(g, s, p, sophia_estimator=given(h)))
    for _ in range(3):
        grads = {"w": jnp.asarray(rng.normal(size=(8, 8)), jnp.bfloat16)}
        updates, state = step(params, state, grads, {"w": grads["w"] ** 2})
        params = optax.apply_updates(params, updates)
    assert params["w"].dtype == jnp.bfloat16 and updates["w"].dtype == jnp.bfloat16
    assert state.m["w"].dtype == jnp.float32 and state.h["w"].dtype == jnp.float32
    assert bool(jnp.all(jnp.isfinite(params["w"].astype(jnp.float32))))


def test_sign_momentum_needs_require_refresh_false(rng):
    params = _as_jax({k: rng.normal(size=s).astype(np.float32) for k, s in SHAPES.items()})
    tx = _tx(hessian_interval=1, require_refresh=False)
    state = tx.init(params)
    key = state.key
    for grads, _ in stream(rng, SHAPES, np.float32, 3):
        _, state = tx.update(_as_jax(grads), state, params)
    assert all(bool(jnp.all(h == 0)) for h in jax.tree.leaves(state.h))
    assert np.array_equal(jax.random.key_data(state.key), jax.random.key_data(key))
    assert int(state.count) == 3 and int(state.hessian_refreshes) == 0


@pytest.mark.parametrize("refresh_at_start", [True, False])
def test_refresh_follows_the_schedule(refresh_at_start):
    params = {"w": jnp.zeros(2, jnp.float32)}
    tx = sophia_jax.sophia(1e-2, hessian_interval=3, refresh_at_start=refresh_at_start, b2=0.5)
    state = tx.init(params)
    grads = {"w": jnp.ones(2, jnp.float32)}
    refreshed = []
    for _ in range(7):
        before = np.asarray(state.h["w"]).copy()
        _, state = tx.update(grads, state, params,
                             sophia_estimator=given({"w": jnp.full(2, 1.0, jnp.float32)}))
        refreshed.append(not np.array_equal(before, np.asarray(state.h["w"])))
    expected = [sophia_core.refresh_due(t, hessian_interval=3, refresh_at_start=refresh_at_start)
                for t in range(7)]
    assert refreshed == expected


def test_refresh_is_used_by_the_same_step_or_the_next():
    """Default: fold then step. refresh_after_step: step with the old h, then fold."""
    params = {"w": jnp.zeros(1, jnp.float32)}  # updates = new - 0: exact
    grads = {"w": jnp.full(1, 1e-3, jnp.float32)}
    hhat = {"w": jnp.full(1, 1e4, jnp.float32)}
    kwargs = dict(weight_decay=0.0, b1=0.0, b2=0.0, gamma=1.0)
    before = sophia_jax.sophia(1.0, **kwargs)
    after = sophia_jax.sophia(1.0, refresh_after_step=True, **kwargs)
    u_before, s_before = before.update(grads, before.init(params), params,
                                       sophia_estimator=given(hhat))
    u_after, s_after = after.update(grads, after.init(params), params,
                                    sophia_estimator=given(hhat))
    np.testing.assert_allclose(u_before["w"], [-1e-7], rtol=1e-6)  # m / h
    np.testing.assert_allclose(u_after["w"], [-1.0])  # h was 0: a sign step
    np.testing.assert_array_equal(s_before.h["w"], s_after.h["w"])


def test_schedule_learning_rate(rng):
    params = _as_jax({"w": rng.normal(size=3).astype(np.float32)})
    schedule = optax.linear_schedule(1e-2, 1e-3, transition_steps=4)
    tx = sophia_jax.sophia(schedule, weight_decay=0.0, b1=0.0, require_refresh=False)
    state = tx.init(params)
    grads = {"w": jnp.asarray([1.0, -1.0, 0.0], jnp.float32)}
    for t in range(4):
        updates, state = tx.update(grads, state, params)  # h = 0: sign steps of size lr
        lr = np.float32(schedule(t))
        np.testing.assert_allclose(updates["w"], [-lr, lr, 0.0], rtol=1e-5, atol=1e-6)


def test_weight_decay_mask():
    params = {"w": jnp.ones(3, jnp.float32), "b": jnp.ones(3, jnp.float32)}
    grads = jax.tree.map(jnp.zeros_like, params)  # m = 0: only decay acts
    for mask in ({"w": True, "b": False}, lambda p: {"w": True, "b": False}):
        tx = sophia_jax.sophia(0.1, weight_decay=0.5, weight_decay_mask=mask,
                               require_refresh=False)
        updates, _ = tx.update(grads, tx.init(params), params)
        np.testing.assert_allclose(updates["w"], -0.05 * np.ones(3), rtol=1e-6)
        np.testing.assert_array_equal(updates["b"], np.zeros(3))


def test_inject_hyperparams_under_jit(rng):
    params = _as_jax({k: rng.normal(size=s).astype(np.float32) for k, s in SHAPES.items()})
    injected = optax.inject_hyperparams(sophia_jax.sophia)(learning_rate=1e-2, weight_decay=0.1,
                                                          hessian_interval=2)
    plain = sophia_jax.sophia(1e-2, weight_decay=0.1, hessian_interval=2)
    step = jax.jit(lambda p, s, g, h: injected.update(g, s, p, sophia_estimator=given(h)))
    s_inj, s_plain = injected.init(params), plain.init(params)
    p_inj = p_plain = params
    for grads, hhats in stream(rng, SHAPES, np.float32, 4):
        updates, s_inj = step(p_inj, s_inj, _as_jax(grads), _as_jax(hhats))
        p_inj = optax.apply_updates(p_inj, updates)
        updates, s_plain = plain.update(_as_jax(grads), s_plain, p_plain,
                                        sophia_estimator=given(_as_jax(hhats)))
        p_plain = optax.apply_updates(p_plain, updates)
    for k in SHAPES:
        np.testing.assert_allclose(p_inj[k], p_plain[k], rtol=1e-6, atol=1e-7)
    assert int(sophia_jax.sophia_state(s_inj).count) == 4
    s_inj.hyperparams["learning_rate"] = jnp.asarray(0.0, s_inj.hyperparams["learning_rate"].dtype)
    s_inj.hyperparams["weight_decay"] = jnp.asarray(0.0, s_inj.hyperparams["weight_decay"].dtype)
    updates, _ = step(p_inj, s_inj, _as_jax(grads), _as_jax(hhats))
    assert all(bool(jnp.all(u == 0)) for u in jax.tree.leaves(updates))


def test_maximize_ascends():
    params = {"w": jnp.zeros(2, jnp.float32)}
    grads = {"w": jnp.asarray([1.0, -1.0], jnp.float32)}
    tx = sophia_jax.sophia(0.1, maximize=True, weight_decay=0.0, require_refresh=False)
    updates, _ = tx.update(grads, tx.init(params), params)
    np.testing.assert_allclose(updates["w"], [0.1, -0.1], rtol=1e-6)


def test_scale_by_sophia_composes_to_sophia(rng):
    """chain(scale_by_sophia, add_decayed_weights, scale_by_learning_rate) ~ sophia."""
    params = _as_jax({k: rng.normal(size=s).astype(np.float32) for k, s in SHAPES.items()})
    hyper = dict(b1=0.9, b2=0.99, gamma=0.04, eps=1e-12, clip_threshold=1.0, hessian_interval=2)
    chained = optax.chain(sophia_jax.scale_by_sophia(**hyper), optax.add_decayed_weights(0.1),
                          optax.scale_by_learning_rate(1e-2))
    whole = sophia_jax.exact_sophia(1e-2, weight_decay=0.1, **hyper)
    s_c, s_w = chained.init(params), whole.init(params)
    p_c = p_w = params
    for grads, hhats in stream(rng, SHAPES, np.float32, 5):
        estimator = given(_as_jax(hhats))
        u, s_c = chained.update(_as_jax(grads), s_c, p_c, sophia_estimator=estimator)
        p_c = optax.apply_updates(p_c, u)
        p_w, s_w = whole.apply(_as_jax(grads), s_w, p_w, sophia_estimator=estimator)
    for k in SHAPES:
        np.testing.assert_allclose(p_c[k], p_w[k], rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(sophia_jax.sophia_state(s_c).h["w"], s_w.h["w"])


def test_sophia_state_inside_wrappers():
    params = {"w": jnp.zeros(2, jnp.float32)}
    tx = optax.chain(optax.clip_by_global_norm(1.0),
                     optax.inject_hyperparams(sophia_jax.sophia)(learning_rate=1e-3))
    found = sophia_jax.sophia_state(tx.init(params))
    assert found._fields[:3] == ("count", "m", "h")
    with pytest.raises(ValueError, match="found 0"):
        sophia_jax.sophia_state(optax.adam(1e-3).init(params))
