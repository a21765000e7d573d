"""The array namespace ``sophia_core`` runs on inside Keras: ``keras.ops``.

Keras 3 runs on TensorFlow, JAX and torch; ``keras.ops`` is the one API over
all three, so the optimizer's update, the Hessian fold and the estimators'
array math run through this namespace on every backend. It holds exactly
:data:`sophia_core.NAMESPACE_FUNCTIONS`, with the array API's signatures;
most are ``keras.ops`` functions unchanged. Dtypes are the backend's own
dtype objects (``tf.float32``, ``jnp.float32``, ``torch.float32``), so the
core can compare them with ``tensor.dtype``.

Python operators on the backend's tensors do the rest (``b1 * m``,
``x[..., None]``, ``labels != ignore_index``, ``&``): a Python number next
to a tensor takes the tensor's dtype on all three backends. ``keras.ops``
does not always do that (Keras 3.15 on torch computes ``ops.maximum`` of
float64 tensors in float32), so ``clip`` and ``where`` convert Python numbers
to the array's dtype first, as numpy's weak scalars are, and ``clip`` is
``ops.clip`` (which keeps NaN and the dtype) rather than maximum/minimum.
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

_KINDS = {
    "bool": lambda name: name == "bool",
    "signed integer": lambda name: name.startswith("int"),
    "unsigned integer": lambda name: name.startswith("uint"),
    "integral": lambda name: "int" in name,
    "real floating": lambda name: "float" in name,
    "complex floating": lambda name: name.startswith("complex"),
    "numeric": lambda name: name != "bool",
}


def _native(name: str):
    """The backend's own dtype object for a Keras dtype name.

    JAX without x64 has no float64 (it makes float32 instead): the name then
    maps to numpy's float64, which no tensor there has.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dtype = ops.zeros((), name).dtype
    return dtype if keras.backend.standardize_dtype(dtype) == name else np.dtype(name)


def astype(x, dtype, /, *, copy=True, device=None):
    return ops.cast(x, dtype)


def _like(value, array):
    """A Python number as a tensor of ``array``'s dtype; tensors unchanged."""
    if isinstance(value, (bool, int, float)):
        return ops.convert_to_tensor(value, array.dtype)
    return value


def clip(x, /, min=None, max=None):  # noqa: A002 - the array API's names
    low = -math.inf if min is None else min  # the core clips floating arrays only
    high = math.inf if max is None else max
    return ops.clip(x, _like(low, x), _like(high, x))


def concat(arrays, /, *, axis=0):
    return ops.concatenate(list(arrays), axis=axis)


def isdtype(dtype, kind):
    name = keras.backend.standardize_dtype(dtype)
    if isinstance(kind, tuple):
        return any(isdtype(dtype, k) for k in kind)
    if isinstance(kind, str):
        if kind not in _KINDS:
            raise ValueError(f"unknown dtype kind {kind!r}")
        return _KINDS[kind](name)
    return name == keras.backend.standardize_dtype(kind)


def sum(x, /, *, axis=None, dtype=None, keepdims=False):  # noqa: A001
    if dtype is not None:
        x = ops.cast(x, dtype)
    return ops.sum(x, axis=axis, keepdims=keepdims)


def where(condition, x1, x2, /):
    return ops.where(condition, _like(x1, x2), _like(x2, x1))


_OWN = {"astype": astype, "clip": clip, "concat": concat, "isdtype": isdtype, "sum": sum,
        "where": where}

#: The namespace: exactly ``sophia_core.NAMESPACE_FUNCTIONS``, nothing else.
keras_namespace = types.SimpleNamespace(**{
    name: _OWN[name] if name in _OWN
    else _native(name) if name in ("float32", "float64", "int32")
    else getattr(ops, name)
    for name in NAMESPACE_FUNCTIONS
})
