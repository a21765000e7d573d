"""The JAX adapter's tests: collected only where jax and optax import.

A session that requires the jax backend (nox sets $SOPHIA_REQUIRED_BACKENDS)
fails on a missing jax instead of skipping these tests.
"""

from __future__ import annotations

import importlib.util

import pytest

from sophia_core.backends import required_backends

_MISSING = [m for m in ("jax", "optax") if importlib.util.find_spec(m) is None]
if _MISSING and "jax" in required_backends():
    raise ImportError(f"the jax backend is required in this session but {_MISSING} is missing")
collect_ignore_glob = ["test_*.py"] if _MISSING else []


@pytest.fixture
def rng():
    import numpy as np

    return np.random.default_rng(0)
