"""Shared fixtures: the array namespaces come from the backend registry."""

from __future__ import annotations

from typing import Any

import pytest

from backend_support import NAMESPACE_NAMES, namespace


@pytest.fixture(scope="session", params=NAMESPACE_NAMES)
def xp(request: pytest.FixtureRequest) -> Any:
    """Each array namespace the core must run on."""
    return namespace(request.param)


@pytest.fixture(scope="session", params=["float32", "float64"])
def dtype_name(request: pytest.FixtureRequest) -> str:
    return request.param
