"""Sophia for Keras 3, on the TensorFlow, JAX and torch backends.

- :class:`SophiaG`, :class:`SophiaH`: Keras optimizers (``compile``/``fit``,
  ``apply_gradients``, ``jit_compile``, saving, mixed precision, gradient
  accumulation, ``MirroredStrategy`` on TensorFlow).
- :class:`Sequential`, :class:`Model`, :class:`SophiaTrainStep`: Keras
  models (or the mixin) whose ``fit`` refreshes the Hessian on schedule.
- :func:`gnb_hessian`, :func:`hutchinson_hessian`, :func:`refresh_hessian`:
  the estimates, for custom loops and train steps.
- :data:`keras_namespace`: the array namespace (``keras.ops``) the core runs on.

The math lives in :mod:`sophia_core`; this package maps names, keeps state
and supplies autodiff and noise. The package is named ``sophia_tf`` for
history: it needs TensorFlow only on the TensorFlow Keras backend.
"""

from __future__ import annotations

from ._estimators import gnb_hessian, hutchinson_hessian
from ._fit import Model, Sequential, SophiaTrainStep, refresh_hessian
from ._namespace import keras_namespace
from ._optimizer import KERAS_NAMES, REFRESH_FIX, Sophia, SophiaG, SophiaH

__all__ = [
    "KERAS_NAMES",
    "REFRESH_FIX",
    "Model",
    "Sequential",
    "Sophia",
    "SophiaG",
    "SophiaH",
    "SophiaTrainStep",
    "gnb_hessian",
    "hutchinson_hessian",
    "keras_namespace",
    "refresh_hessian",
]
