"""Sophia's Hessian refresh inside ``model.fit`` (TensorFlow backend).

``SophiaTrainStep`` is a mixin for ``keras.Model``: before each training
step it asks the optimizer whether a refresh is due (SPEC section 2: after
``t`` completed steps when ``t % k == 0``) and, if so, estimates the Hessian
on the current batch and folds it into ``h``; then it takes Keras's own step.
The noise is stateless, seeded by ``(sophia_seed, optimizer.iterations)``,
so a run resumed from a checkpoint draws the same labels or probes.
"""

from __future__ import annotations

from typing import Any

import keras
import tensorflow as tf

import sophia_core

from ._distribute import replica_sum
from ._estimators import gnb_global, gnb_local, hutchinson_hessian
from ._namespace import tf_namespace as xp
from ._optimizer import Sophia

__all__ = ["SophiaTrainStep", "refresh_hessian"]


def _labels_mask(y: Any, logits: Any, ignore_index: int) -> Any:
    """Which positions count: integer labels shaped like ``logits[..., 0]``."""
    if y is None or not isinstance(y, tf.Tensor) or not y.dtype.is_integer:
        return None
    if y.shape.rank != logits.shape.rank - 1:
        return None
    return y != tf.cast(ignore_index, y.dtype)


def _model_loss(model: Any, x: Any, y: Any, sample_weight: Any) -> Any:
    y_pred = model(x, training=True)
    return model._compute_loss(x=x, y=y, y_pred=y_pred, sample_weight=sample_weight,
                               training=True)


def refresh_hessian(model: Any, optimizer: Sophia, x: Any, y: Any = None,
                    sample_weight: Any = None, *, seed: int = 0,
                    ignore_index: int = sophia_core.IGNORE_INDEX) -> Any:
    """Refresh ``h`` on batch ``(x, y)`` if due; returns the bool ``due``.

    Sophia-G (``optimizer.estimator == "gnb"``) needs a model that outputs
    logits ``(..., V)``; integer labels ``y`` of shape ``(...)`` equal to
    ``ignore_index`` are masked out. Sophia-H differentiates the compiled loss
    twice. Works in eager mode, inside ``tf.function`` and inside
    ``strategy.run`` (estimates are reduced over replicas).
    """
    if not optimizer.built:
        optimizer.build(model.trainable_variables)
    variables = list(optimizer._trainable_variables)
    due = optimizer.hessian_refresh_due()
    seeds = tf.stack([tf.constant(seed, tf.int64), tf.cast(optimizer.iterations, tf.int64)])
    context = tf.distribute.get_replica_context()
    distributed = context is not None and context.num_replicas_in_sync > 1

    if optimizer.estimator == "gnb":
        def local():
            grads, positions = gnb_local(
                lambda: model(x, training=True), variables,
                mask=lambda logits: _labels_mask(y, logits, ignore_index),
                seed=seeds, ignore_index=ignore_index,
            )
            return [*grads, tf.cast(positions, tf.float64)]

        def finish(parts):
            grads, positions = parts[:-1], parts[-1]
            if distributed:
                grads, positions = gnb_global(grads, positions)
            return [sophia_core.gnb_estimate(g, positions, xp=xp) for g in grads]
    else:
        def local():
            return hutchinson_hessian(
                lambda: _model_loss(model, x, y, sample_weight), variables,
                n_probes=optimizer.n_probes, probe=optimizer.probe, seed=seeds,
            )

        def finish(parts):
            # Keras divides each replica's loss by the replica count: the sum
            # over replicas is the global estimate.
            return replica_sum(parts) if distributed else list(parts)

    if not distributed:
        def refresh():
            optimizer.update_hessian(finish(local()))
            return tf.constant(True)

        if tf.executing_eagerly():
            return refresh() if bool(due) else tf.constant(False)
        return tf.cond(due, refresh, lambda: tf.constant(False))

    # Communication cannot sit inside tf.cond under MirroredStrategy: compute
    # locally under the condition, then reduce and fold (masked) every step.
    def zeros():
        if optimizer.estimator == "gnb":  # gradients in the variables' dtypes, and N
            return [tf.zeros(v.shape, v.dtype) for v in variables] + [tf.constant(0.0, tf.float64)]
        return [tf.zeros(v.shape, sophia_core.compute_dtype(v.dtype, xp=xp)) for v in variables]

    parts = tf.cond(due, local, zeros)
    optimizer._fold_hessian(finish(parts), where=due)
    return due


class SophiaTrainStep:
    """Mixin for ``keras.Model`` that refreshes Sophia's Hessian inside ``fit``.

    Put it before the Keras model class::

        class Classifier(sophia_tf.SophiaTrainStep, keras.Sequential):
            pass

    With any optimizer other than :class:`sophia_tf.Sophia` (possibly inside
    a ``LossScaleOptimizer``) it changes nothing. ``sophia_seed`` seeds the
    estimator's noise.
    """

    sophia_seed: int = 0
    sophia_ignore_index: int = sophia_core.IGNORE_INDEX

    def train_step(self, data):
        optimizer = getattr(self, "optimizer", None)
        # Mixed precision wraps the optimizer in a LossScaleOptimizer.
        optimizer = getattr(optimizer, "inner_optimizer", optimizer)
        if isinstance(optimizer, Sophia):
            x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
            refresh_hessian(self, optimizer, x, y, sample_weight, seed=self.sophia_seed,
                            ignore_index=self.sophia_ignore_index)
        return super().train_step(data)
