"""The array namespace ``sophia_core`` runs on in Keras: ``keras.ops``, on every backend.

It holds exactly :data:`sophia_core.NAMESPACE_FUNCTIONS` with the array
API's signatures, most of them ``keras.ops`` functions unchanged; dtypes are
the backend's own (``tf.float32``, ``jnp.float32``, ``torch.float32``), so the
core compares them with ``tensor.dtype``. Python operators on the backend's
tensors do the rest (``b1 * m``, ``x[..., None]``, ``!=``, ``&``); a Python
number there takes the tensor's dtype, as numpy's weak scalars do. Keras
3.15 does not always (on torch ``ops.maximum`` computes float64 tensors in
float32), so ``clip`` and ``where`` make Python numbers tensors of the
array's dtype first, and ``clip`` is ``ops.clip`` (NaN stays NaN).
"""

from __future__ import annotations

import math
import types
import warnings

import keras
import numpy as np
from keras import ops

from sophia_core import NAMESPACE_FUNCTIONS

__all__ = ["keras_namespace"]


def _native(name: str):
    """The backend's dtype object for ``name`` (numpy's float64 on JAX without x64)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # JAX without x64 warns, and makes float32
        dtype = ops.zeros((), name).dtype
    return dtype if keras.backend.standardize_dtype(dtype) == name else np.dtype(name)


def _like(value, array):
    """A Python number as a tensor of ``array``'s dtype; tensors unchanged."""
    return ops.convert_to_tensor(value, array.dtype) if isinstance(value, int | float) else value


def astype(x, dtype, /, *, copy=True, device=None):
    return ops.cast(x, dtype)


def clip(x, /, min=None, max=None):  # noqa: A002 - the array API's names; floats only
    return ops.clip(x, _like(-math.inf if min is None else min, x),
                    _like(math.inf if max is None else max, x))


def concat(arrays, /, *, axis=0):
    return ops.concatenate(list(arrays), axis=axis)


def isdtype(dtype, kind):
    # The core asks "real floating" only; the other array-API kinds are not needed.
    if kind != "real floating":
        raise ValueError(f"sophia_tf's namespace knows the kind 'real floating', not {kind!r}")
    return "float" in keras.backend.standardize_dtype(dtype)


def sum(x, /, *, axis=None, dtype=None, keepdims=False):  # noqa: A001
    return ops.sum(x if dtype is None else ops.cast(x, dtype), axis=axis, keepdims=keepdims)


def where(condition, x1, x2, /):
    return ops.where(condition, _like(x1, x2), _like(x2, x1))


_OWN = {"astype": astype, "clip": clip, "concat": concat, "isdtype": isdtype, "sum": sum,
        "where": where, **{name: _native(name) for name in ("float32", "float64", "int32")}}
#: The namespace: exactly ``sophia_core.NAMESPACE_FUNCTIONS``, nothing else.
keras_namespace = types.SimpleNamespace(
    **{name: _OWN[name] if name in _OWN else getattr(ops, name) for name in NAMESPACE_FUNCTIONS})
