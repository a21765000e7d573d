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
    return {kind: torch.load(tmp / f"{kind}.pt")
            for kind in ("ddp", "fsdp2", "ddp_refresh", "fsdp2_refresh")}


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


@pytest.mark.parametrize("kind", ["ddp_refresh", "fsdp2_refresh"])
def test_the_in_loop_refresh_under_ddp_and_fsdp2_equals_one_process(results, kind):
    """``opt.refresh_hessian(model, x)`` in the standard loop: the DDP wrapper
    is unwrapped and ghat all-reduced; FSDP2's sharded parameters get the
    estimate through their reduce-scattered ``.grad``. Either way the global
    estimate of one process on the same rows and noise."""
    import _distributed_workers as workers

    single = workers.single_process_refresh(2)
    assert all(bool(h.abs().sum() > 0) for h in single[len(single) // 2:])
    for a, b in zip(single, results[kind], strict=True):  # parameters, then h
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6 * float(a.abs().max()))
