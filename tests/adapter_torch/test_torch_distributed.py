"""DDP and FSDP2 on CPU/gloo, 2 processes: the same parameters as one process."""

from __future__ import annotations

import pytest
from backend_support import require

torch = require("torch")
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """Spawn 2 gloo processes once; they run the DDP and the FSDP2 case."""
    import _distributed_workers as workers

    tmp = tmp_path_factory.mktemp("distributed")
    mp.spawn(workers.worker, args=(2, str(tmp / "rendezvous"), str(tmp)), nprocs=2, join=True)
    return {kind: torch.load(tmp / f"{kind}.pt") for kind in ("ddp", "fsdp2")}


def test_ddp_two_processes_equal_one_process_on_the_global_batch(results):
    import _distributed_workers as workers

    distributed = results["ddp"]
    single = workers.single_process("ddp")
    for a, b in zip(single, distributed, strict=True):
        # Same math; only the order of the gradient sums differs (all-reduce).
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)


def test_fsdp2_two_processes_equal_one_process_on_the_global_batch(results):
    import _distributed_workers as workers

    distributed = results["fsdp2"]
    single = workers.single_process("fsdp2")
    for a, b in zip(single, distributed, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
