"""Sophia-G (GNB) and Sophia-H (Hutchinson) estimates with torch autodiff.

The array math is the core's (:mod:`sophia_core._estimators`): label sampling
(Gumbel-max), the masked mean cross-entropy, ``N * ghat**2``, the probes and
``mean(u * Hu)``. This module supplies the noise (from a
``torch.Generator``), the gradients and Hessian-vector products (with
``torch.autograd.grad``, so ``.grad`` is never touched) and the all-reduce
under data parallelism.

**Data parallel (DDP).** ``ghat`` must be the global mean before it is
squared. Compute the estimator's forward either on the wrapped module
(``ddp_model.module(x)``) or inside ``with ddp_model.no_sync():`` so that DDP
does not wait for a backward that ``torch.autograd.grad`` never runs, and let
these functions all-reduce: ``gnb_hessian`` sums ``N_r * ghat_r`` and
``N_r`` over ranks and divides (the exact global mean even for unequal
batches), then squares; ``hutchinson_hessian`` averages ``H u`` over ranks
(every rank must draw the same probes: seed ``generator`` identically).
``all_reduce=None`` does this whenever ``torch.distributed`` is initialized
with more than one process.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import array_api_compat.torch as xp
import torch

import sophia_core

__all__ = ["gnb_hessian", "hutchinson_hessian", "refresh_due"]


def refresh_due(completed_steps: int, *, hessian_interval: int = 10,
                refresh_at_start: bool = True) -> bool:
    """Whether a refresh is due after ``completed_steps`` (:func:`sophia_core.refresh_due`)."""
    return bool(sophia_core.refresh_due(completed_steps, hessian_interval=hessian_interval,
                                        refresh_at_start=refresh_at_start))


def _distributed(all_reduce: bool | None, group: Any) -> bool:
    if all_reduce is not None:
        return all_reduce
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


def _grads(output: torch.Tensor, params: Sequence[torch.Tensor], **kwargs: Any):
    """``torch.autograd.grad`` over the parameters that require grad (others: None)."""
    wanted = [i for i, p in enumerate(params) if p.requires_grad]
    grads = torch.autograd.grad(output, [params[i] for i in wanted], allow_unused=True,
                                **kwargs)
    result: list[torch.Tensor | None] = [None] * len(params)
    for i, g in zip(wanted, grads, strict=True):
        result[i] = g
    return result


def gnb_hessian(
    logits: torch.Tensor,
    params: Sequence[torch.Tensor],
    *,
    mask: torch.Tensor | None = None,
    ignore_index: int = sophia_core.IGNORE_INDEX,
    generator: torch.Generator | None = None,
    uniform: torch.Tensor | None = None,
    all_reduce: bool | None = None,
    group: Any = None,
    loss_scale: float | torch.Tensor | None = None,
    retain_graph: bool = False,
) -> list[torch.Tensor | None]:
    """Sophia-G's ``hhat = N * ghat**2`` for every parameter in ``params``.

    ``logits`` (shape ``(..., V)``, with a graph to ``params``) come from the
    model's forward pass. Labels are sampled from ``softmax(logits)`` with
    :func:`sophia_core.sample_labels` from ``uniform`` noise (drawn from
    ``generator`` unless given); positions where ``mask`` is False are
    ignored; ``ghat`` is the gradient of
    :func:`sophia_core.masked_mean_cross_entropy`; N counts the positions
    used (:func:`sophia_core.num_positions`). Returns one float32-or-wider
    tensor per parameter (``None`` for parameters that do not require grad
    or do not affect the logits), ready for ``opt.update_hessian``.

    ``loss_scale`` (e.g. ``scaler.get_scale()`` for float16) multiplies the
    sampled loss before differentiation and divides ``ghat`` after, so small
    gradients do not underflow; the estimate itself is unscaled. If the
    scaled gradient is not finite, every estimate is ``None`` (skip this
    refresh, as ``GradScaler`` skips a step). ``retain_graph=True`` keeps
    the graph for a later backward through the same logits.
    """
    if uniform is None:
        uniform = torch.rand(logits.shape, generator=generator, device=logits.device,
                             dtype=torch.float32)
    with torch.no_grad():
        labels = sophia_core.sample_labels(logits.detach(), uniform, mask=mask,
                                           ignore_index=ignore_index, xp=xp)
    lhat = sophia_core.masked_mean_cross_entropy(logits, labels, ignore_index=ignore_index,
                                                 xp=xp)
    positions = sophia_core.num_positions(labels, ignore_index=ignore_index, xp=xp)
    if loss_scale is not None:
        lhat = lhat * loss_scale
    ghats = _grads(lhat, params, retain_graph=retain_graph)
    if loss_scale is not None:
        ghats = [None if g is None else g.float() / loss_scale for g in ghats]
        if not all(bool(torch.isfinite(g).all()) for g in ghats if g is not None):
            return [None] * len(ghats)
    if _distributed(all_reduce, group):
        ghats, positions = _global_mean(ghats, positions, group)
    return [None if g is None else sophia_core.gnb_estimate(g, positions, xp=xp)
            for g in ghats]


def _global_mean(ghats: list[torch.Tensor | None], positions: torch.Tensor, group: Any):
    """``sum_r N_r ghat_r / sum_r N_r`` over ranks, and ``sum_r N_r``."""
    import torch.distributed as dist

    weight = positions.to(torch.float64)
    total = weight.clone()
    dist.all_reduce(total, group=group)
    present = [g for g in ghats if g is not None]
    flat = torch.cat([g.reshape(-1).to(torch.float64) for g in present]) * weight
    dist.all_reduce(flat, group=group)
    flat = flat / total.clamp(min=1)
    out: list[torch.Tensor | None] = []
    offset = 0
    for g in ghats:
        if g is None:
            out.append(None)
            continue
        out.append(flat[offset:offset + g.numel()].view_as(g).to(g.dtype))
        offset += g.numel()
    return out, total.to(positions.dtype)


def hutchinson_hessian(
    loss: torch.Tensor,
    params: Sequence[torch.Tensor],
    *,
    n_probes: int = 1,
    probe: str = "gaussian",
    generator: torch.Generator | None = None,
    noise: Sequence[Sequence[torch.Tensor]] | None = None,
    all_reduce: bool | None = None,
    group: Any = None,
    retain_graph: bool = False,
) -> list[torch.Tensor | None]:
    """Sophia-H's ``hhat = mean_j u_j * (H u_j)`` for every parameter in ``params``.

    ``loss`` is any twice-differentiable scalar with a graph to ``params``.
    Hessian-vector products come from double backward
    (``torch.autograd.grad`` with ``create_graph=True``); probes are
    :func:`sophia_core.probe_from_noise` of normal (``"gaussian"``) or uniform
    (``"rademacher"``) noise drawn from ``generator``, or of ``noise[j][i]``
    for probe j and parameter i when given. The estimate is
    :func:`sophia_core.hutchinson_estimate`; it can be negative.
    ``retain_graph=True`` keeps ``loss``'s graph for a later ``backward``.
    """
    sophia_core.validate_hyperparameters(n_probes=n_probes, probe=probe)
    if noise is not None and len(noise) != n_probes:
        raise ValueError(f"noise has {len(noise)} probe sets for n_probes={n_probes}")
    grads = _grads(loss, params, create_graph=True)
    used = [i for i, g in enumerate(grads) if g is not None]
    probes: list[list[torch.Tensor]] = [[] for _ in used]
    hvps: list[list[torch.Tensor]] = [[] for _ in used]
    for j in range(n_probes):
        us = []
        for k, i in enumerate(used):
            p = params[i]
            if noise is not None:
                raw = noise[j][i]
            elif probe == "gaussian":
                raw = torch.randn(p.shape, generator=generator, device=p.device, dtype=p.dtype)
            else:
                raw = torch.rand(p.shape, generator=generator, device=p.device, dtype=p.dtype)
            u = sophia_core.probe_from_noise(raw.to(p.dtype), probe=probe, xp=xp)
            us.append(u)
            probes[k].append(u)
        hu = torch.autograd.grad([grads[i] for i in used], [params[i] for i in used],
                                 grad_outputs=us, retain_graph=retain_graph or j < n_probes - 1,
                                 allow_unused=True)
        for k, (u, h) in enumerate(zip(us, hu, strict=True)):
            hvps[k].append(torch.zeros_like(u) if h is None else h.detach())
    if _distributed(all_reduce, group):
        import torch.distributed as dist

        world = dist.get_world_size(group)
        for k in range(len(used)):
            for j in range(n_probes):
                dist.all_reduce(hvps[k][j], group=group)
                hvps[k][j] = hvps[k][j] / world
    out: list[torch.Tensor | None] = [None] * len(params)
    for k, i in enumerate(used):
        out[i] = sophia_core.hutchinson_estimate(probes[k], hvps[k], xp=xp)
    return out


def _logits_of(output: Any) -> torch.Tensor:
    """The logits in a model's output: the tensor, ``.logits``, or the first item."""
    if isinstance(output, torch.Tensor):
        return output
    logits = getattr(output, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise TypeError("refresh_hessian needs the model to return logits (a tensor, an object "
                    f"with .logits, or a tuple starting with them), got {type(output).__name__}")


def _batch_size(inputs: Sequence[Any], kwargs: dict[str, Any],
                targets: torch.Tensor | None) -> int:
    for value in (*inputs, *kwargs.values(), targets):
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            return int(value.shape[0])
    raise ValueError("refresh_hessian needs at least one batched tensor input (dim 0 = batch)")


def _unwrapped(model: Any) -> Any:
    """A DDP-wrapped model's module: the estimator's backward is its own
    (``torch.autograd.grad``), which DDP's reducer must not wait for."""
    from torch.nn.parallel import DistributedDataParallel

    return model.module if isinstance(model, DistributedDataParallel) else model


def _sharded(params: Sequence[torch.Tensor]) -> bool:
    """Parameters sharded by FSDP2 (``DTensor``): autograd does not reach them
    from the unsharded compute parameters, so the estimate goes through
    ``.grad`` (FSDP2's reduce-scatter) instead of ``torch.autograd.grad``."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch without distributed
        return False
    return any(isinstance(p, DTensor) for p in params)


def in_loop_gnb(model: Any, inputs: Sequence[Any], model_kwargs: dict[str, Any],
                params: Sequence[torch.Tensor], *, targets: torch.Tensor | None,
                ignore_index: int, shift_targets: bool, fraction: float,
                generator: Any, scale: Any) -> list[torch.Tensor | None]:
    """Sophia-G's estimate from the first rows of a training batch.

    The engine of ``Sophia.refresh_hessian`` (see there): runs ``model`` on
    :func:`sophia_core.estimate_rows` rows, masks positions whose target is
    ``ignore_index``, samples labels, and returns ``N * ghat**2`` times
    ``scale(N, N_batch)`` per parameter, where ``N_batch`` counts the
    positions of the whole batch (global under data parallelism).
    """
    batch = _batch_size(inputs, model_kwargs, targets)
    rows = sophia_core.estimate_rows(batch, fraction)

    def take(value: Any) -> Any:
        if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == batch:
            return value[:rows]
        return value

    with torch.enable_grad():  # also from inside an evaluation or no_grad block
        logits = _logits_of(_unwrapped(model)(*[take(x) for x in inputs],
                                              **{k: take(v) for k, v in model_kwargs.items()}))
    mask = None
    if shift_targets:
        logits = logits[..., :-1, :]
    if targets is not None:
        full = targets[..., 1:] if shift_targets else targets
        mask = full[:rows] != ignore_index
        batch_positions = (full != ignore_index).sum()
    else:
        batch_positions = torch.tensor(logits[..., 0].numel() // rows * batch)
    distributed = _distributed(None, None)
    if distributed:
        import torch.distributed as dist

        batch_positions = batch_positions.to(logits.device, torch.float64)
        dist.all_reduce(batch_positions)
    noise = torch.rand(logits.shape, generator=generator(logits.device), device=logits.device,
                       dtype=torch.float32)
    with torch.enable_grad():
        if _sharded(params):
            hhats, positions = _gnb_through_grad(logits, params, mask=mask, uniform=noise,
                                                 ignore_index=ignore_index,
                                                 distributed=distributed)
        else:
            hhats = gnb_hessian(logits, params, mask=mask, uniform=noise,
                                ignore_index=ignore_index)
            positions = None
    factor = scale(positions, int(batch_positions))
    if factor != 1:
        hhats = [None if h is None else h * factor for h in hhats]
    return hhats


def _gnb_through_grad(logits: torch.Tensor, params: Sequence[torch.Tensor], *,
                      mask: torch.Tensor | None, uniform: torch.Tensor, ignore_index: int,
                      distributed: bool) -> tuple[list[torch.Tensor | None], int]:
    """GNB with ``backward()`` into ``.grad`` (FSDP2 reduce-scatters it), the
    gradients already there set aside and put back.

    Rank r's sampled loss is weighted by ``N_r * world / N`` so that FSDP2's
    mean over ranks is the global mean ``sum_r N_r ghat_r / N``.
    """
    with torch.no_grad():
        labels = sophia_core.sample_labels(logits.detach(), uniform, mask=mask,
                                           ignore_index=ignore_index, xp=xp)
    lhat = sophia_core.masked_mean_cross_entropy(logits, labels, ignore_index=ignore_index, xp=xp)
    local = sophia_core.num_positions(labels, ignore_index=ignore_index, xp=xp).to(torch.float64)
    total, weight = local.clone(), 1.0
    if distributed:
        import torch.distributed as dist

        dist.all_reduce(total)
        weight = float(local) * dist.get_world_size() / max(float(total), 1.0)
    kept = [p.grad for p in params]
    for p in params:
        p.grad = None
    try:
        (lhat * weight).backward()
        ghats = [p.grad for p in params]
    finally:
        for p, g in zip(params, kept, strict=True):
            p.grad = g
    positions = int(total)
    return [None if g is None else sophia_core.gnb_estimate(g, positions, xp=xp)
            for g in ghats], positions
