"""optax.contrib.sophia, reproduced step for step by sophia_jax.optax_contrib_sophia.

Both run under jax.jit here, on the same Hessian stream (injected through
optax's ``hessian_diagonal_fn``) or the same Hutchinson probes (same key).
With ``XLA_FLAGS=--xla_cpu_max_isa=AVX`` and x64 (``jax_subprocess_checks``)
they agree bitwise wherever the bias correction does not enter the step
(clipped coordinates), and to an ulp where it does (optax divides by
``1 - b1**t``, the core multiplies by the reciprocal); here XLA may also
fuse differently: a few ulps.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import optax.contrib
import pytest
from jax_helpers import given

import sophia_jax

SHAPES = {"w": (6, 4), "b": (4,)}
KW = dict(b1=0.9, b2=0.95, eps=1e-8, weight_decay=1e-2, gamma=0.01, clip_threshold=1.0,
          update_interval=3)


def injected_hessian():
    """A ``hessian_diagonal_fn`` that returns the ``hhat=`` extra argument."""

    def update(updates, state, params=None, hhat=None, **extra_args):
        return hhat, state

    return optax.GradientTransformationExtraArgs(lambda params: optax.EmptyState(), update)


def _run(tx, params, steps, ours=False, **extra):
    @jax.jit
    def step(params, state, grads, hhat):
        if ours and "sophia_estimator" not in extra:
            extra_args = {"sophia_estimator": given(hhat)}
        else:
            extra_args = ({} if ours else {"hhat": hhat}) | extra
        updates, state = tx.update(grads, state, params, **extra_args)
        return optax.apply_updates(params, updates), state

    state = tx.init(params)
    out = []
    for grads, hhat in steps:
        params, state = step(params, state, grads, hhat)
        out.append(params)
    return out, state


def _tolerance(dtype):
    return dict(rtol=1e-6, atol=1e-7) if dtype == jnp.float32 else dict(rtol=1e-13, atol=1e-15)


@pytest.mark.parametrize("hhat_scale", [1.0, 1000.0])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_injected_hessian_stream(rng, dtype, hhat_scale):
    if dtype == jnp.float64 and not jax.config.jax_enable_x64:
        pytest.skip("float64 needs JAX_ENABLE_X64=1")
    params = {k: jnp.asarray(rng.normal(size=s), dtype) for k, s in SHAPES.items()}
    # hhat_scale 1: almost every coordinate clipped (sign steps); 1000 (of
    # order 1/gamma): many unclipped, so the bias correction and h shape the
    # step. Optax divides by 1 - b1**t, the core multiplies by its
    # reciprocal (sophia_core.bias_corrected): an ulp apart in that regime.
    steps = [({k: jnp.asarray(rng.normal(size=s), dtype) for k, s in SHAPES.items()},
              {k: jnp.asarray(rng.normal(size=s) ** 2 * hhat_scale, dtype)
               for k, s in SHAPES.items()})
             for _ in range(12)]
    mask = {"w": True, "b": False}
    theirs, their_state = _run(
        optax.contrib.sophia(1e-2, weight_decay_mask=mask, hessian_diagonal_fn=injected_hessian(),
                             **KW), params, steps)
    ours, our_state = _run(sophia_jax.optax_contrib_sophia(1e-2, weight_decay_mask=mask, **KW),
                           params, steps, ours=True)
    for a, b in zip(theirs, ours, strict=True):
        for k in SHAPES:
            np.testing.assert_allclose(b[k], a[k], **_tolerance(dtype))
    mine = sophia_jax.sophia_state(our_state)
    np.testing.assert_allclose(mine.h["w"], their_state[0].nu["w"], **_tolerance(dtype))
    assert int(mine.count) == int(their_state[0].count) == 12
    unclipped = float(jnp.mean(jnp.abs(theirs[-1]["w"] - theirs[-2]["w"]) < 0.9e-2))
    assert unclipped < 0.1 if hhat_scale == 1.0 else 0.1 < unclipped < 1.0, unclipped


def test_hutchinson_with_the_same_key(rng):
    dtype = jnp.float64 if jax.config.jax_enable_x64 else jnp.float32
    a = jnp.asarray(rng.normal(size=(6, 6)), dtype)
    hess = a @ a.T  # not diagonal: the probes matter
    params = {"w": jnp.asarray(rng.normal(size=6), dtype)}
    loss_fn = lambda p: 0.5 * p["w"] @ hess @ p["w"] + jnp.sum(jnp.sin(p["w"]))  # noqa: E731
    key = jax.random.PRNGKey(42)
    steps = [({"w": jnp.asarray(rng.normal(size=6), dtype)}, None) for _ in range(7)]
    theirs, _ = _run(optax.contrib.sophia(
        1e-2, hessian_diagonal_fn=optax.contrib.hutchinson_estimator_diag_hessian(key), **KW),
        params, steps, obj_fn=loss_fn)
    ours, _ = _run(sophia_jax.optax_contrib_sophia(1e-2, key=key, **KW), params, steps,
                   ours=True, sophia_estimator=sophia_jax.Hutchinson(loss_fn))
    for x, y in zip(theirs, ours, strict=True):
        np.testing.assert_allclose(y["w"], x["w"], **_tolerance(dtype))
