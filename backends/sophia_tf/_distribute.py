"""tf.distribute glue: writes into optimizer variables from any context."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import tensorflow as tf

__all__ = ["assign_everywhere", "replica_sum"]


def _tf_variable(variable: Any) -> Any:
    return variable if isinstance(variable, tf.Variable) else variable.value


def assign_everywhere(optimizer: Any, pairs: Sequence[tuple[Any, Any]],
                      fold: Callable[[Any, Any], Any]) -> None:
    """``h.assign(fold(h, x))`` for each ``(h, x)``, on every replica.

    Works outside any strategy, in cross-replica context and inside
    ``strategy.run`` (through a merge call, as Keras's own updates do);
    ``x`` must then hold the same value on every replica.
    """
    strategy = getattr(optimizer, "_distribution_strategy", None) or tf.distribute.get_strategy()

    def merged(distribution, pairs):
        for h, x in pairs:
            distribution.extended.update(
                _tf_variable(h), lambda var, value: var.assign(fold(var.read_value(), value)),
                args=(x,), group=False,
            )

    tf.__internal__.distribute.interim.maybe_merge_call(merged, strategy, list(pairs))


def replica_sum(values: Sequence[Any]) -> list[Any]:
    """Sum ``values`` over replicas (inside ``strategy.run``); identity outside."""
    context = tf.distribute.get_replica_context()
    if context is None or context.num_replicas_in_sync == 1:
        return list(values)
    return context.all_reduce(tf.distribute.ReduceOp.SUM, list(values))
