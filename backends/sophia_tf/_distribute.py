"""``tf.distribute`` glue: the only cross-replica code.

Under a TensorFlow ``MirroredStrategy`` each replica sees its slice of the
batch; Sophia-G's estimate needs the global mean gradient and the global
count (SPEC section 3). Other Keras backends (and TensorFlow without a
strategy) hold global arrays: every function here is then the identity.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import keras
from keras import ops

__all__ = ["distributed", "global_batch_rows", "global_mean", "replica_sum"]


def _replicas() -> Any:
    """TensorFlow's replica context when several replicas run in sync, else None."""
    if keras.backend.backend() != "tensorflow":
        return None
    import tensorflow as tf

    context = tf.distribute.get_replica_context()
    return context if context is not None and context.num_replicas_in_sync > 1 else None


def distributed() -> bool:
    """Whether this code runs on one of several replicas (inside ``strategy.run``)."""
    return _replicas() is not None


def global_batch_rows(draw: Callable[[Any], Any], like: Any) -> Any:
    """Noise shaped like ``like`` (a batch): ``draw(shape)`` for one replica's rows.

    On several replicas every one draws the noise of the whole global batch
    (replicas hold equal consecutive slices of it) and keeps its own rows,
    so the sampled labels equal the single-device ones.
    """
    context = _replicas()
    if context is None:
        return draw(ops.shape(like))
    import tensorflow as tf

    rows = tf.shape(like)[0]
    full = draw(tf.concat([[rows * context.num_replicas_in_sync], tf.shape(like)[1:]], 0))
    start = tf.cast(context.replica_id_in_sync_group, rows.dtype) * rows
    return tf.ensure_shape(full[start:start + rows], like.shape)


def replica_sum(values: Sequence[Any]) -> list[Any]:
    """Sum ``values`` over replicas (inside ``strategy.run``); identity elsewhere."""
    context = _replicas()
    if context is None:
        return list(values)
    import tensorflow as tf

    return context.all_reduce(tf.distribute.ReduceOp.SUM, list(values))


def global_mean(grads: Sequence[Any], positions: Any) -> tuple[list[Any], Any]:
    """The global mean gradient and global count from every replica's local ones.

    Outside any ``tf.cond``: it communicates.
    """
    if _replicas() is None:
        return list(grads), positions
    local = ops.cast(positions, "float64")
    # Separate reductions: an all-reduce packs its list, so one dtype each.
    summed = replica_sum([g * ops.cast(local, g.dtype) for g in grads])
    total = replica_sum([local])[0]
    return [g / ops.cast(ops.maximum(total, 1.0), g.dtype) for g in summed], total
