"""Sophia for Keras 3 and TensorFlow.

- :class:`SophiaG`, :class:`SophiaH`: Keras optimizers (``compile``/``fit``,
  ``apply_gradients``, ``tf.function``, ``jit_compile``, saving). The update
  itself also runs under the JAX and torch Keras backends.
- :func:`gnb_hessian`, :func:`hutchinson_hessian`: Hessian estimates with
  ``tf.GradientTape`` (TensorFlow backend), for ``update_hessian``.
- :class:`SophiaTrainStep`: a ``keras.Model`` mixin that refreshes the
  Hessian on schedule inside ``fit`` (TensorFlow backend).
- ``tf_namespace``: the array-namespace shim the core runs on.

The math lives in :mod:`sophia_core`; this package maps names, keeps state
and supplies autodiff and noise.
"""

from __future__ import annotations

import keras

from ._optimizer import KERAS_NAMES, Sophia, SophiaG, SophiaH, backend_namespace

__all__ = [
    "KERAS_NAMES",
    "Sophia",
    "SophiaG",
    "SophiaH",
    "SophiaTrainStep",
    "backend_namespace",
    "gnb_hessian",
    "hutchinson_hessian",
    "refresh_hessian",
    "tf_namespace",
]

_TF_ONLY = {
    "tf_namespace": "._namespace",
    "gnb_hessian": "._estimators",
    "hutchinson_hessian": "._estimators",
    "SophiaTrainStep": "._fit",
    "refresh_hessian": "._fit",
}


def __getattr__(name):
    """TensorFlow-only parts load on first use, so other Keras backends never import TF."""
    if name in _TF_ONLY:
        if keras.backend.backend() != "tensorflow" and name != "tf_namespace":
            raise AttributeError(
                f"sophia_tf.{name} needs the TensorFlow Keras backend "
                f"(KERAS_BACKEND is {keras.backend.backend()!r})"
            )
        import importlib

        return getattr(importlib.import_module(_TF_ONLY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
