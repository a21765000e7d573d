"""Portable state files for the optax state (``sophia_core.portable``, no pickle)."""

from __future__ import annotations

import numbers
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ._transform import SophiaState, sophia_state

__all__ = ["export_state", "import_state"]


def _portable() -> Any:
    from sophia_core import portable  # written by the conformance work

    return portable


def export_state(path: str | os.PathLike[str], opt_state: Any, *,
                 hyperparameters: dict[str, Any] | None = None) -> None:
    """Write the Sophia state inside ``opt_state`` to a portable file.

    Tensors are listed in ``jax.tree.leaves(params)`` order. ``hyperparameters``
    (e.g. ``tx.hyperparameters``) are stored with their Python values; array
    or schedule values are left out.
    """
    state = sophia_state(opt_state)
    hyper = {
        k: v for k, v in (hyperparameters or {}).items()
        if v is None or isinstance(v, (numbers.Number, str))
    }
    _portable().save_state(
        path,
        step=int(state.count),
        ms=[np.asarray(m) for m in jax.tree.leaves(state.m)],
        hs=[np.asarray(h) for h in jax.tree.leaves(state.h)],
        hyperparameters=hyper,
    )


def import_state(path: str | os.PathLike[str], opt_state: Any) -> Any:
    """``opt_state`` with its Sophia state's ``count``, ``m``, ``h`` read from ``path``.

    Shapes must match (ValueError otherwise); values are cast to the
    existing state's dtypes and placed with its shardings. The PRNG key is
    kept. Works wherever the Sophia state sits inside ``opt_state``.
    """
    old = sophia_state(opt_state)
    ms, treedef = jax.tree.flatten(old.m)
    hs = treedef.flatten_up_to(old.h)
    loaded = _portable().load_state(path, expect_shapes=[m.shape for m in ms])

    def place(value: np.ndarray, like: jax.Array) -> jax.Array:
        array = jnp.asarray(value, dtype=like.dtype)
        sharding = getattr(like, "sharding", None)
        return jax.device_put(array, sharding) if sharding is not None else array

    new = SophiaState(
        count=jnp.asarray(loaded.step, dtype=old.count.dtype),
        m=treedef.unflatten([place(v, m) for v, m in zip(loaded.ms, ms, strict=True)]),
        h=treedef.unflatten([place(v, h) for v, h in zip(loaded.hs, hs, strict=True)]),
        key=old.key,
    )
    return jax.tree.map(
        lambda x: new if isinstance(x, SophiaState) else x,
        opt_state,
        is_leaf=lambda x: isinstance(x, SophiaState),
    )
