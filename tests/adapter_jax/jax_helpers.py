"""Shared pieces of the JAX tests: a numpy reference trajectory built on the core."""

from __future__ import annotations

import numpy as np

import sophia_core
import sophia_jax

HYPER = dict(lr=1e-2, b1=0.965, b2=0.99, gamma=0.04, weight_decay=0.1, eps=1e-12,
             clip_threshold=1.0, hessian_interval=3, refresh_at_start=True,
             bias_correction=False, maximize=False)


def stream(rng, shapes, dtype, steps, hhat_scale=1.0):
    """``steps`` (grads, hhats) dicts with the given leaf shapes; hhats may be negative.

    With ``hhat_scale`` around 100 (and the default gamma) a good share of
    the coordinates is not clipped, so bias correction shows in the step.
    """
    out = []
    for _ in range(steps):
        grads = {k: rng.normal(size=s).astype(dtype) for k, s in shapes.items()}
        hhats = {k: ((rng.normal(size=s) + 0.5) * hhat_scale).astype(dtype)
                 for k, s in shapes.items()}
        out.append((grads, hhats))
    return out


def numpy_trajectory(params, steps, **hyper):
    """The core on numpy: (params, m, h) after each step, refresh before the step."""
    hp = sophia_core.Hyperparameters(**{**HYPER, **hyper})
    params = dict(params)
    states = {k: sophia_core.init_state(v, xp=np) for k, v in params.items()}
    trajectory = []
    for t, (grads, hhats) in enumerate(steps):
        if sophia_core.refresh_due(t, hessian_interval=hp.hessian_interval,
                                   refresh_at_start=hp.refresh_at_start):
            states = {
                k: sophia_core.SophiaState(
                    s.m, sophia_core.hessian_ema(s.h, hhats[k], b2=hp.b2, xp=np))
                for k, s in states.items()
            }
        for k in params:
            params[k], states[k] = sophia_core.sophia_update(
                params[k], grads[k], states[k], step=t + 1, xp=np, **hp.update_kwargs())
        trajectory.append((dict(params), {k: s.m for k, s in states.items()},
                           {k: s.h for k, s in states.items()}))
    return trajectory


def given(hhat):
    """An estimator that hands over a ready estimate (evaluated only when refreshing)."""
    return sophia_jax.HessianDiagonalFn(lambda params, key: hhat)
