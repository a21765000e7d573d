"""Checks that need XLA flags set before jax starts; run by test_jax_subprocess.py.

Run as ``python tests/adapter_jax/jax_subprocess_checks.py`` with
``XLA_FLAGS="--xla_force_host_platform_device_count=4 --xla_cpu_max_isa=AVX"``
(no FMA contraction, four CPU devices). Prints one JSON object
``{check: "ok" | error message}`` on the last line.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

sys.path.insert(0, os.path.dirname(__file__))
import jax_helpers  # noqa: E402
import test_jax_optax_parity as parity  # noqa: E402

import sophia_core  # noqa: E402
import sophia_jax  # noqa: E402

CHECKS = {}


def check(fn):
    CHECKS[fn.__name__] = fn
    return fn


def _dtypes():
    return [np.float32, np.float64] if jax.config.jax_enable_x64 else [np.float32]


@check
def four_devices():
    assert jax.device_count() == 4, jax.devices()


@check
def jit_is_bitwise_with_numpy():
    """Under jax.jit (no FMA) the trajectory is the numpy core's, bit for bit.

    With bias correction the coefficient ``1 - b1**t`` is computed in double
    precision by numpy (a Python int step) and by the adapter when x64 is on
    (a float64 step): bitwise in float32. Without x64 JAX has no float64,
    and for float64 parameters XLA's ``pow`` may differ from C's in the last
    bit: there the check is to a tolerance (the ulp differences of the
    coefficient feed back through the parameters over 30 steps).
    """
    shapes = {"w": (8, 3), "b": (5,)}
    for dtype in _dtypes():
        for bias_correction in (False, True):
            exact = not bias_correction or (dtype == np.float32 and jax.config.jax_enable_x64)
            rng = np.random.default_rng(1)
            params = {k: rng.normal(size=s).astype(dtype) for k, s in shapes.items()}
            steps = jax_helpers.stream(rng, shapes, dtype, 30, hhat_scale=100.0)
            hyper = {**jax_helpers.HYPER, "bias_correction": bias_correction,
                     "hessian_interval": 2}
            expected = jax_helpers.numpy_trajectory(params, steps, **hyper)
            tx = sophia_jax.exact_sophia(hyper.pop("lr"), **hyper)
            step = jax.jit(lambda p, s, g, h, tx=tx: tx.apply(
                g, s, p, sophia_estimator=jax_helpers.given(h)))
            theta, state = jax.tree.map(jnp.asarray, params), tx.init(params)
            for (grads, hhats), (p_ref, m_ref, h_ref) in zip(steps, expected, strict=True):
                theta, state = step(theta, state, grads, hhats)
                np.testing.assert_array_equal(np.asarray(state.m["w"]), m_ref["w"])
                np.testing.assert_array_equal(np.asarray(state.h["w"]), h_ref["w"])
                for k in shapes:
                    if exact:
                        np.testing.assert_array_equal(np.asarray(theta[k]), p_ref[k])
                    else:
                        np.testing.assert_allclose(np.asarray(theta[k]), p_ref[k],
                                                   rtol=32 * np.finfo(dtype).eps)
            # Not all sign steps: bias correction and h matter.
            unclipped = sophia_core.clip_fraction(list(m_ref.values()), list(h_ref.values()),
                                                  gamma=hyper["gamma"], eps=hyper["eps"],
                                                  clip_threshold=1.0, xp=np)
            assert 0.1 < float(unclipped) < 0.9, unclipped


@check
def optax_parity():
    """Bitwise under x64 (the nox session) where the bias correction does not
    enter the step; where it does, optax divides by ``1 - b1**t`` and the
    core multiplies by its reciprocal: within an ulp or two per step. (Without
    x64 optax's float32 ``b1**t`` uses an integer exponent: also an ulp.)"""
    x64 = jax.config.jax_enable_x64

    def tolerance(exact):
        return lambda d: dict(rtol=0, atol=0) if exact else dict(rtol=4 * np.finfo(d).eps, atol=0)

    for dtype in _dtypes():
        parity._tolerance = tolerance(x64)
        parity.test_injected_hessian_stream(np.random.default_rng(2), jnp.dtype(dtype), 1.0)
        parity._tolerance = tolerance(False)
        parity.test_injected_hessian_stream(np.random.default_rng(2), jnp.dtype(dtype), 1000.0)
    parity._tolerance = tolerance(x64)
    parity.test_hutchinson_with_the_same_key(np.random.default_rng(3))


def _model(rng, dtype):
    """A two-layer softmax model; its parameters split over 4 devices on dim 0."""
    params = {"w1": rng.normal(size=(8, 16)) * 0.3, "b1": np.zeros(16),
              "w2": rng.normal(size=(16, 12)) * 0.3, "b2": np.zeros(12)}
    params = {k: jnp.asarray(v, dtype) for k, v in params.items()}
    x = jnp.asarray(rng.normal(size=(16, 8)), dtype)

    def logits_fn(p, x=x):
        return jnp.tanh(x @ p["w1"] + p["b1"]) @ p["w2"] + p["b2"]

    return params, x, logits_fn


def _spec(name):
    return P("x", None) if name in ("w1", "w2") else P("x")


@check
def sharded_equals_unsharded_and_state_follows_params():
    dtype = np.float32
    rng = np.random.default_rng(4)
    params, _, logits_fn = _model(rng, dtype)
    grads_stream = [jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), dtype), params)
                    for _ in range(3)]
    tx = sophia_jax.exact_sophia(1e-2, hessian_interval=2)
    estimator = sophia_jax.GaussNewtonBartlett(logits_fn)

    def run(params, init):
        step = jax.jit(lambda p, s, g: tx.apply(g, s, p, sophia_estimator=estimator))
        state = init(params)
        for grads in grads_stream:
            params, state = step(params, state, grads)
        return params, state

    plain_params, plain_state = run(params, tx.init)
    # The classic pattern: an Auto mesh, sharded inputs, jax.jit propagates.
    # (Under jit in Auto mode, data-independent zeros come out replicated:
    # init eagerly, or use Explicit axes; see the next check.)
    for axis_type, init in ((AxisType.Auto, tx.init),):
        mesh = jax.make_mesh((4,), ("x",), axis_types=(axis_type,))
        with jax.set_mesh(mesh):
            sharded = {k: jax.device_put(v, NamedSharding(mesh, _spec(k)))
                       for k, v in params.items()}
            state0 = init(sharded)
            new_params, state = run(sharded, init)
        for k in params:
            for tree in (state0.m, state0.h, state.m, state.h, new_params):
                assert tree[k].sharding.is_equivalent_to(sharded[k].sharding, tree[k].ndim), (
                    axis_type, k, tree[k].sharding)
            # Elementwise update: bitwise; the GNB refresh reduces across
            # shards, so h (and through it theta) agrees to rounding.
            np.testing.assert_allclose(new_params[k], plain_params[k], rtol=1e-6, atol=1e-7)
            np.testing.assert_allclose(state.h[k], plain_state.h[k], rtol=1e-5, atol=1e-10)
            np.testing.assert_array_equal(state.m[k], plain_state.m[k])


