"""Backends for tests: imported through the registry, required or skipped.

A backend listed in ``$SOPHIA_REQUIRED_BACKENDS`` (nox sets it) that does not
import is a failure; any other missing backend is skipped with a reason.
"""

from __future__ import annotations

import importlib
from typing import Any

import numpy as np
import pytest

from sophia_core.backends import BACKENDS, by_name, required_backends

__all__ = ["NAMESPACE_NAMES", "namespace", "require", "require_adapter", "to_numpy"]

#: Namespaces the core tests run on: those the session requires (nox), or,
#: in a plain pytest run, every namespace in the registry (missing ones skip).
NAMESPACE_NAMES = [
    b.name for b in BACKENDS
    if b.namespace is not None and (not required_backends() or b.name in required_backends())
]


def require(name: str) -> Any:
    """Import backend ``name``'s module: fail if required, else skip if missing."""
    backend = by_name(name)
    try:
        return importlib.import_module(backend.module)
    except ImportError as exc:
        if backend.name in required_backends():
            pytest.fail(f"backend {name!r} is required in this session but does not import: {exc}")
        # allow_module_level: test modules may call require() at import time.
        pytest.skip(f"backend {name!r} is not installed", allow_module_level=True)


def require_adapter(name: str) -> Any:
    """Import backend ``name``'s adapter package (and its framework): fail if
    the session requires the backend, else skip when it does not import
    (another session's framework, or its extra's dependencies, missing)."""
    backend = by_name(name)
    require(name)
    try:
        return importlib.import_module(backend.adapter)
    except ImportError as exc:
        if backend.name in required_backends():
            pytest.fail(f"adapter {backend.adapter!r} is required in this session but does "
                        f"not import: {exc}")
        pytest.skip(f"adapter {backend.adapter!r} does not import here: {exc}")


def namespace(name: str) -> Any:
    """The array-API namespace the core tests run on for backend ``name``."""
    backend = by_name(name)
    require(name)
    if name == "torch":
        import array_api_compat.torch as xp

        return xp
    if name == "jax":
        import jax

        jax.config.update("jax_enable_x64", True)  # float64 cases need it
    if name == "array_api_strict":
        import array_api_strict

        # The core targets the 2023.12 standard; hold it to exactly that.
        array_api_strict.set_array_api_strict_flags(api_version="2023.12")
    return importlib.import_module(backend.namespace)


def to_numpy(array: Any) -> np.ndarray:
    """Any backend's array as a numpy array (a copy where needed)."""
    if hasattr(array, "detach"):
        array = array.detach().cpu()
    if type(array).__module__.startswith("array_api_strict"):
        return np.from_dlpack(array)
    return np.asarray(array)
