"""The estimator API's traps, the optax compositions and conventions, and the
state the core v2 features keep (issue 13). Each trap test reproduces a
silent failure of sophia_jax 0.1 that now raises or works."""

from __future__ import annotations

import inspect
import typing
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax_helpers import given

import sophia_core
import sophia_jax


def _problem(rng, n=16, d=4, v=3):
    x = jnp.asarray(rng.normal(size=(n, d)), jnp.float32)
    y = jnp.asarray(rng.integers(0, v, size=n))
    params = {"w": jnp.asarray(rng.normal(size=(d, v)) * 0.3, jnp.float32),
              "b": jnp.zeros(v, jnp.float32)}

    def logits_fn(p, xb=x):
        return xb @ p["w"] + p["b"]

    def loss_fn(p):
        return optax.softmax_cross_entropy_with_integer_labels(logits_fn(p), y).mean()

    return params, x, logits_fn, loss_fn


def _counted(fn):
    """``fn`` that records on the host each time it is *executed* (not traced)."""
    calls = []

    def wrapped(*args):
        jax.debug.callback(lambda: calls.append(1))
        return fn(*args)

    return wrapped, calls


def _executed(calls):
    jax.effects_barrier()
    return len(calls)


# -- the traps ---------------------------------------------------------------------


def test_update_without_an_estimator_raises_at_trace_time(rng):
    params, _, _, loss_fn = _problem(rng)
    tx = sophia_jax.sophia(1e-2)
    step = jax.jit(lambda p, s: tx.update(jax.grad(loss_fn)(p), s, p))
    with pytest.raises(TypeError, match="sophia_estimator"):
        step(params, tx.init(params))
    # The 0.1 keyword names are named in the message, not silently ignored.
    with pytest.raises(TypeError, match="logits_fn= of sophia_jax 0.1"):
        tx.update(params, tx.init(params), params, logits_fn=lambda p: p["w"])
    # Plain sign momentum is an explicit choice.
    plain = sophia_jax.sophia(1e-2, require_refresh=False)
    _, state = jax.jit(lambda p, s: plain.update(jax.grad(loss_fn)(p), s, p))(
        params, plain.init(params))
    assert int(state.hessian_refreshes) == 0


def test_authors_cadence_port(rng):
    """The authors' loop refreshes where ``i % k == k - 1``; a port that passes
    the estimator only there got zero refreshes from 0.1, silently."""
    params, _, logits_fn, loss_fn = _problem(rng)
    k = 4
    estimator = sophia_jax.GaussNewtonBartlett(logits_fn)

    def run(tx, steps=12):
        plain = jax.jit(lambda p, s: tx.update(jax.grad(loss_fn)(p), s, p))
        refreshing = jax.jit(lambda p, s: tx.update(jax.grad(loss_fn)(p), s, p,
                                                    sophia_estimator=estimator))
        p, s = params, tx.init(params)
        for i in range(steps):
            u, s = (refreshing if i % k == k - 1 else plain)(p, s)
            p = optax.apply_updates(p, u)
        return s

    with pytest.raises(TypeError, match="refresh_when='given'"):
        run(sophia_jax.sophia(1e-2, hessian_interval=k))
    state = run(sophia_jax.sophia(1e-2, hessian_interval=k, refresh_when="given"))
    assert int(state.hessian_refreshes) == 3  # after steps 4, 8 and 12's predecessors
    assert all(bool(jnp.all(h > 0)) for h in jax.tree.leaves(state.h))


