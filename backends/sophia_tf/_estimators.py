"""Sophia-G (GNB) and Sophia-H (Hutchinson) Hessian estimates on any Keras backend.

The array math is :mod:`sophia_core`'s, the noise ``keras.random``'s, the
derivatives the backend's (``_autodiff``). Both estimates take a function of
*values* (as ``model.stateless_call`` gives), the form JAX needs, and a
stateless ``seed``: a pair ``(seed, counter)`` of integers or integer tensors.
The last functions are the only cross-replica code (a TensorFlow
``MirroredStrategy``; identities elsewhere): Sophia-G needs the global mean
gradient and count (SPEC section 3).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import keras
from keras import ops

import sophia_core

from ._autodiff import grad_and_aux, hvp
from ._namespace import keras_namespace as xp

__all__ = ["global_mean", "gnb_hessian", "gnb_local", "hutchinson_hessian", "noise",
           "replica_sum", "replicas"]

# keras.random draws from a SeedGenerator: this one's stored state is never
# used; each draw maps it, in a StatelessScope, to the seed wanted.
_GENERATOR = keras.random.SeedGenerator(0, name="sophia_noise")


def noise(kind: str, shape: Any, dtype: Any, seed: Any, *, draw: int = 0, draws: int = 1):
    """Uniform [0, 1) or standard normal noise, Keras seed ``(seed[0], seed[1]*draws + draw)``."""
    first, counter = (ops.cast(s, "int32") for s in seed)
    with keras.StatelessScope(state_mapping=[(_GENERATOR.state,
                                              ops.stack([first, counter * draws + draw]))]):
        sample = keras.random.uniform if kind == "uniform" else keras.random.normal
        return sample(shape, dtype=dtype, seed=_GENERATOR)


def gnb_local(logits_fn: Callable[[list[Any]], Any], values: Sequence[Any], *,
              seed: Any = (0, 0), mask: Any = None, ignore_index: int = sophia_core.IGNORE_INDEX,
              from_logits: bool = True) -> tuple[list[Any], Any]:
    """This replica's ``(ghat per value, N)`` (no cross-replica communication)."""

    def sampled_loss(values):
        outputs = logits_fn(values)
        # Probabilities p: log p are logits (softmax(log p) = p), clipped as Keras's CE does.
        logits = outputs if from_logits else ops.log(
            xp.clip(outputs, min=keras.config.epsilon(), max=1.0))
        z = ops.stop_gradient(logits)
        uniform = global_batch_rows(lambda shape: noise(
            "uniform", shape, sophia_core.compute_dtype(z.dtype, xp=xp), seed), z)
        labels = sophia_core.sample_labels(z, uniform, mask=mask(z) if callable(mask) else mask,
                                           ignore_index=ignore_index, xp=xp)
        return (sophia_core.masked_mean_cross_entropy(logits, labels, ignore_index=ignore_index,
                                                      xp=xp),
                sophia_core.num_positions(labels, ignore_index=ignore_index, xp=xp))

    return grad_and_aux(sampled_loss, list(values))


def gnb_hessian(logits_fn: Callable[[list[Any]], Any], values: Sequence[Any], *,
                seed: Any = (0, 0), mask: Any = None,
                ignore_index: int = sophia_core.IGNORE_INDEX,
                from_logits: bool = True) -> list[Any]:
    r"""Sophia-G's estimate :math:`\hat h = N \hat g \odot \hat g`, one per value.

    ``logits_fn(values)`` gives logits ``(..., V)`` (probabilities with
    ``from_logits=False``); labels are sampled from them where ``mask`` (bool
    ``(...)``, or a function of the logits) is true. :math:`\hat g`: the
    gradient of the mean cross-entropy at those labels; :math:`N`: the
    positions counted (inside ``strategy.run``: global mean and count).
    """
    grads, positions = global_mean(*gnb_local(
        logits_fn, values, seed=seed, mask=mask, ignore_index=ignore_index,
        from_logits=from_logits))
    return [sophia_core.gnb_estimate(g, positions, xp=xp) for g in grads]


def hutchinson_hessian(loss_fn: Callable[[list[Any]], Any], values: Sequence[Any], *,
                       seed: Any = (0, 0), n_probes: int = 1,
                       probe: str = "gaussian") -> list[Any]:
    r"""Sophia-H's estimate :math:`\hat h = \frac1n\sum_j u_j \odot H u_j`, one per value:
    ``loss_fn(values)`` is a scalar; ``n_probes`` probes of distribution ``probe``
    ("gaussian" or "rademacher"); the caller reduces over replicas."""
    sophia_core.validate_hyperparameters(n_probes=n_probes, probe=probe)
    values = list(values)
    kind, draws = "uniform" if probe == "rademacher" else "normal", n_probes * len(values)
    probes, products = [[] for _ in values], [[] for _ in values]
    for j in range(n_probes):
        tangents = [ops.cast(sophia_core.probe_from_noise(noise(
            kind, tuple(v.shape), sophia_core.compute_dtype(v.dtype, xp=xp), seed,
            draw=j * len(values) + i, draws=draws), probe=probe, xp=xp), v.dtype)
            for i, v in enumerate(values)]
        for i, hu in enumerate(hvp(loss_fn, values, tangents)):
            probes[i].append(tangents[i])
            products[i].append(hu)
    return [sophia_core.hutchinson_estimate(us, hus, xp=xp)
            for us, hus in zip(probes, products, strict=True)]


def replicas() -> Any:
    """TensorFlow's replica context when several replicas run in sync, else None."""
    if keras.backend.backend() != "tensorflow":
        return None
    import tensorflow as tf

    context = tf.distribute.get_replica_context()
    return context if context is not None and context.num_replicas_in_sync > 1 else None


def global_batch_rows(draw: Callable[[Any], Any], like: Any) -> Any:
    """``draw(shape)`` noise for batch ``like``; a replica draws the whole global
    batch's and keeps its rows (the labels one device would sample)."""
    context = replicas()
    if context is None:
        return draw(ops.shape(like))
    import tensorflow as tf

    rows = tf.shape(like)[0]
    full = draw(tf.concat([[rows * context.num_replicas_in_sync], tf.shape(like)[1:]], 0))
    start = tf.cast(context.replica_id_in_sync_group, rows.dtype) * rows
    return tf.ensure_shape(full[start:start + rows], like.shape)


def replica_sum(values: Sequence[Any]) -> list[Any]:
    """Sum ``values`` over replicas (inside ``strategy.run``)."""
    context = replicas()
    return list(values) if context is None else context.all_reduce("sum", list(values))


def global_mean(grads: Sequence[Any], positions: Any) -> tuple[list[Any], Any]:
    """The global mean gradient and count from each replica's local ones."""
    if replicas() is None:
        return list(grads), positions
    local = ops.cast(positions, "float64")
    # Separate reductions: an all-reduce packs its list, so one dtype each.
    summed = replica_sum([g * ops.cast(local, g.dtype) for g in grads])
    total = replica_sum([local])[0]
    return [g / ops.cast(ops.maximum(total, 1.0), g.dtype) for g in summed], total
