"""Workers for test_distributed.py (spawned processes import this module).

Each worker trains a tiny model on its half of a global batch for a few
steps and saves the final parameters; the test compares them with one
process training on the whole batch.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

import sophia_core
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


REFRESH_FRACTION = 0.5


def train_sophia_refresh(model, opt, rank: int, world: int) -> None:
    """The standard loop: ``opt.refresh_hessian(model, x)`` before the forward
    (each rank estimates on the first rows of its part of the batch)."""
    per_rank = GLOBAL_BATCH // world
    for x, y, _ in batches():
        local = slice(rank * per_rank, (rank + 1) * per_rank)
        opt.refresh_hessian(model, x[local])
        F.cross_entropy(model(x[local]), y[local]).backward()
        opt.step()
        opt.zero_grad()


def refresh_optimizer(params, rank: int):
    return sophia_torch.Sophia(params, lr=1e-2, hessian_interval=2,
                               hessian_batch_fraction=REFRESH_FRACTION,
                               generator=torch.Generator().manual_seed(5 + rank))


def single_process_refresh(world: int) -> list[torch.Tensor]:
    """One process on the global batch, estimating on the rows and with the
    noise that the ``world`` ranks use together."""
    model = make_model()
    params = list(model.parameters())
    opt = sophia_torch.Sophia(params, lr=1e-2, hessian_interval=2)
    generators = [torch.Generator().manual_seed(5 + rank) for rank in range(world)]
    per_rank = GLOBAL_BATCH // world
    rows = sophia_core.estimate_rows(per_rank, REFRESH_FRACTION)
    for x, y, _ in batches():
        if opt.hessian_refresh_due():
            x_used = torch.cat([x[r * per_rank:r * per_rank + rows] for r in range(world)])
            logits = model(x_used)
            noise = torch.cat([torch.rand((rows, logits.shape[-1]), generator=g)
                               for g in generators])
            opt.update_hessian(sophia_torch.gnb_hessian(logits, params, uniform=noise))
        F.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad()
    return [p.detach().clone() for p in params] + [opt.state[p]["h"].clone() for p in params]


def _init(rank: int, world: int, rendezvous: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank,
                            world_size=world)


def _save(model, out: str, rank: int, full=lambda t: t, opt=None) -> None:
    """The final parameters (and, given ``opt``, each one's Hessian EMA)."""
    params = [full(p.detach()).clone() for p in model.parameters()]
    if opt is not None:
        params += [full(opt.state[p]["h"]).clone() for p in model.parameters()]
    if rank == 0:
        torch.save(params, out)


def worker(rank: int, world: int, rendezvous: str, out_dir: str) -> None:
    """DDP, then FSDP2, in one process group (one spawn: start-up is the cost)."""
    _init(rank, world, rendezvous)
    try:
        ddp(rank, world, os.path.join(out_dir, "ddp.pt"))
        fsdp2(rank, world, os.path.join(out_dir, "fsdp2.pt"))
        ddp_refresh(rank, world, os.path.join(out_dir, "ddp_refresh.pt"))
        fsdp2_refresh(rank, world, os.path.join(out_dir, "fsdp2_refresh.pt"))
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


def _fully_sharded(world: int) -> torch.nn.Module:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    model = make_model()
    mesh = init_device_mesh("cpu", (world,))
    for layer in (model[0], model[2]):
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def ddp_refresh(rank: int, world: int, out: str) -> None:
    model = make_model()
    wrapped = torch.nn.parallel.DistributedDataParallel(model)
    opt = refresh_optimizer(wrapped.parameters(), rank)
    train_sophia_refresh(wrapped, opt, rank, world)
    _save(model, out, rank, opt=opt)


def fsdp2_refresh(rank: int, world: int, out: str) -> None:
    model = _fully_sharded(world)
    opt = refresh_optimizer(model.parameters(), rank)
    train_sophia_refresh(model, opt, rank, world)
    _save(model, out, rank, full=lambda t: t.full_tensor(), opt=opt)


def fsdp2(rank: int, world: int, out: str) -> None:
    model = _fully_sharded(world)
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
