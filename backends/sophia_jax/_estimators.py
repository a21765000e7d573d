"""Diagonal-Hessian estimates for JAX: autodiff and noise around the core's math.

The arithmetic (Gumbel-max sampling, the masked cross-entropy, ``N*ghat^2``,
``mean u*Hu``, probes from noise) is ``sophia_core``'s; this module supplies
what JAX does: ``jax.vjp``/``jax.grad`` for ``ghat``, forward-over-reverse
``jax.jvp(jax.grad(loss_fn))`` for Hessian-vector products, ``jax.random``
noise, and the cross-device reductions of a ``shard_map`` body.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

import sophia_core

__all__ = ["ESTIMATOR_ARGS", "estimate_hessian", "estimator_inputs"]

#: Keyword extra arguments of ``tx.update`` that this package reads. Exactly
#: one of ``hhat``, ``logits_fn`` and ``loss_fn`` selects the estimate;
#: ``label_mask`` goes with ``logits_fn``.
ESTIMATOR_ARGS = ("hhat", "logits_fn", "label_mask", "loss_fn")


def estimator_inputs(extra_args: dict[str, Any]) -> dict[str, Any]:
    """The estimator inputs among ``tx.update``'s extra arguments (others ignored).

    Raises ValueError when more than one estimate is asked for, or when
    ``label_mask`` comes without ``logits_fn``.
    """
    inputs = {k: extra_args[k] for k in ESTIMATOR_ARGS if extra_args.get(k) is not None}
    chosen = [k for k in ("hhat", "logits_fn", "loss_fn") if k in inputs]
    if len(chosen) > 1:
        raise ValueError(f"pass one of hhat=, logits_fn=, loss_fn= to update, got {chosen}")
    if "label_mask" in inputs and "logits_fn" not in inputs:
        raise ValueError("label_mask= is only used with logits_fn= (Sophia-G)")
    return inputs


def estimate_hessian(
    params: Any,
    key: jax.Array,
    inputs: dict[str, Any],
    *,
    probe: str,
    n_probes: int,
    axis_name: Any = None,
) -> Any:
    """``hhat`` (a pytree like ``params``) from the estimator inputs.

    ``axis_name``: inside ``shard_map``/``pmap`` over a data-parallel axis,
    the name of that axis. Sophia-G then averages ``ghat`` over the devices
    (weighted by their label counts) and sums ``N`` before squaring, and
    Sophia-H averages the Hessian-vector products. Under ``jax.jit`` with
    sharded inputs no name is needed: the loss is already the global one.
    """
    if "hhat" in inputs:
        return inputs["hhat"]
    if "logits_fn" in inputs:
        return _gnb(params, key, inputs["logits_fn"], inputs.get("label_mask"), axis_name)
    return _hutchinson(params, key, inputs["loss_fn"], probe=probe, n_probes=n_probes,
                       axis_name=axis_name)


def _gnb(params: Any, key: jax.Array, logits_fn: Callable[[Any], Any], label_mask: Any,
         axis_name: Any) -> Any:
    """Sophia-G: sample labels from the model, ``ghat`` of their loss, ``N*ghat^2``."""
    if axis_name is not None:
        # Each device samples its own positions: independent noise per device.
        key = jax.random.fold_in(key, jax.lax.axis_index(axis_name))
    logits, pullback = jax.vjp(logits_fn, params)
    z = jax.lax.stop_gradient(logits)
    noise_dtype = sophia_core.compute_dtype(z.dtype, xp=jnp)
    uniform = jax.random.uniform(key, z.shape, dtype=noise_dtype)
    labels = sophia_core.sample_labels(z, uniform, mask=label_mask, xp=jnp)
    positions = sophia_core.num_positions(labels, xp=jnp)

    def sampled_loss(zz: Any) -> Any:
        return sophia_core.masked_mean_cross_entropy(zz, labels, xp=jnp)

    (ghat,) = pullback(jax.grad(sampled_loss)(logits).astype(logits.dtype))
    if axis_name is not None:
        # The global mean over all devices' positions: each device's mean
        # weighted by its count, then N is the global count.
        local = positions
        positions = jax.lax.psum(local, axis_name)
        weight = local / jnp.maximum(positions, 1)
        ghat = jax.tree.map(lambda g: jax.lax.psum(g * weight.astype(g.dtype), axis_name), ghat)
    return jax.tree.map(lambda g: sophia_core.gnb_estimate(g, positions, xp=jnp), ghat)


def _probe_noise(key: jax.Array, params: Any, probe: str) -> Any:
    """Per-leaf noise, split from ``key`` like ``optax.tree.random_like`` does.

    Rademacher noise is uniform in the default float dtype, the draw
    ``jax.random.rademacher`` makes, so with the same key our probes are
    optax's with the opposite sign (and ``u*Hu`` is the same).
    """
    keys = optax.tree.split_key_like(key, params)
    if probe == "gaussian":
        return jax.tree.map(lambda p, k: jax.random.normal(k, p.shape, p.dtype), params, keys)
    dtype = jax.dtypes.canonicalize_dtype(jnp.float64)  # float32 unless x64
    return jax.tree.map(lambda p, k: jax.random.uniform(k, p.shape, dtype), params, keys)


def _hutchinson(params: Any, key: jax.Array, loss_fn: Callable[[Any], Any], *, probe: str,
                n_probes: int, axis_name: Any) -> Any:
    """Sophia-H: ``mean_j u_j * (H u_j)`` with forward-over-reverse HVPs."""
    grad_fn = jax.grad(loss_fn)
    keys = [key] if n_probes == 1 else list(jax.random.split(key, n_probes))
    probes, hvps = [], []
    for probe_key in keys:
        u = jax.tree.map(
            lambda noise, p: sophia_core.probe_from_noise(noise, probe=probe, xp=jnp).astype(
                p.dtype
            ),
            _probe_noise(probe_key, params, probe),
            params,
        )
        hvp = jax.jvp(grad_fn, (params,), (u,))[1]
        if axis_name is not None:
            hvp = jax.lax.pmean(hvp, axis_name)
        probes.append(u)
        hvps.append(hvp)
    return jax.tree.map(
        lambda *pairs: sophia_core.hutchinson_estimate(
            pairs[:n_probes], pairs[n_probes:], xp=jnp
        ),
        *probes,
        *hvps,
    )
