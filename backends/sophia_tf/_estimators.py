"""Hessian estimates with ``tf.GradientTape``: Sophia-G (GNB) and Sophia-H.

TensorFlow supplies the noise, the gradients and the Hessian-vector products;
the array math (Gumbel-max sampling, the masked mean cross-entropy, ``N g g``,
``u * Hu``, probes from noise) is ``sophia_core``'s, see
:mod:`sophia_core._estimators` for the formulas.

Noise comes from a ``tf.random.Generator`` (``generator=``) or, stateless,
from a ``seed`` (a shape-[2] integer tensor): with the same seed the estimate
is the same, which is what a resumed run needs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import tensorflow as tf

import sophia_core

from ._distribute import replica_sum
from ._namespace import tf_namespace as xp

__all__ = ["gnb_global", "gnb_hessian", "gnb_local", "hutchinson_hessian"]


def _tf_variables(variables: Sequence[Any]) -> list[tf.Variable]:
    return [v if isinstance(v, tf.Variable) else v.value for v in variables]


def _dense(tensors: Sequence[Any]) -> list[tf.Tensor]:
    """Gradients as dense tensors (embeddings give ``IndexedSlices``)."""
    return [tf.convert_to_tensor(t) for t in tensors]


def _bits(shape: Any, generator: Any, seed: Any) -> tf.Tensor:
    """64 random bits per element: the same in eager, graph and XLA code."""
    if seed is not None:
        return tf.random.stateless_uniform(shape, seed=seed, dtype=tf.uint64, minval=None,
                                           maxval=None, alg="philox")
    generator = generator if generator is not None else tf.random.get_global_generator()
    return generator.uniform_full_int(shape, dtype=tf.uint64)


def _uniform(shape: Any, dtype: tf.DType, generator: Any, seed: Any) -> tf.Tensor:
    """Uniform on [0, 1) with the dtype's full mantissa.

    Built from raw bits, because TF's float kernels and XLA's turn the same
    Philox bits into different floats; this way a seed gives the same noise
    with and without ``jit_compile``.
    """
    digits = 53 if dtype == tf.float64 else 24
    kept = tf.bitwise.right_shift(_bits(shape, generator, seed), tf.constant(64 - digits,
                                                                               tf.uint64))
    return tf.cast(kept, dtype) * tf.constant(2.0 ** -digits, dtype)


def _noise(kind: str, shape: Any, dtype: tf.DType, generator: Any, seed: Any) -> tf.Tensor:
    """Uniform [0, 1) or standard normal (Box-Muller) noise."""
    if kind == "uniform":
        return _uniform(shape, dtype, generator, seed)
    radius_seed, angle_seed = (None, None) if seed is None else _seeds(seed, 2)
    radius = tf.sqrt(-2.0 * tf.math.log(1.0 - _uniform(shape, dtype, generator, radius_seed)))
    return radius * tf.cos((2.0 * np.pi) * _uniform(shape, dtype, generator, angle_seed))


def _batch_noise(shape: Any, dtype: tf.DType, generator: Any, seed: Any) -> tf.Tensor:
    """Uniform noise for a batch; stateless noise is drawn for the global batch.

    Inside ``strategy.run`` with a seed, every replica draws the noise of the
    whole global batch (replicas hold equal consecutive slices of it) and
    keeps its own rows, so the labels equal the single-device ones.
    """
    context = tf.distribute.get_replica_context()
    if seed is None or context is None or context.num_replicas_in_sync == 1:
        return _noise("uniform", shape, dtype, generator, seed)
    replicas = context.num_replicas_in_sync
    rows = shape[0]
    full = _noise("uniform", tf.concat([[rows * replicas], shape[1:]], 0), dtype, None, seed)
    start = tf.cast(context.replica_id_in_sync_group, rows.dtype) * rows
    return full[start:start + rows]


def _seeds(seed: Any, count: int) -> list[Any]:
    if seed is None:
        return [None] * count
    return list(tf.unstack(tf.random.experimental.stateless_split(seed, num=count,
                                                                  alg="philox")))


def gnb_hessian(
    logits_fn: Callable[[], Any],
    variables: Sequence[Any],
    *,
    mask: Any = None,
    generator: tf.random.Generator | None = None,
    seed: Any = None,
    ignore_index: int = sophia_core.IGNORE_INDEX,
) -> list[tf.Tensor]:
    r"""Sophia-G's estimate :math:`\hat h = N \hat g \odot \hat g`, one per variable.

    ``logits_fn()`` returns logits of shape ``(..., V)`` computed from
    ``variables``; labels are sampled from them (``mask``, shape ``(...)``,
    or a function of the logits returning it, marks the positions that
    count), and :math:`\hat g` is the gradient of the mean cross-entropy at
    the sampled labels. Inside ``strategy.run``, :math:`\hat g` is the global
    mean over replicas and :math:`N` the global count, as the estimator requires.
    """
    grads, positions = gnb_local(logits_fn, variables, mask=mask, generator=generator,
                                 seed=seed, ignore_index=ignore_index)
    context = tf.distribute.get_replica_context()
    if context is not None and context.num_replicas_in_sync > 1:
        grads, positions = gnb_global(grads, positions)
    return [sophia_core.gnb_estimate(g, positions, xp=xp) for g in grads]


def gnb_local(logits_fn, variables, *, mask=None, generator=None, seed=None,
              ignore_index=sophia_core.IGNORE_INDEX):
    """This replica's ``(ghat per variable, N)``: no cross-replica communication."""
    tf_vars = _tf_variables(variables)
    with tf.GradientTape(watch_accessed_variables=False) as tape:
        tape.watch(tf_vars)
        logits = logits_fn()
        if callable(mask):
            mask = mask(logits)
        dtype = sophia_core.compute_dtype(logits.dtype, xp=xp)
        uniform = _batch_noise(tf.shape(logits), dtype, generator, seed)
        labels = tf.stop_gradient(sophia_core.sample_labels(
            logits, uniform, mask=mask, ignore_index=ignore_index, xp=xp))
        loss = sophia_core.masked_mean_cross_entropy(
            logits, labels, ignore_index=ignore_index, xp=xp)
    grads = tape.gradient(loss, tf_vars, unconnected_gradients=tf.UnconnectedGradients.ZERO)
    return _dense(grads), sophia_core.num_positions(labels, ignore_index=ignore_index, xp=xp)