@check
def sharded_hhat_stream_is_bitwise():
    rng = np.random.default_rng(5)
    params, _, _ = _model(rng, np.float32)
    stream = [(jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), p.dtype), params),
               jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), p.dtype), params))
              for _ in range(4)]
    tx = sophia_jax.exact_sophia(1e-2, hessian_interval=2)
    step = jax.jit(lambda p, s, g, h: tx.apply(g, s, p, sophia_estimator=jax_helpers.given(h)))

    def run(params):
        state = jax.jit(tx.init)(params)
        for grads, hhat in stream:
            params, state = step(params, state, grads, hhat)
        return params, state

    plain, _ = run(params)
    mesh = jax.make_mesh((4,), ("x",), axis_types=(AxisType.Explicit,))
    with jax.set_mesh(mesh):
        inputs = {k: jax.device_put(v, NamedSharding(mesh, _spec(k))) for k, v in params.items()}
        sharded, state = run(inputs)
    for k in params:
        np.testing.assert_array_equal(np.asarray(sharded[k]), np.asarray(plain[k]))
        for tree in (sharded, state.m, state.h):
            assert tree[k].sharding.is_equivalent_to(inputs[k].sharding, tree[k].ndim)


@check
def data_parallel_gnb_averages_ghat_before_squaring():
    """shard_map over the batch with axis_name: the global GNB estimate."""
    rng = np.random.default_rng(6)
    params, x, logits_fn = _model(rng, np.float32)
    # Unequal label counts per device: the average must be weighted by N_i.
    mask = jnp.asarray(rng.random(16) < 0.6).at[:4].set(True).at[4:8].set(False)
    dp_tx = sophia_jax.sophia(1e-2, hessian_interval=1, b2=0.0, axis_name="data")
    zeros = jax.tree.map(jnp.zeros_like, params)

    mesh = jax.make_mesh((4,), ("data",), axis_types=(AxisType.Auto,))

    def local_refresh(params, x_local, mask_local):
        estimator = sophia_jax.GaussNewtonBartlett(lambda p: logits_fn(p, x_local),
                                                   label_mask=mask_local)
        _, state = dp_tx.update(zeros, dp_tx.init(params), params, sophia_estimator=estimator)
        return state.h

    dp = jax.jit(jax.shard_map(local_refresh, mesh=mesh, in_specs=(P(), P("data"), P("data")),
                               out_specs=P(), check_vma=True))
    batch = NamedSharding(mesh, P("data"))
    h_dp = dp(params, jax.device_put(x, batch), jax.device_put(mask, batch))
    # Device i draws its labels with fold_in(key, i) from its own logits;
    # redo those draws by hand, then differentiate the *global* sampled loss
    # over all devices' labels once: N * ghat^2 of that is the target.
    _, subkey = jax.random.split(jax.random.key(0))

    @jax.jit
    def target(params):
        def draw(i, xi, mi):
            z = logits_fn(params, xi)
            noise = jax.random.uniform(jax.random.fold_in(subkey, i), z.shape, z.dtype)
            return sophia_core.sample_labels(z, noise, mask=mi, xp=jnp)

        labels = jax.vmap(draw)(jnp.arange(4), x.reshape(4, 4, -1), mask.reshape(4, 4))
        y_all = labels.reshape(-1)
        g_all = jax.grad(lambda p: sophia_core.masked_mean_cross_entropy(
            logits_fn(p, x), y_all, xp=jnp))(params)
        counts = jax.vmap(lambda y: sophia_core.num_positions(y, xp=jnp))(labels)
        return g_all, counts

    g_all, counts = target(params)
    n = int(counts.sum())
    for k in params:
        np.testing.assert_allclose(h_dp[k], n * g_all[k] ** 2, rtol=2e-5, atol=1e-9)
    assert int(counts[1]) == 0 and n > 0  # unequal counts: a plain pmean would be wrong


