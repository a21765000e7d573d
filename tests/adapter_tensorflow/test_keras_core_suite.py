"""The core's own tests (tests/core), run with ``xp`` = the keras.ops namespace.

Every ``test_*`` function of ``tests/core/test_*.py`` whose arguments are
among ``xp`` and ``dtype_name`` runs here on :data:`sophia_tf.keras_namespace`.
The tests themselves may create arrays with functions the core does not use
(``asarray``, ...): those come from the backend's numpy-like module
(``tf.experimental.numpy``, ``jax.numpy``, ``array_api_compat.torch``), for
test code only; a core module reaching for a function outside
``NAMESPACE_FUNCTIONS`` fails loudly.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import pathlib
import sys

import numpy as np
import pytest
from keras_support import BACKEND, float64_ok

from sophia_core import namespace_of as find_namespace
from sophia_tf import keras_namespace

CORE_TESTS = pathlib.Path(__file__).parent.parent / "core"
ARGUMENTS = {"xp", "dtype_name"}
TEST_ARRAYS = {"tensorflow": "tensorflow.experimental.numpy", "jax": "jax.numpy",
               "torch": "array_api_compat.torch"}[BACKEND]


class _TestNamespace:
    """The keras.ops namespace, plus the backend's numpy-like module for test code."""

    def __getattr__(self, name):
        if hasattr(keras_namespace, name):
            return getattr(keras_namespace, name)
        caller = sys._getframe(1).f_globals.get("__name__", "")
        if caller.startswith("sophia_core"):
            raise AttributeError(
                f"sophia_core used xp.{name}, which is not in NAMESPACE_FUNCTIONS "
                "(add it there and to sophia_tf's namespace)")
        return getattr(importlib.import_module(TEST_ARRAYS), name)


def _core_tests():
    cases = []
    for path in sorted(CORE_TESTS.glob("test_*.py")):
        spec = importlib.util.spec_from_file_location(f"_core_on_keras_{path.stem}", path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # as an import does (dataclasses look it up)
        try:
            spec.loader.exec_module(module)
        except Exception as exc:  # noqa: BLE001 - report, do not hide
            del sys.modules[spec.name]
            cases.append(pytest.param(None, exc, None, id=f"{path.stem}::<import>"))
            continue
        for name, function in vars(module).items():
            if not name.startswith("test_") or not callable(function):
                continue
            parameters = set(inspect.signature(function).parameters)
            if "xp" in parameters and parameters <= ARGUMENTS:
                dtypes = (["float32", "float64"] if float64_ok() else ["float32"]) \
                    if "dtype_name" in parameters else [None]
                cases.extend(
                    pytest.param(function, None, dtype, id=f"{path.stem}::{name}-{dtype}")
                    for dtype in dtypes)
    return cases


CASES = _core_tests()


@pytest.mark.parametrize("function,error,dtype_name", CASES)
def test_core_test_on_keras_namespace(function, error, dtype_name, monkeypatch):
    if error is not None:
        raise error
    # The core tests let array-api-compat find the namespace; it cannot for
    # TensorFlow tensors, so stand in for that lookup exactly as sophia_tf
    # does when it passes ``xp=`` explicitly (numpy references stay numpy).
    def namespace_of(*arrays, xp=None):
        if xp is None and not any(isinstance(a, np.ndarray | np.generic) for a in arrays):
            return keras_namespace
        return find_namespace(*arrays, xp=xp)

    for name, module in list(sys.modules.items()):
        if name.startswith("sophia_core.") and hasattr(module, "namespace_of"):
            monkeypatch.setattr(module, "namespace_of", namespace_of)
    kwargs = {"xp": _TestNamespace()}
    if dtype_name is not None:
        kwargs["dtype_name"] = dtype_name
    function(**kwargs)

