"""The core's own tests (tests/core), run with ``xp`` = the TensorFlow shim.

Every ``test_*`` function of ``tests/core/test_*.py`` whose arguments are
among ``xp`` and ``dtype_name`` runs here on the shim. The tests themselves
may create arrays with functions the core does not use (``asarray``, ...):
those come from ``tf.experimental.numpy``, but only for the tests; a core
module reaching for a function outside ``NAMESPACE_FUNCTIONS`` fails loudly.
"""

from __future__ import annotations

import importlib.util
import inspect
import pathlib
import sys

import pytest
from tf_support import tf

import sophia_core  # noqa: F401 - its submodules are patched below
from sophia_tf import tf_namespace

CORE_TESTS = pathlib.Path(__file__).parent.parent / "core"
ARGUMENTS = {"xp", "dtype_name"}


class _TestNamespace:
    """The shim, plus tf.experimental.numpy for test code only."""

    def __getattr__(self, name):
        if hasattr(tf_namespace, name):
            return getattr(tf_namespace, name)
        caller = sys._getframe(1).f_globals.get("__name__", "")
        if caller.startswith("sophia_core"):
            raise AttributeError(
                f"sophia_core used xp.{name}, which is not in NAMESPACE_FUNCTIONS "
                "(add it there and to sophia_tf's shim)"
            )
        return getattr(tf.experimental.numpy, name)


def _core_tests():
    cases = []
    for path in sorted(CORE_TESTS.glob("test_*.py")):
        spec = importlib.util.spec_from_file_location(f"_core_on_tf_{path.stem}", path)
        module = importlib.util.module_from_spec(spec)
        try:
            spec.loader.exec_module(module)
        except Exception as exc:  # noqa: BLE001 - report, do not hide
            cases.append(pytest.param(None, exc, None, id=f"{path.stem}::<import>"))
            continue
        for name, function in vars(module).items():
            if not name.startswith("test_") or not callable(function):
                continue
            parameters = set(inspect.signature(function).parameters)
            if "xp" in parameters and parameters <= ARGUMENTS:
                dtypes = ["float32", "float64"] if "dtype_name" in parameters else [None]
                cases.extend(
                    pytest.param(function, None, dtype, id=f"{path.stem}::{name}-{dtype}")
                    for dtype in dtypes
                )
    return cases


CASES = _core_tests()


@pytest.mark.skipif(not CASES, reason="tests/core has no test taking xp on this branch")
@pytest.mark.parametrize(
    "function,error,dtype_name", CASES or [pytest.param(None, None, None, id="none")]
)
def test_core_test_on_tf_shim(function, error, dtype_name, monkeypatch):
    if error is not None:
        raise error
    # The core tests let array-api-compat find the namespace; it cannot find
    # one for TF tensors, so stand in for that lookup exactly as sophia_tf
    # does when it passes ``xp=`` explicitly.
    def namespace_of(*arrays, xp=None):
        return tf_namespace if xp is None else xp

    for module in list(sys.modules.values()):
        if getattr(module, "__name__", "").startswith("sophia_core.") and hasattr(
                module, "namespace_of"):
            monkeypatch.setattr(module, "namespace_of", namespace_of)
    kwargs = {"xp": _TestNamespace()}
    if dtype_name is not None:
        kwargs["dtype_name"] = dtype_name
    function(**kwargs)
