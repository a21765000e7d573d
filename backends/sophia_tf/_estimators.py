"""Sophia-G (GNB) and Sophia-H (Hutchinson) Hessian estimates on any Keras backend.

The array math (Gumbel-max sampling, the masked mean cross-entropy,
``N g g``, ``u * Hu``, probes from noise) is :mod:`sophia_core`'s, run on
:data:`sophia_tf.keras_namespace`; Keras supplies the noise
(``keras.random``) and the backend the derivatives (``_autodiff``).

Both estimators are functions of *values*, not variables: ``fn(values)``
computes the logits or the loss from a list of tensors, as a
``model.stateless_call`` does. That is the form JAX needs, and on every
backend it leaves the model's state (BatchNorm statistics, dropout seeds)
untouched.

Noise is stateless: ``seed`` is a pair ``(seed, counter)`` of integers or
integer tensors (the refresh in ``fit`` uses ``(model.sophia_seed,
optimizer.iterations)``), so the same pair draws the same labels and probes,
which is what a resumed run needs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import keras
from keras import ops

import sophia_core

from . import _distribute
from ._autodiff import grad_and_aux, hvp
from ._namespace import keras_namespace as xp

__all__ = ["gnb_hessian", "gnb_local", "hutchinson_hessian", "noise"]

# keras.random draws from a SeedGenerator; this one's state is never used
# as stored: each draw sets it, inside a StatelessScope, to the seed wanted.
_GENERATOR = keras.random.SeedGenerator(0, name="sophia_noise")


def noise(kind: str, shape: Any, dtype: Any, seed: Any, *, draw: int = 0,
          draws: int = 1) -> Any:
    """Uniform [0, 1) or standard normal noise: draw ``draw`` of ``draws`` at ``seed``.

    The Keras seed is ``(seed[0], seed[1] * draws + draw)`` (int32, wrapping):
    distinct draws within one refresh and across counters.
    """
    first, counter = (ops.cast(s, "int32") for s in seed)
    state = ops.stack([first, counter * draws + draw])
    with keras.StatelessScope(state_mapping=[(_GENERATOR.state, state)]):
        if kind == "uniform":
            return keras.random.uniform(shape, dtype=dtype, seed=_GENERATOR)
        return keras.random.normal(shape, dtype=dtype, seed=_GENERATOR)


def _logits_of(outputs: Any, from_logits: bool) -> Any:
    """Logits from model outputs: log-probabilities when they are probabilities.

    ``softmax(log p) = p``, so labels sampled from them and the gradient of
    the cross-entropy at those labels are the same as from the logits;
    probabilities are clipped to Keras's epsilon as its cross-entropy does.
    """
    if from_logits:
        return outputs
    return ops.log(ops.clip(outputs, keras.config.epsilon(), 1.0))


def gnb_local(logits_fn: Callable[[list[Any]], Any], values: Sequence[Any], *,
              seed: Any = (0, 0), mask: Any = None,
              ignore_index: int = sophia_core.IGNORE_INDEX,
              from_logits: bool = True) -> tuple[list[Any], Any]:
    """This replica's ``(ghat per value, N)``: no cross-replica communication."""

    def sampled_loss(values):
        logits = _logits_of(logits_fn(values), from_logits)
        counted = mask(logits) if callable(mask) else mask
        z = ops.stop_gradient(logits)
        uniform = _distribute.global_batch_rows(
            lambda shape: noise("uniform", shape, sophia_core.compute_dtype(z.dtype, xp=xp),
                                seed), z)
        labels = sophia_core.sample_labels(z, uniform, mask=counted,
                                           ignore_index=ignore_index, xp=xp)
        loss = sophia_core.masked_mean_cross_entropy(logits, labels,
                                                     ignore_index=ignore_index, xp=xp)
        return loss, sophia_core.num_positions(labels, ignore_index=ignore_index, xp=xp)

    return grad_and_aux(sampled_loss, list(values))


def gnb_hessian(logits_fn: Callable[[list[Any]], Any], values: Sequence[Any], *,
                seed: Any = (0, 0), mask: Any = None,
                ignore_index: int = sophia_core.IGNORE_INDEX,
                from_logits: bool = True) -> list[Any]:
    r"""Sophia-G's estimate :math:`\hat h = N \hat g \odot \hat g`, one per value.

    ``logits_fn(values)`` returns logits of shape ``(..., V)`` (with
    ``from_logits=False``: probabilities, as a softmax head gives). Labels are
    sampled from them; ``mask`` (bool, shape ``(...)``, or a function of the
    logits returning it) marks the positions that count, the others are
    ``ignore_index``. :math:`\hat g` is the gradient of the mean
    cross-entropy at the sampled labels and :math:`N` the number of counted
    positions. Inside a TensorFlow ``strategy.run``, :math:`\hat g` is the
    global mean over replicas and :math:`N` the global count.
    """
    grads, positions = gnb_local(logits_fn, values, seed=seed, mask=mask,
                                 ignore_index=ignore_index, from_logits=from_logits)
    grads, positions = _distribute.global_mean(grads, positions)
    return [sophia_core.gnb_estimate(g, positions, xp=xp) for g in grads]


def hutchinson_hessian(loss_fn: Callable[[list[Any]], Any], values: Sequence[Any], *,
                       seed: Any = (0, 0), n_probes: int = 1,
                       probe: str = "gaussian") -> list[Any]:
    r"""Sophia-H's estimate :math:`\hat h = \frac1n\sum_j u_j \odot H u_j`, one per value.

    ``loss_fn(values)`` returns a scalar loss. ``n_probes`` probes per value,
    ``probe`` "gaussian" (standard normal) or "rademacher" (:math:`\pm 1`);
    the Hessian-vector products are forward-over-reverse on TensorFlow and
    JAX, reverse-over-reverse on torch. Under data parallelism the caller
    sums (or averages) the estimates over replicas as its loss requires.
    """
    sophia_core.validate_hyperparameters(n_probes=n_probes, probe=probe)
    values = list(values)
    kind = "uniform" if probe == "rademacher" else "normal"
    draws = n_probes * len(values)
    probes: list[list[Any]] = [[] for _ in values]
    products: list[list[Any]] = [[] for _ in values]
    for j in range(n_probes):
        tangents = []
        for i, value in enumerate(values):
            dtype = sophia_core.compute_dtype(value.dtype, xp=xp)
            u = sophia_core.probe_from_noise(
                noise(kind, tuple(value.shape), dtype, seed, draw=j * len(values) + i,
                      draws=draws), probe=probe, xp=xp)
            tangents.append(ops.cast(u, value.dtype))
        for i, hu in enumerate(hvp(loss_fn, values, tangents)):
            probes[i].append(tangents[i])
            products[i].append(hu)
    return [sophia_core.hutchinson_estimate(us, hus, xp=xp)
            for us, hus in zip(probes, products, strict=True)]
