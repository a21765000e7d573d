"""Set-up shared by the TensorFlow tests (imported by each test module first).

TensorFlow is required in the nox ``tensorflow`` session and skipped
elsewhere; the process gets two logical CPU devices (for MirroredStrategy)
before the TF runtime starts, and Keras runs on the TensorFlow backend.
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ["KERAS_BACKEND"] = "tensorflow"

import numpy as np  # noqa: E402
from backend_support import require  # noqa: E402

tf = require("tensorflow")
import keras  # noqa: E402

__all__ = ["LOGICAL_CPUS", "bitwise_equal", "keras", "numpy_of", "tf"]


def _two_logical_cpus() -> list[str]:
    cpus = tf.config.list_physical_devices("CPU")
    try:
        tf.config.set_logical_device_configuration(
            cpus[0], [tf.config.LogicalDeviceConfiguration()] * 2
        )
    except RuntimeError:
        pass  # the runtime already started (another module configured it)
    return [device.name for device in tf.config.list_logical_devices("CPU")]


LOGICAL_CPUS = _two_logical_cpus()


def numpy_of(value) -> np.ndarray:
    """A TF tensor, Keras variable or array as numpy."""
    if hasattr(value, "numpy"):
        value = value.numpy()
    return np.asarray(value)


def bitwise_equal(a, b) -> bool:
    a, b = numpy_of(a), numpy_of(b)
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()
