"""Successive Hessian refreshes draw fresh noise (issue 15 item 6).

The state's key is split at every refresh, so two refreshes through
``tx.update(..., sophia_estimator=...)`` on the same batch at the same
parameters sample new labels (Sophia-G) and new probes (Sophia-H), and a
``HessianDiagonalFn`` gets a new key. With ``b2=0``, ``h`` is the latest
estimate. The same key must give the same sequence, so the differences are
not mere nondeterminism.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sophia_jax

REFRESHES = 3
RNG = np.random.default_rng(4)
X = jnp.asarray(RNG.normal(size=(6, 3, 4)), jnp.float32)
Y = jnp.asarray(RNG.integers(0, 5, size=(6, 3)))
PARAMS = {"w": jnp.asarray(RNG.normal(size=(4, 5)) * 0.5, jnp.float32),
          "b": jnp.zeros(5, jnp.float32)}


def _logits(p, x):
    return jnp.tanh(x @ p["w"]) * 2.0 + p["b"]


def _loss(p, x):
    z = jax.nn.log_softmax(_logits(p, x))
    return -jnp.mean(jnp.take_along_axis(z, Y[: x.shape[0], :, None], -1))


ESTIMATORS = {
    "gnb": lambda: sophia_jax.GaussNewtonBartlett(_logits, inputs=X, batch_fraction=1.0),
    "hutchinson": lambda: sophia_jax.Hutchinson(_loss, inputs=X, batch_fraction=1.0),
    "fn": lambda: sophia_jax.HessianDiagonalFn(lambda p, key: jax.tree.map(
        lambda leaf, k: jax.random.normal(k, leaf.shape, leaf.dtype), p,
        jax.tree.unflatten(jax.tree.structure(p), jax.random.split(key, len(p))))),
}
#: Estimator, jit, refresh_after_step: every estimator under jit (each compile
#: takes a second on a shared CPU), the eager path and the refresh after the
#: step with the cheap one.
CASES = [("gnb", True, False), ("hutchinson", True, False), ("fn", True, False),
         ("fn", False, True)]
IDS = [f"{n}-{'jit' if j else 'eager'}{'-after' if a else ''}" for n, j, a in CASES]


def _tx(key=0, after=False):
    return sophia_jax.sophia(1e-2, b2=0.0, hessian_interval=1, key=key,
                             refresh_after_step=after)


@functools.cache
def _update(name, jit, after):
    """One update per case, compiled once: only ``init`` reads the key."""
    tx, estimator = _tx(after=after), ESTIMATORS[name]()

    def update(state):
        grads = jax.tree.map(jnp.zeros_like, PARAMS)
        return tx.update(grads, state, PARAMS, sophia_estimator=estimator)[1]

    return jax.jit(update) if jit else update


def _hessians(name, *, jit=True, after=False, key=3):
    """``h`` after each of REFRESHES refreshes at the same parameters and batch."""
    update = _update(name, jit, after)
    state, seen = _tx(key, after).init(PARAMS), []
    for _ in range(REFRESHES):
        state = update(state)
        seen.append({k: np.asarray(v) for k, v in state.h.items()})
    assert int(state.hessian_refreshes) == REFRESHES
    return seen


def _same(a, b):
    return all(np.array_equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("name,jit,after", CASES, ids=IDS)
def test_successive_refreshes_on_one_batch_draw_fresh_noise(name, jit, after):
    seen = _hessians(name, jit=jit, after=after)
    for earlier in range(REFRESHES):
        assert all(np.isfinite(h).all() for h in seen[earlier].values())
        for later in range(earlier + 1, REFRESHES):
            assert not _same(seen[earlier], seen[later]), (earlier, later)


@pytest.mark.parametrize("name", list(ESTIMATORS))
def test_the_same_key_gives_the_same_sequence_and_another_key_another(name):
    seen = _hessians(name, key=3)
    assert all(_same(a, b) for a, b in zip(seen, _hessians(name, key=3), strict=True))
    assert not _same(seen[0], _hessians(name, key=4)[0])


def test_the_state_key_advances_at_every_refresh_only():
    tx = sophia_jax.sophia(1e-2, hessian_interval=2, key=0)
    estimator = ESTIMATORS["fn"]()
    state, keys = tx.init(PARAMS), []
    for _ in range(4):
        keys.append(np.asarray(jax.random.key_data(state.key)).tolist())
        state = tx.update(jax.tree.map(jnp.zeros_like, PARAMS), state, PARAMS,
                          sophia_estimator=estimator)[1]
    keys.append(np.asarray(jax.random.key_data(state.key)).tolist())
    # Refreshes before steps 0 and 2: the key changes there and nowhere else.
    assert [a != b for a, b in zip(keys, keys[1:], strict=False)] == [True, False, True, False]