@check
def shard_map_training_step_with_check_vma():
    """A whole data-parallel step (grads pmean'd, Sophia-G and Sophia-H refreshes)
    inside shard_map with check_vma=True: the state stays replicated."""
    rng = np.random.default_rng(7)
    params, x, logits_fn = _model(rng, np.float32)
    y = jnp.asarray(rng.integers(0, 12, size=16))
    mesh = jax.make_mesh((4,), ("data",), axis_types=(AxisType.Explicit,))
    for make in (sophia_jax.GaussNewtonBartlett, sophia_jax.Hutchinson):
        tx = sophia_jax.sophia(1e-2, hessian_interval=2, axis_name="data")

        def local_step(params, state, x_local, y_local, make=make, tx=tx):
            def local_logits(p):
                return logits_fn(p, x_local)

            def local_loss(p):
                return optax.softmax_cross_entropy_with_integer_labels(
                    local_logits(p), y_local).mean()

            grads = jax.lax.pmean(jax.grad(local_loss)(params), "data")
            estimator = make(local_logits if make is sophia_jax.GaussNewtonBartlett
                             else local_loss)
            updates, state = tx.update(grads, state, params, sophia_estimator=estimator)
            return optax.apply_updates(params, updates), state

        step = jax.jit(jax.shard_map(local_step, mesh=mesh,
                                     in_specs=(P(), P(), P("data"), P("data")),
                                     out_specs=(P(), P()), check_vma=True))
        state = tx.init(params)
        theta = params
        with jax.set_mesh(mesh):
            batch = NamedSharding(mesh, P("data"))
            xs, ys = jax.device_put(x, batch), jax.device_put(y, batch)
            for _ in range(3):
                theta, state = step(theta, state, xs, ys)
        assert int(state.hessian_refreshes) == 2, make
        assert all(bool(jnp.all(jnp.isfinite(h))) and bool(jnp.any(h != 0))
                   for h in jax.tree.leaves(state.h)), make
        if make is sophia_jax.Hutchinson:
            # Equal shards: the mean of the local HVPs is the global loss's HVP,
            # and every device draws the unsharded run's probes (same key).
            plain = sophia_jax.sophia(1e-2, hessian_interval=2)

            def global_loss(p):
                return optax.softmax_cross_entropy_with_integer_labels(
                    logits_fn(p, x), y).mean()

            @jax.jit
            def plain_step(p, s, plain=plain):
                updates, s = plain.update(jax.grad(global_loss)(p), s, p,
                                          sophia_estimator=sophia_jax.Hutchinson(global_loss))
                return optax.apply_updates(p, updates), s

            # After the first refresh (at the shared initial parameters; later
            # ones are taken at parameters that differ by rounding).
            _, plain_state = plain_step(params, plain.init(params))
            with jax.set_mesh(mesh):
                _, state = step(params, tx.init(params), xs, ys)
            for k in params:
                np.testing.assert_allclose(state.h[k], plain_state.h[k], rtol=1e-5, atol=1e-9)


