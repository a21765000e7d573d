"""Host-side messages from jitted code: one-time warnings and counter limits.

Inside ``jax.jit`` a condition is an array; these helpers put a
``jax.debug.callback`` in a ``lax.cond`` branch, so the host is reached only
when the condition holds (the callback re-checks it, since ``vmap`` turns a
batched ``cond`` into a select that runs both branches). Outside a trace the
condition is checked directly.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

__all__ = ["OneTimeWarnings", "is_traced", "raise_if"]


def is_traced(*values: Any) -> bool:
    return any(isinstance(v, jax.core.Tracer) for v in jax.tree.leaves(values))


def _on_host(condition: Any, fn: Callable[..., None], *args: Any) -> None:
    """``fn(*host_args)`` on the host where ``condition`` holds."""
    def callback(condition: Any, *host_args: Any) -> None:
        if bool(np.any(condition)):
            fn(*host_args)

    if not is_traced(condition, *args):
        callback(condition, *args)
        return
    jax.lax.cond(condition, lambda: jax.debug.callback(callback, condition, *args),
                 lambda: None)


class OneTimeWarnings:
    """``UserWarning``s an optimizer gives at most once each (per kind)."""

    def __init__(self) -> None:
        self.given: set[str] = set()

    def warn(self, kind: str, condition: Any, message: Callable[..., str], *args: Any) -> None:
        def emit(*host_args: Any) -> None:
            if kind not in self.given:
                self.given.add(kind)
                warnings.warn(message(*host_args), UserWarning, stacklevel=2)

        _on_host(condition, emit, *args)


def raise_if(condition: Any, error: type[Exception], message: str) -> None:
    """Raise ``error(message)`` on the host where ``condition`` holds.

    Under ``jax.jit`` the exception surfaces as a runtime error of the
    jitted call whose text contains ``message``.
    """
    def fail() -> None:
        raise error(message)

    _on_host(condition, fail)
