"""Workers for test_distributed.py (spawned processes import this module).

Each worker trains a tiny model on its half of a global batch for a few
steps and saves the final parameters; the test compares them with one
process training on the whole batch.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

import sophia_torch

F = torch.nn.functional
GLOBAL_BATCH = 8
STEPS = 4


def make_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 4))


def batches():
    """The global batches (inputs, targets, sampling noise), identical everywhere."""
    gen = torch.Generator().manual_seed(1)
    return [(torch.randn(GLOBAL_BATCH, 5, generator=gen),
             torch.randint(0, 4, (GLOBAL_BATCH,), generator=gen),
             torch.rand(GLOBAL_BATCH, 4, generator=gen)) for _ in range(STEPS)]


def train_sophia(model, forward, opt, rank: int, world: int) -> None:
    """Sophia with GNB refreshes; ``forward`` runs the estimator's forward pass."""
    params = list(model.parameters())
    per_rank = GLOBAL_BATCH // world
    for x, y, u in batches():
        local = slice(rank * per_rank, (rank + 1) * per_rank)
        if opt.hessian_refresh_due():
            logits = forward(x[local])
            opt.update_hessian(sophia_torch.gnb_hessian(logits, params, uniform=u[local]))
        F.cross_entropy(model(x[local]), y[local]).backward()
        opt.step()
        opt.zero_grad()


def train_sophia_g(model, opt, rank: int, world: int) -> None:
    """The authors' loop: sampled-label backward then ``update_hessian()``."""
    per_rank = GLOBAL_BATCH // world
    for t, (x, y, u) in enumerate(batches()):
        local = slice(rank * per_rank, (rank + 1) * per_rank)
        F.cross_entropy(model(x[local]), y[local]).backward()
        opt.step(bs=GLOBAL_BATCH)
        opt.zero_grad()
        if t % 2 == 1:
            logits = model(x[local])
            labels = torch.argmax(logits.detach() - torch.log(-torch.log(u[local])), dim=-1)
            F.cross_entropy(logits, labels).backward()
            opt.update_hessian()
            opt.zero_grad()


def _init(rank: int, world: int, rendezvous: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank,
                            world_size=world)


def _save(model, out: str, rank: int, full=lambda t: t) -> None:
    params = [full(p.detach()).clone() for p in model.parameters()]
    if rank == 0:
        torch.save(params, out)


def worker(rank: int, world: int, rendezvous: str, out_dir: str) -> None:
    """DDP, then FSDP2, in one process group (one spawn: start-up is the cost)."""
    _init(rank, world, rendezvous)
    try:
        ddp(rank, world, os.path.join(out_dir, "ddp.pt"))
        fsdp2(rank, world, os.path.join(out_dir, "fsdp2.pt"))
    finally:
        dist.barrier()
        dist.destroy_process_group()


def ddp(rank: int, world: int, out: str) -> None:
    model = make_model()
    wrapped = torch.nn.parallel.DistributedDataParallel(model)
    opt = sophia_torch.Sophia(wrapped.parameters(), lr=1e-2, hessian_interval=2)
    # The estimator's forward runs on the wrapped module: DDP must not wait
    # for a backward that torch.autograd.grad never runs; gnb_hessian
    # all-reduces ghat itself (dist is initialized).
    train_sophia(wrapped, wrapped.module, opt, rank, world)
    _save(model, out, rank)


def fsdp2(rank: int, world: int, out: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    model = make_model()
    mesh = init_device_mesh("cpu", (world,))
    for layer in (model[0], model[2]):
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = sophia_torch.SophiaG(model.parameters(), lr=1e-2, rho=0.05)
    train_sophia_g(model, opt, rank, world)
    _save(model, out, rank, full=lambda t: t.full_tensor())


def single_process(kind: str) -> list[torch.Tensor]:
    model = make_model()
    if kind == "ddp":
        opt = sophia_torch.Sophia(model.parameters(), lr=1e-2, hessian_interval=2)
        train_sophia(model, model, opt, 0, 1)
    else:
        opt = sophia_torch.SophiaG(model.parameters(), lr=1e-2, rho=0.05)
        train_sophia_g(model, opt, 0, 1)
    return [p.detach().clone() for p in model.parameters()]