def int32_counter_limit():
    """Without x64 the count is int32: the update raises before it would wrap."""
    assert not jax.config.jax_enable_x64
    params = {"w": jnp.zeros(2, jnp.float32)}
    tx = sophia_jax.sophia(1e-2, hessian_interval=2**31 - 1, require_refresh=False)
    step = jax.jit(lambda p, s: tx.update(p, s, p))
    state = tx.init(params)
    assert state.count.dtype == jnp.int32
    _, state = step(params, state._replace(count=jnp.asarray(2**31 - 2, jnp.int32)))
    assert int(state.count) == 2**31 - 1
    try:
        jax.block_until_ready(step(params, state))
    except Exception as exc:  # noqa: BLE001 - a JaxRuntimeError wrapping ours
        assert "OverflowError" in str(exc) and "jax_enable_x64" in str(exc), str(exc)[-400:]
    else:
        raise AssertionError("no error at the int32 limit")


def main():
    results = {}
    checks = {"int32_counter_limit": int32_counter_limit} if "--int32" in sys.argv else CHECKS
    for name, fn in checks.items():
        start = time.perf_counter()
        try:
            fn()
            results[name] = "ok"
            print(f"{name}: {time.perf_counter() - start:.1f}s", file=sys.stderr)
        except Exception:  # report every check, not just the first failure
            results[name] = traceback.format_exc(limit=4)[-1500:]
    print(json.dumps(results))


if __name__ == "__main__":
    main()
