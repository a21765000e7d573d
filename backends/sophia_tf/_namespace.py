"""The smallest array namespace over TensorFlow ops that ``sophia_core`` needs.

TensorFlow has no array-API namespace (array-api-compat does not cover it and
``tf.experimental.numpy`` lacks ``astype``), so this module builds one holding
exactly :data:`sophia_core.NAMESPACE_FUNCTIONS`, with the array API's
signatures, over plain TensorFlow ops. It does not call
``tf.experimental.numpy.experimental_enable_numpy_behavior`` (that would
change every tensor in the process).

Python operators on TF tensors already do what the core needs: a Python float
or int next to a tensor takes the tensor's dtype (as numpy's weak scalars do),
``x[..., None]`` inserts an axis, ``==``/``!=``/``<`` compare elementwise, and
``&`` is a logical and on bool tensors. The functions below convert Python
scalars the same way where TensorFlow would not (``where``, ``clip``).
"""

from __future__ import annotations

import builtins
import types
from typing import Any

import tensorflow as tf

from sophia_core import NAMESPACE_FUNCTIONS

__all__ = ["tf_namespace"]

_KINDS = {
    "bool": lambda d: d == tf.bool,
    "signed integer": lambda d: d.is_integer and not d.is_unsigned,
    "unsigned integer": lambda d: d.is_integer and d.is_unsigned,
    "integral": lambda d: d.is_integer,
    "real floating": lambda d: d.is_floating,
    "complex floating": lambda d: d.is_complex,
    "numeric": lambda d: (d.is_integer or d.is_floating or d.is_complex),
}


def _like(value: Any, dtype: tf.DType) -> Any:
    """``value`` as a tensor of ``dtype``: Python scalars take the array's dtype."""
    if isinstance(value, (bool, int, float)):
        return tf.constant(value, dtype=dtype)
    return tf.cast(value, dtype)


def abs(x, /):  # noqa: A001 - the array API's name
    return tf.math.abs(x)


def arange(start, /, stop=None, step=1, *, dtype=None, device=None):
    if dtype is None:
        numbers = (start, stop, step)
        integral = builtins.all(isinstance(n, int) or n is None for n in numbers)
        dtype = tf.int64 if integral else tf.float32
    if stop is None:
        return tf.range(start, delta=step, dtype=dtype)
    return tf.range(start, stop, step, dtype=dtype)


def argmax(x, /, *, axis=None, keepdims=False):
    if axis is None:
        x = tf.reshape(x, [-1])
        axis = 0
    out = tf.math.argmax(x, axis=axis, output_type=tf.int64)
    if keepdims:
        out = tf.expand_dims(out, axis)
    return out


def astype(x, dtype, /, *, copy=True, device=None):
    # Tensors are immutable: a cast to the same dtype is the tensor itself.
    return tf.cast(x, dtype)


def clip(x, /, min=None, max=None):  # noqa: A002 - the array API's names
    if min is not None:
        x = tf.math.maximum(x, _like(min, x.dtype))
    if max is not None:
        x = tf.math.minimum(x, _like(max, x.dtype))
    return x


def concat(arrays, /, *, axis=0):
    return tf.concat(list(arrays), axis=axis)


def exp(x, /):
    return tf.math.exp(x)


def isdtype(dtype, kind):
    dtype = tf.as_dtype(dtype)
    if isinstance(kind, tuple):
        return builtins.any(isdtype(dtype, k) for k in kind)
    if isinstance(kind, str):
        if kind not in _KINDS:
            raise ValueError(f"unknown dtype kind {kind!r}")
        return builtins.bool(_KINDS[kind](dtype))
    return dtype == tf.as_dtype(kind)


def isfinite(x, /):
    return tf.math.is_finite(x)


def log(x, /):
    return tf.math.log(x)


def max(x, /, *, axis=None, keepdims=False):  # noqa: A001
    return tf.math.reduce_max(x, axis=axis, keepdims=keepdims)


def ones_like(x, /, *, dtype=None, device=None):
    return tf.ones_like(x, dtype=dtype)


def reshape(x, /, shape, *, copy=None):
    return tf.reshape(x, shape)


def sort(x, /, *, axis=-1, descending=False, stable=True):
    return tf.sort(x, axis=axis, direction="DESCENDING" if descending else "ASCENDING")


def sum(x, /, *, axis=None, dtype=None, keepdims=False):  # noqa: A001
    if dtype is not None:
        x = tf.cast(x, dtype)
    return tf.math.reduce_sum(x, axis=axis, keepdims=keepdims)


def where(condition, x1, x2, /):
    if not isinstance(x1, (bool, int, float)):
        x2 = _like(x2, x1.dtype)
    elif not isinstance(x2, (bool, int, float)):
        x1 = _like(x1, x2.dtype)
    return tf.where(condition, x1, x2)


def zeros_like(x, /, *, dtype=None, device=None):
    return tf.zeros_like(x, dtype=dtype)


float32 = tf.float32
float64 = tf.float64
int32 = tf.int32

#: The namespace: exactly ``sophia_core.NAMESPACE_FUNCTIONS``, nothing else.
tf_namespace = types.SimpleNamespace(**{name: globals()[name] for name in NAMESPACE_FUNCTIONS})
