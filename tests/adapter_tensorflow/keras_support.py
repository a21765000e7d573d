"""Set-up shared by the Keras adapter's tests (imported by each test module first).

The Keras backend's framework is required in the nox ``tensorflow`` session
and skipped elsewhere. On TensorFlow the process gets two logical CPU
devices (for MirroredStrategy) before the runtime starts.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
from backend_support import require

BACKEND = os.environ["KERAS_BACKEND"]  # set by conftest.py
require({"tensorflow": "tensorflow", "jax": "jax", "torch": "torch"}[BACKEND])

import keras  # noqa: E402

__all__ = ["BACKEND", "LOGICAL_CPUS", "bitwise_equal", "float64_ok", "keras", "numpy_of",
           "tensorflow_only"]

#: Marks tests of TensorFlow-only features (tf.distribute, tf.function).
tensorflow_only = pytest.mark.skipif(BACKEND != "tensorflow",
                                     reason="a TensorFlow feature (tf.distribute, tf.function)")


def _logical_cpus() -> list[str]:
    if BACKEND != "tensorflow":
        return []
    import tensorflow as tf

    cpus = tf.config.list_physical_devices("CPU")
    try:
        tf.config.set_logical_device_configuration(
            cpus[0], [tf.config.LogicalDeviceConfiguration()] * 2)
    except RuntimeError:
        pass  # the runtime already started (another module configured it)
    return [device.name for device in tf.config.list_logical_devices("CPU")]


LOGICAL_CPUS = _logical_cpus()


def float64_ok() -> bool:
    """Whether this backend computes in float64 (JAX only with x64)."""
    return keras.backend.standardize_dtype(keras.ops.zeros((), "float64").dtype) == "float64"


def numpy_of(value) -> np.ndarray:
    """A tensor, Keras variable or array as numpy (bfloat16 as float32)."""
    if isinstance(value, np.ndarray | np.generic | int | float):
        return np.asarray(value)
    tensor = keras.ops.convert_to_tensor(value)
    if keras.backend.standardize_dtype(tensor.dtype) == "bfloat16":
        tensor = keras.ops.cast(tensor, "float32")
    # keras's convert_to_numpy warns under numpy 2 on TensorFlow and torch
    if BACKEND == "tensorflow":
        return tensor.numpy()
    if BACKEND == "torch":
        return tensor.detach().cpu().numpy()
    return np.asarray(tensor)


def bitwise_equal(a, b) -> bool:
    a, b = numpy_of(a), numpy_of(b)
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()
