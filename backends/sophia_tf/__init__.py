"""Sophia for Keras 3, on the TensorFlow, JAX and torch backends.

:class:`SophiaG` and :class:`SophiaH` are Keras optimizers; :class:`Sequential`,
:class:`Model` and the mixin :class:`SophiaTrainStep` refresh the Hessian inside
``fit``; :func:`gnb_hessian`, :func:`hutchinson_hessian` and :func:`refresh_hessian`
serve custom loops; :data:`keras_namespace` is the ``keras.ops`` namespace the
core runs on. The math is :mod:`sophia_core`'s. (The name ``sophia_tf`` is
historical: TensorFlow is needed only on the TensorFlow Keras backend.)
"""

from __future__ import annotations

from ._estimators import gnb_hessian, hutchinson_hessian
from ._fit import Model, Sequential, SophiaTrainStep, refresh_hessian
from ._namespace import keras_namespace
from ._optimizer import KERAS_NAMES, REFRESH_FIX, Sophia, SophiaG, SophiaH

__all__ = ["KERAS_NAMES", "REFRESH_FIX", "Model", "Sequential", "Sophia", "SophiaG", "SophiaH",
           "SophiaTrainStep", "gnb_hessian", "hutchinson_hessian", "keras_namespace",
           "refresh_hessian"]