def gnb_global(grads, positions):
    """The global mean ``ghat`` and global ``N`` from every replica's local ones.

    Called inside ``strategy.run`` (outside any ``tf.cond``: it communicates).
    """
    local = tf.cast(positions, tf.float64)
    # Separate reductions: an all-reduce packs its list, so one dtype each.
    summed = replica_sum([g * tf.cast(local, g.dtype) for g in grads])
    total = replica_sum([local])[0]
    return [g / tf.cast(tf.maximum(total, 1.0), g.dtype) for g in summed], total


def _hvp(loss_fn: Callable[[], Any], tf_vars: list[tf.Variable], probes: list[tf.Tensor],
         method: str) -> list[tf.Tensor]:
    zero = tf.UnconnectedGradients.ZERO
    if method == "forward_over_reverse":
        with tf.autodiff.ForwardAccumulator(primals=tf_vars, tangents=probes) as accumulator:
            with tf.GradientTape(watch_accessed_variables=False) as tape:
                tape.watch(tf_vars)
                loss = loss_fn()
            grads = tape.gradient(loss, tf_vars, unconnected_gradients=zero)
        return _dense(accumulator.jvp(grads, unconnected_gradients=zero))
    if method == "reverse_over_reverse":
        with tf.GradientTape(watch_accessed_variables=False) as outer:
            outer.watch(tf_vars)
            with tf.GradientTape(watch_accessed_variables=False) as inner:
                inner.watch(tf_vars)
                loss = loss_fn()
            grads = _dense(inner.gradient(loss, tf_vars, unconnected_gradients=zero))
        return _dense(outer.gradient(grads, tf_vars, output_gradients=probes,
                                     unconnected_gradients=zero))
    raise ValueError(
        f"hvp must be 'forward_over_reverse' or 'reverse_over_reverse', got {method!r}"
    )


def hutchinson_hessian(
    loss_fn: Callable[[], Any],
    variables: Sequence[Any],
    *,
    n_probes: int = 1,
    probe: str = "gaussian",
    generator: tf.random.Generator | None = None,
    seed: Any = None,
    hvp: str = "forward_over_reverse",
) -> list[tf.Tensor]:
    r"""Sophia-H's estimate :math:`\hat h = \frac1n\sum_j u_j \odot H u_j`, per variable.

    ``loss_fn()`` returns a scalar loss computed from ``variables``. The
    Hessian-vector products are forward-over-reverse
    (``tf.autodiff.ForwardAccumulator`` over a ``GradientTape``) or, with
    ``hvp="reverse_over_reverse"``, nested tapes. Under data parallelism
    the caller averages the returned estimates over replicas if the loss is
    a per-replica mean.
    """
    sophia_core.validate_hyperparameters(n_probes=n_probes, probe=probe)
    tf_vars = _tf_variables(variables)
    kind = "uniform" if probe == "rademacher" else "normal"
    seeds = _seeds(seed, n_probes * len(tf_vars))
    probes_per_var: list[list[tf.Tensor]] = [[] for _ in tf_vars]
    hvps_per_var: list[list[tf.Tensor]] = [[] for _ in tf_vars]
    for j in range(n_probes):
        probes = []
        for i, v in enumerate(tf_vars):
            dtype = sophia_core.compute_dtype(v.dtype, xp=xp)
            noise = _noise(kind, v.shape, dtype, generator, seeds[j * len(tf_vars) + i])
            probes.append(tf.cast(sophia_core.probe_from_noise(noise, probe=probe, xp=xp),
                                  v.dtype))
        for i, hu in enumerate(_hvp(loss_fn, tf_vars, probes, hvp)):
            probes_per_var[i].append(probes[i])
            hvps_per_var[i].append(hu)
    return [
        sophia_core.hutchinson_estimate(us, hus, xp=xp)
        for us, hus in zip(probes_per_var, hvps_per_var, strict=True)
    ]
