"""Portable state files for the optax state (``sophia_core.portable``, no pickle).

Tensors are named by their place in the parameter tree,
``jax.tree_util.keystr(path, simple=True, separator=".")`` (``{"a": {"w":
...}}`` gives ``"a.w"``, a list ``"0", "1", ...``), so a file is matched by
name, not by position, and other backends can read it.
"""

from __future__ import annotations

import numbers
import os
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ._transform import SophiaState, sophia_state

__all__ = ["export_state", "import_state"]

#: The state's counters a file carries (``sophia_core.portable`` counters).
_COUNTERS = ("hessian_refreshes", "rejected_hessian_coordinates", "gamma", "unclipped_share",
             "sign_momentum_streak")


def _portable() -> Any:
    from sophia_core import portable

    return portable


def _names(tree: Any) -> list[str]:
    return [jax.tree_util.keystr(path, simple=True, separator=".")
            for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def _number(value: jax.Array) -> int | float:
    value = np.asarray(value)
    return int(value) if np.issubdtype(value.dtype, np.integer) else float(value)


def export_state(path: str | os.PathLike[str], opt_state: Any, *,
                 hyperparameters: Mapping[str, Any] | None = None) -> None:
    """Write the Sophia state inside ``opt_state`` to a portable file.

    Each tensor is stored under its parameter's name (see the module
    docstring), with the counters of :class:`SophiaState`.
    ``hyperparameters`` (the core's names, e.g. the arguments you gave
    :func:`sophia_jax.sophia`) are stored where they are Python values;
    arrays and schedules are left out.
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
        names=_names(state.m),
        counters={k: _number(getattr(state, k)) for k in _COUNTERS},
    )


def import_state(path: str | os.PathLike[str], opt_state: Any) -> Any:
    """``opt_state`` with its Sophia state read from ``path``.

    Tensors are matched by name (a ValueError lists missing and unexpected
    ones; files without names, version 1, match by position); values are
    cast to the existing state's dtypes and placed with its shardings.
    Counters the file lacks keep their current values; the PRNG key is
    kept. Works wherever the Sophia state sits inside ``opt_state``.
    """
    old = sophia_state(opt_state)
    ms, treedef = jax.tree.flatten(old.m)
    hs = treedef.flatten_up_to(old.h)
    expect = dict(zip(_names(old.m), (m.shape for m in ms), strict=True))
    loaded = _portable().load_state(path, expect=expect)

    def place(value: Any, like: jax.Array) -> jax.Array:
        array = jnp.asarray(value, dtype=like.dtype)
        sharding = getattr(like, "sharding", None)
        return jax.device_put(array, sharding) if sharding is not None else array

    counters = {k: place(loaded.counters[k], getattr(old, k))
                for k in _COUNTERS if k in (loaded.counters or {})}
    new = old._replace(
        count=place(loaded.step, old.count),
        m=treedef.unflatten([place(v, m) for v, m in zip(loaded.ms, ms, strict=True)]),
        h=treedef.unflatten([place(v, h) for v, h in zip(loaded.hs, hs, strict=True)]),
        **counters,
    )
    return jax.tree.map(
        lambda x: new if isinstance(x, SophiaState) else x,
        opt_state,
        is_leaf=lambda x: isinstance(x, SophiaState),
    )