def test_given_mode_that_never_gets_an_estimate_warns_once(rng):
    params, _, _, loss_fn = _problem(rng)
    tx = sophia_jax.sophia(1e-2, hessian_interval=3, refresh_when="given")
    step = jax.jit(lambda p, s: tx.update(jax.grad(loss_fn)(p), s, p))
    state = tx.init(params)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(10):
            _, state = step(params, state)
        jax.effects_barrier()
    messages = [str(w.message) for w in caught if "without any Hessian estimate" in str(w.message)]
    assert len(messages) == 1, messages
    assert "Sophia has taken 4 steps" in messages[0]  # first due at 0, k = 3: > 3 steps
    quiet = sophia_jax.sophia(1e-2, hessian_interval=3, refresh_when="given",
                              require_refresh=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        state = quiet.init(params)
        for _ in range(6):
            _, state = quiet.update(params, state, params)
        jax.effects_barrier()


def test_host_warnings_under_vmap_fire_only_where_due(rng):
    """vmap turns the warning's cond into a select that runs both branches:
    the host re-checks the condition, so nothing fires early, and once only."""
    tx = sophia_jax.sophia(1e-2, hessian_interval=3, refresh_when="given")
    states = jax.vmap(tx.init)({"w": jnp.zeros((2, 3), jnp.float32)})
    step = jax.jit(jax.vmap(lambda s, p: tx.update(p, s, p)[1]))
    batch = {"w": jnp.zeros((2, 3), jnp.float32)}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for t in range(6):
            states = step(states, batch)
            jax.effects_barrier()
            fired = [w for w in caught if "without any Hessian estimate" in str(w.message)]
            assert len(fired) == (0 if t < 3 else 1), (t, fired)


def test_estimator_that_ignores_its_params_argument_raises(rng):
    params, x, logits_fn, loss_fn = _problem(rng)
    tx = sophia_jax.sophia(1e-2, hessian_interval=1)
    state = tx.init(params)
    closing = sophia_jax.GaussNewtonBartlett(lambda p: logits_fn(params))  # the trap
    with pytest.raises(ValueError, match="does not use its params argument"):
        jax.jit(lambda p, s: tx.update(p, s, p, sophia_estimator=closing))(params, state)
    with pytest.raises(ValueError, match="loss_fn does not use"):
        tx.update(params, state, params,
                  sophia_estimator=sophia_jax.Hutchinson(lambda p: loss_fn(params)))


def test_flax_nnx_closure_trap_raises_and_the_merge_works(rng):
    from flax import nnx

    x = jnp.asarray(rng.normal(size=(8, 2)), jnp.float32)
    model = nnx.Linear(2, 3, rngs=nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, sophia_jax.sophia(1e-2, hessian_interval=1), wrt=nnx.Param)
    graphdef, _, rest = nnx.split(model, nnx.Param, ...)

    @nnx.jit(static_argnames="closure")
    def step(model, optimizer, closure):
        grads = nnx.grad(lambda m: jnp.mean(m(x) ** 2))(model)
        logits_fn = (lambda p: model(x)) if closure else (
            lambda p: nnx.merge(graphdef, p, rest)(x))
        optimizer.update(model, grads,
                         sophia_estimator=sophia_jax.GaussNewtonBartlett(logits_fn))

    with pytest.raises(ValueError, match="nnx.merge"):
        step(model, optimizer, True)
    step(model, optimizer, False)
    state = sophia_jax.sophia_state(nnx.as_pure(optimizer.opt_state))
    assert int(state.hessian_refreshes) == 1
    assert all(bool(jnp.any(h != 0)) for h in jax.tree.leaves(state.h))


@pytest.mark.parametrize("estimator", ["hhat", "gnb"])
def test_estimate_is_computed_only_on_refresh_steps(rng, estimator):
    """0.1 took a ready ``hhat=`` computed by the caller on every step (20 of
    20); the estimator now runs inside the refresh branch only (4 of 20)."""
    params, x, logits_fn, loss_fn = _problem(rng)
    if estimator == "hhat":
        fn, calls = _counted(lambda p, key: jax.tree.map(jnp.square, jax.grad(loss_fn)(p)))
        make = lambda: sophia_jax.HessianDiagonalFn(fn)  # noqa: E731
    else:
        fn, calls = _counted(logits_fn)
        make = lambda: sophia_jax.GaussNewtonBartlett(fn)  # noqa: E731
    tx = sophia_jax.sophia(1e-2, hessian_interval=5)

    @jax.jit
    def step(p, s):
        u, s = tx.update(jax.grad(loss_fn)(p), s, p, sophia_estimator=make())
        return optax.apply_updates(p, u), s

    p, s = params, tx.init(params)
    for _ in range(20):
        p, s = step(p, s)
    assert _executed(calls) == 4 == int(s.hessian_refreshes)


def test_conditional_fold_in_a_hand_written_scan(rng):
    """HessianDiagonalFn(where=...) in refresh_when='given' mode: the loop's cadence,
    the function run only where it holds."""
    params, _, _, loss_fn = _problem(rng)
    fn, calls = _counted(lambda p, key: jax.tree.map(jnp.square, jax.grad(loss_fn)(p)))
    tx = sophia_jax.sophia(1e-2, refresh_when="given")

    def body(carry, i):
        p, s = carry
        estimator = sophia_jax.HessianDiagonalFn(fn, where=i % 4 == 3)
        u, s = tx.update(jax.grad(loss_fn)(p), s, p, sophia_estimator=estimator)
        return (optax.apply_updates(p, u), s), s.hessian_refreshes

    (_, state), refreshes = jax.jit(lambda p, s: jax.lax.scan(body, (p, s), jnp.arange(12)))(
        params, tx.init(params))
    assert refreshes.tolist() == [0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3]
    assert _executed(calls) == 3


# -- optax compositions ------------------------------------------------------------------


def test_a_neighbour_in_the_chain_keeps_its_generic_argument_names(rng):
    """0.1 read hhat=/loss_fn=, names another transformation may take too; Sophia
    now reads only sophia_estimator=."""
    params, _, logits_fn, loss_fn = _problem(rng)
    seen = []

    def neighbour_update(updates, state, params=None, *, loss_fn=None, **extra):
        seen.append(loss_fn is not None)
        return updates, state

    neighbour = optax.GradientTransformationExtraArgs(lambda p: optax.EmptyState(),
                                                      neighbour_update)
    tx = optax.chain(neighbour, sophia_jax.sophia(1e-2, hessian_interval=1))
    _, state = tx.update(params, tx.init(params), params, loss_fn=loss_fn,
                         hhat=jax.tree.map(jnp.ones_like, params),
                         sophia_estimator=sophia_jax.GaussNewtonBartlett(logits_fn))
    sophia = sophia_jax.sophia_state(state)
    assert seen == [True] and int(sophia.hessian_refreshes) == 1
    assert not np.allclose(sophia.h["w"], 0.01)  # the GNB estimate, not the stray hhat=


def test_masked_refresh_needs_the_whole_parameters_and_matches_unmasked(rng):
    params, _, logits_fn, loss_fn = _problem(rng)
    mask = {"w": True, "b": False}
    inner = dict(learning_rate=1e-2, hessian_interval=1, b2=0.0)
    masked = optax.masked(sophia_jax.sophia(**inner), mask)
    whole = sophia_jax.sophia(**inner)
    grads = jax.grad(loss_fn)(params)

    # 0.1: TypeError: unsupported operand type(s) for +: 'LinearizeTracer' and 'MaskedNode'.
    with pytest.raises(ValueError, match=r"params=params"):
        masked.update(grads, masked.init(params), params,
                      sophia_estimator=sophia_jax.GaussNewtonBartlett(logits_fn))

    @jax.jit
    def step(p, s, ws):
        estimator = sophia_jax.GaussNewtonBartlett(logits_fn, params=p)
        u, s = masked.update(grads, s, p, sophia_estimator=estimator)
        _, ws = whole.update(grads, ws, p, sophia_estimator=estimator)
        return u, s, ws

    updates, state, whole_state = step(params, masked.init(params), whole.init(params))
    inner_state = sophia_jax.sophia_state(state)
    assert isinstance(inner_state.h["b"], optax.MaskedNode)
    np.testing.assert_allclose(inner_state.h["w"], whole_state.h["w"], rtol=1e-6)
    np.testing.assert_array_equal(updates["b"], grads["b"])  # untouched by the mask


def test_multi_transform_refreshes_each_group(rng):
    params, _, logits_fn, loss_fn = _problem(rng)
    tx = optax.multi_transform(
        {"matrix": sophia_jax.sophia(1e-2, gamma=0.05, hessian_interval=1),
         "vector": sophia_jax.sophia(1e-3, gamma=0.01, hessian_interval=1)},
        {"w": "matrix", "b": "vector"})

    @jax.jit
    def step(p, s):
        estimator = sophia_jax.GaussNewtonBartlett(logits_fn, params=p)
        u, s = tx.update(jax.grad(loss_fn)(p), s, p, sophia_estimator=estimator)
        return optax.apply_updates(p, u), s

    p, s = step(params, tx.init(params))
    states = [s.inner_states[name].inner_state for name in ("matrix", "vector")]
    assert bool(jnp.all(states[0].h["w"] > 0)) and bool(jnp.all(states[1].h["b"] > 0))
    assert [int(st.hessian_refreshes) for st in states] == [1, 1]


def test_multi_steps_pays_the_refresh_once_per_window(rng):
    params, _, logits_fn, loss_fn = _problem(rng)
    every = 4
    counted, calls = _counted(logits_fn)
    tx = optax.MultiSteps(sophia_jax.sophia(1e-2, hessian_interval=1), every_k_schedule=every)

    @jax.jit
    def step(p, s):
        last_mini_step = s.mini_step == every - 1
        estimator = sophia_jax.GaussNewtonBartlett(counted, where=last_mini_step)
        u, s = tx.update(jax.grad(loss_fn)(p), s, p, sophia_estimator=estimator)
        return optax.apply_updates(p, u), s

    p, s = params, tx.init(params)
    for _ in range(3 * every):
        p, s = step(p, s)
    inner = sophia_jax.sophia_state(s)
    assert int(inner.count) == 3 and int(inner.hessian_refreshes) == 3
    assert _executed(calls) == 3  # not 3 * every


def test_apply_if_finite_and_a_non_finite_estimate(rng):
    """A NaN/Inf estimate no longer poisons h; a NaN gradient is still skipped."""
    params = {"w": jnp.ones(3, jnp.float32)}
    tx = optax.apply_if_finite(sophia_jax.sophia(1e-2, hessian_interval=1, b2=0.5),
                               max_consecutive_errors=3)
    step = jax.jit(lambda p, s, g, h: tx.update(g, s, p, sophia_estimator=given(h)))
    grads = {"w": jnp.asarray([0.5, -0.5, 1.0], jnp.float32)}
    _, state = step(params, tx.init(params), grads, {"w": jnp.ones(3, jnp.float32)})
    inner = sophia_jax.sophia_state(state)
    np.testing.assert_array_equal(inner.h["w"], [0.5, 0.5, 0.5])
    bad = {"w": jnp.asarray([np.nan, np.inf, 3.0], jnp.float32)}
    updates, state = step(params, state, grads, bad)
    inner = sophia_jax.sophia_state(state)
    np.testing.assert_array_equal(inner.h["w"], [0.5, 0.5, 1.75])
    assert int(inner.rejected_hessian_coordinates) == 2 and int(inner.hessian_refreshes) == 2
    assert bool(jnp.all(jnp.isfinite(updates["w"]))) and int(state.notfinite_count) == 0
    _, state = step(params, state, {"w": jnp.asarray([np.nan, 0.0, 0.0], jnp.float32)},
                    {"w": jnp.ones(3, jnp.float32)})
    assert int(state.notfinite_count) == 1
    assert int(sophia_jax.sophia_state(state).hessian_refreshes) == 2  # the step was skipped


def test_inject_hyperparams_without_static_args(rng):
    """n_probes and hessian_interval injected (traced): the same estimate."""
    params, _, _, loss_fn = _problem(rng)
    estimator = sophia_jax.Hutchinson(loss_fn)
    kwargs = dict(learning_rate=1e-2, n_probes=3, probe="rademacher", hessian_interval=2)
    injected = optax.inject_hyperparams(sophia_jax.sophia)(**kwargs)
    plain = sophia_jax.sophia(**kwargs)
    run = jax.jit(lambda tx_update, p, s: tx_update(jax.grad(loss_fn)(p), s, p,
                                                    sophia_estimator=estimator),
                  static_argnums=0)
    s_inj, s_plain = injected.init(params), plain.init(params)
    for _ in range(3):
        _, s_inj = run(injected.update, params, s_inj)
        _, s_plain = run(plain.update, params, s_plain)
    inner = sophia_jax.sophia_state(s_inj)
    assert int(inner.hessian_refreshes) == int(s_plain.hessian_refreshes) == 2
    for k in params:
        np.testing.assert_allclose(inner.h[k], s_plain.h[k], rtol=1e-5)
        assert bool(jnp.all(inner.h[k] != 0))


# -- conventions -----------------------------------------------------------------------


def test_keyword_only_after_learning_rate():
    with pytest.raises(TypeError, match="positional"):
        sophia_jax.sophia(1e-3, 0.965, 0.99, 1e-8)  # optax's order once set gamma=1e-8
    with pytest.raises(TypeError, match="positional"):
        sophia_jax.scale_by_sophia(0.965)
    for factory in (sophia_jax.sophia, sophia_jax.exact_sophia, sophia_jax.scale_by_sophia):
        parameters = list(inspect.signature(factory).parameters.values())
        positional = [p.name for p in parameters if p.kind != p.KEYWORD_ONLY]
        assert positional == (["learning_rate"] if factory is not sophia_jax.scale_by_sophia
                              else [])


def test_type_hints_are_real():
    hints = typing.get_type_hints(sophia_jax.sophia)
    assert hints["learning_rate"] == optax.ScalarOrSchedule
    assert hints["b1"] is float and hints["hessian_interval"] is int
    assert hints["maximize"] is bool
    assert hints["return"] is optax.GradientTransformationExtraArgs
    numeric = [n for n, v in sophia_core.DEFAULTS.items() if n in hints and n != "lr"]
    assert all(hints[n] is not typing.Any for n in numeric), numeric


def test_a_plain_transformation_with_nothing_hung_on_it():
    tx = sophia_jax.sophia(1e-3)
    assert type(tx) is optax.GradientTransformationExtraArgs
    assert not [name for name in vars(tx.update) if not name.startswith("__")]
    exact = sophia_jax.exact_sophia(1e-3)
    assert isinstance(exact, sophia_jax.ExactSophia)


def test_state_can_be_donated(rng):
    """Every leaf of a fresh state is a buffer of its own (donation refuses twins)."""
    params, _, logits_fn, loss_fn = _problem(rng)
    tx = sophia_jax.sophia(1e-2, hessian_interval=2)

    def step(p, s):
        u, s = tx.update(jax.grad(loss_fn)(p), s, p,
                         sophia_estimator=sophia_jax.GaussNewtonBartlett(logits_fn))
        return optax.apply_updates(p, u), s

    step = jax.jit(step, donate_argnums=(0, 1))
    p, s = jax.tree.map(jnp.copy, params), tx.init(params)
    for _ in range(3):
        p, s = step(p, s)
    assert int(s.count) == 3 and int(s.hessian_refreshes) == 2


@pytest.mark.parametrize("kind", ["seed", "typed", "raw"])
def test_keys_keep_their_kind(rng, kind):
    params, _, logits_fn, _ = _problem(rng)
    key = {"seed": 3, "typed": jax.random.key(3), "raw": jax.random.PRNGKey(3)}[kind]
    tx = sophia_jax.sophia(1e-2, key=key, hessian_interval=1)
    state = tx.init(params)
    _, new = jax.jit(lambda p, s: tx.update(p, s, p, sophia_estimator=sophia_jax.
                                            GaussNewtonBartlett(logits_fn)))(params, state)
    for k in (state.key, new.key):
        typed = jax.dtypes.issubdtype(k.dtype, jax.dtypes.prng_key)
        assert typed == (kind != "raw")
    data = [jax.random.key_data(k) if kind != "raw" else k for k in (state.key, new.key)]
    np.testing.assert_array_equal(data[0], jax.random.PRNGKey(3))
    assert not np.array_equal(data[0], data[1])  # split by the refresh


_REALS = ("b1", "b2", "gamma", "eps", "clip_threshold")


_INVALID = [
    *[(n, v, TypeError) for n in _REALS for v in (None, "0.05", True, 1j, [0.1])],
    *[(n, None, TypeError) for n in ("refresh_at_start", "bias_correction", "maximize",
                                     "hessian_bias_correction", "require_refresh",
                                     "warn_sign_momentum", "refresh_after_step")],
    ("maximize", 1, TypeError), ("n_probes", None, TypeError), ("n_probes", 0, ValueError),
    ("hessian_interval", 2**31, ValueError), ("hessian_interval", 2.0, TypeError),
    ("probe", "uniform", ValueError), ("probe", None, TypeError),
    ("target_unclipped_share", 1.0, ValueError), ("target_unclipped_share", "0.2", TypeError),
    ("b1", 1.0, ValueError), ("gamma", -1.0, ValueError), ("eps", 0.0, ValueError),
    ("refresh_when", "always", ValueError), ("key", "0", TypeError),
    ("state_dtype", jnp.int32, TypeError),
]
#: Only sophia() and exact_sophia() take a learning rate and weight decay.
_INVALID_WITH_LR = [
    ("weight_decay", None, TypeError), ("weight_decay", -0.1, ValueError),
    ("learning_rate", "1e-3", TypeError), ("learning_rate", -1e-3, ValueError),
    ("learning_rate", float("nan"), ValueError),
]


@pytest.mark.parametrize(
    ("factory", "name", "value", "error"),
    [(f, *case) for f in ("sophia", "exact_sophia", "scale_by_sophia") for case in _INVALID]
    + [(f, *case) for f in ("sophia", "exact_sophia") for case in _INVALID_WITH_LR],
)
def test_every_argument_is_validated_at_construction(factory, name, value, error):
    make = getattr(sophia_jax, factory)
    with pytest.raises(error, match=name.replace("learning_rate", "lr")):
        make(**{name: value})


@pytest.mark.parametrize("factory", ["sophia", "scale_by_sophia", "optax_contrib_sophia"])
def test_eps_must_be_representable_at_init(factory):
    kwargs = {"learning_rate": 1e-3} if factory != "scale_by_sophia" else {}
    tx = getattr(sophia_jax, factory)(eps=1e-45, **kwargs)
    with pytest.raises(ValueError, match="eps"):
        tx.init({"w": jnp.zeros(2, jnp.float32)})


@pytest.mark.parametrize("lr", [-1e-3, float("nan"), "1e-3"])
def test_optax_contrib_sophia_validates_lr(lr):
    with pytest.raises((ValueError, TypeError), match="lr"):
        sophia_jax.optax_contrib_sophia(lr)


def test_estimator_arguments_are_validated():
    with pytest.raises(TypeError, match="callable"):
        sophia_jax.GaussNewtonBartlett(None)
    with pytest.raises(ValueError, match="hessian_batch_fraction"):
        sophia_jax.GaussNewtonBartlett(lambda p, x: x, inputs=jnp.ones((4, 2)), batch_fraction=0.0)
    with pytest.raises(ValueError, match="inputs"):
        sophia_jax.Hutchinson(lambda p: 0.0, batch_fraction=0.5)
    params = {"w": jnp.zeros(2, jnp.float32)}
    tx = sophia_jax.sophia(1e-3)
    with pytest.raises(TypeError, match="GaussNewtonBartlett"):
        tx.update(params, tx.init(params), params, sophia_estimator=lambda p: p)
    with pytest.raises(ValueError, match="params"):
        sophia_jax.scale_by_sophia().update(params, tx.init(params), None,
                                            sophia_estimator=given(params))


def test_batch_fraction_uses_the_leading_rows(rng):
    params, x, logits_fn, _ = _problem(rng)
    seen = []

    def recording(p, xb):
        seen.append(xb.shape)
        return logits_fn(p, xb)

    tx = sophia_jax.sophia(1e-2, hessian_interval=1)
    estimator = sophia_jax.GaussNewtonBartlett(recording, inputs=x)
    tx.update(params, tx.init(params), params, sophia_estimator=estimator)
    rows = sophia_core.estimate_rows(x.shape[0], sophia_core.DEFAULTS["hessian_batch_fraction"])
    assert rows == 4 and set(seen) == {(rows, x.shape[1])}


# -- counters ----------------------------------------------------------------------------


def test_largest_hessian_interval_does_not_overflow(rng):
    params, _, logits_fn, loss_fn = _problem(rng)
    tx = sophia_jax.sophia(1e-2, hessian_interval=2**31 - 1)
    step = jax.jit(lambda p, s: tx.update(jax.grad(loss_fn)(p), s, p,
                                          sophia_estimator=sophia_jax.GaussNewtonBartlett(
                                              logits_fn)))
    state = tx.init(params)
    for _ in range(3):
        _, state = step(params, state)
    assert int(state.count) == 3 and int(state.hessian_refreshes) == 1


@pytest.mark.skipif(not jax.config.jax_enable_x64, reason="int64 counters need x64 "
                    "(without it the int32 limit is an error: jax_subprocess_checks)")
def test_counters_are_exact_past_2_to_the_31(rng):
    params, _, logits_fn, loss_fn = _problem(rng)
    k = 10
    tx = sophia_jax.sophia(1e-2, hessian_interval=k)
    step = jax.jit(lambda p, s: tx.update(jax.grad(loss_fn)(p), s, p,
                                          sophia_estimator=sophia_jax.GaussNewtonBartlett(
                                              logits_fn)))
    start = 3 * 2**31 + 7  # due after 3 more steps
    state = tx.init(params)
    assert state.count.dtype == jnp.int64
    state = state._replace(count=jnp.asarray(start, jnp.int64),
                           hessian_refreshes=jnp.asarray(2**32, jnp.int64))
    refreshed = []
    for _ in range(12):
        before = int(state.hessian_refreshes)
        _, state = step(params, state)
        refreshed.append(int(state.hessian_refreshes) - before)
    assert int(state.count) == start + 12
    assert refreshed == [int((start + i) % k == 0) for i in range(12)]


# -- the core v2 state ---------------------------------------------------------------------


def test_hessian_bias_correction_first_fold_is_the_estimate():
    params = {"w": jnp.zeros(3, jnp.float32)}
    tx = sophia_jax.sophia(1e-2, hessian_interval=1, b2=0.99, hessian_bias_correction=True,
                           require_refresh=False)
    state = tx.init(params)
    hhats = [np.asarray([1.0, 2.0, 4.0], np.float32), np.asarray([3.0, 0.5, 1.0], np.float32)]
    h = np.zeros(3, np.float32)
    for n, hhat in enumerate(hhats, start=1):
        _, state = tx.update(params, state, params, sophia_estimator=given({"w": jnp.asarray(
            hhat)}))
        h = sophia_core.fold_hessian(h, hhat, b2=0.99, refresh=n, bias_correction=True).h
        np.testing.assert_allclose(state.h["w"], h, rtol=1e-6)
    np.testing.assert_allclose(sophia_core.fold_hessian(np.zeros(3, np.float32), hhats[0],
                                                        b2=0.99, refresh=1,
                                                        bias_correction=True).h, hhats[0])


def test_target_unclipped_share_sets_gamma_at_each_refresh(rng):
    params = {"w": jnp.asarray(rng.normal(size=(64,)), jnp.float32)}
    tx = sophia_jax.exact_sophia(1e-2, hessian_interval=2, target_unclipped_share=0.3,
                                 weight_decay=0.0)
    state = tx.init(params)
    assert float(state.gamma) == pytest.approx(sophia_core.DEFAULTS["gamma"])
    for t in range(4):
        grads = {"w": jnp.asarray(rng.normal(size=64), jnp.float32)}
        hhat = {"w": jnp.asarray(rng.random(64) * 10, jnp.float32)}
        before = state
        params, state = tx.apply(grads, state, params, sophia_estimator=given(hhat))
        if t % 2 == 0:
            expected = sophia_core.gamma_for_unclipped_share(
                [np.asarray(before.m["w"])], [np.asarray(state.h["w"])], target=0.3,
                gamma=np.asarray(before.gamma), clip_threshold=1.0,
                b1=sophia_core.DEFAULTS["b1"], step=max(t, 1), xp=np)
            np.testing.assert_array_equal(np.asarray(state.gamma), expected)
        else:
            np.testing.assert_array_equal(state.gamma, before.gamma)
    share = sophia_core.unclipped_share(
        [np.asarray(before.m["w"])], [np.asarray(state.h["w"])], gamma=np.asarray(state.gamma),
        eps=1e-12, clip_threshold=1.0, b1=sophia_core.DEFAULTS["b1"], step=3, xp=np)
    assert 0.2 < float(share) < 0.4


def test_sign_momentum_regime_warns_once(rng):
    params = {"w": jnp.asarray(rng.normal(size=(32,)), jnp.float32)}
    warmup, patience = sophia_core.SIGN_MOMENTUM_WARMUP, sophia_core.SIGN_MOMENTUM_PATIENCE
    steps = warmup + patience + 5
    hhat = {"w": jnp.full(32, 1e-6, jnp.float32)}  # tiny curvature: every step clipped

    def run(**kwargs):
        tx = sophia_jax.sophia(1e-2, hessian_interval=1, **kwargs)
        step = jax.jit(lambda p, s, g: tx.update(g, s, p, sophia_estimator=given(hhat)))
        state = tx.init(params)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for _ in range(steps):
                grads = {"w": jnp.asarray(rng.normal(size=32), jnp.float32)}
                _, state = step(params, state, grads)
            jax.effects_barrier()
        return state, [w for w in caught if "sign momentum" in str(w.message)]

    state, caught = run()
    assert len(caught) == 1 and issubclass(caught[0].category, UserWarning)
    assert "warn_sign_momentum=False" in str(caught[0].message)
    assert float(state.unclipped_share) == 0.0
    assert int(state.sign_momentum_streak) == steps - warmup
    state, caught = run(warn_sign_momentum=False)
    assert caught == [] and int(state.sign_momentum_streak) == steps - warmup


def test_unclipped_share_in_the_state_is_the_cores(rng):
    params = {"w": jnp.asarray(rng.normal(size=(50,)), jnp.float32)}
    tx = sophia_jax.sophia(1e-2, hessian_interval=1)
    state = tx.init(params)
    for _ in range(3):
        grads = {"w": jnp.asarray(rng.normal(size=50), jnp.float32)}
        hhat = {"w": jnp.asarray(rng.random(50) * 30, jnp.float32)}
        before = state
        _, state = tx.update(grads, state, params, sophia_estimator=given(hhat))
    expected = sophia_core.unclipped_share(
        [np.asarray(before.m["w"])], [np.asarray(state.h["w"])], gamma=0.04, eps=1e-12,
        clip_threshold=1.0, b1=sophia_core.DEFAULTS["b1"], step=2, xp=np)
    assert float(state.unclipped_share) == pytest.approx(float(expected))
    assert 0.0 < float(expected) < 1.0
