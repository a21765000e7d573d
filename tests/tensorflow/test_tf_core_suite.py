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
from sophia_tf import tf_namespace
from tf_support import tf

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
            cases.append(pytest.param(None, exc, id=f"{path.stem}::<import>"))
            continue
        for name, function in vars(module).items():
            if not name.startswith("test_") or not callable(function):
                continue
            parameters = set(inspect.signature(function).parameters)
            if "xp" in parameters and parameters <= ARGUMENTS:
                cases.append(pytest.param(function, None, id=f"{path.stem}::{name}"))
    return cases


CASES = _core_tests()


@pytest.mark.skipif(not CASES, reason="tests/core has no test taking xp on this branch")
@pytest.mark.parametrize("dtype_name", ["float32", "float64"])
@pytest.mark.parametrize("function,error", CASES or [pytest.param(None, None, id="none")])
def test_core_test_on_tf_shim(function, error, dtype_name):
    if error is not None:
        raise error
    kwargs = {"xp": _TestNamespace()}
    if "dtype_name" in inspect.signature(function).parameters:
        kwargs["dtype_name"] = dtype_name
    elif dtype_name == "float64":
        pytest.skip("does not take dtype_name")
    function(**kwargs)
