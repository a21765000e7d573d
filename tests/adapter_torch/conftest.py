"""torch tests run with one intra-op thread.

The project's machines have 2 cores shared by several jobs; on the tiny
tensors these tests use, a second OpenMP thread only adds contention (a
tiny model's step measured 4x slower with 2 threads under load).
"""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    try:
        import torch
    except ImportError:
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
