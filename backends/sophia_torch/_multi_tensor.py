"""The multi-tensor path: the core's update on cache-sized slices of many tensors.

The arithmetic is :func:`sophia_core.sophia_update`; this module only decides
what one core call sees and writes the results back in place.

**State buffers.** When parameters get their first state, their ``m`` and
``h`` are allocated as two flat buffers per (param group, device, dtype), and
``state[p]["m"]``/``["h"]`` are views into them (a :class:`StateLayout`). The
parameters themselves are never touched beyond writing their new values:
their storage, views, ties and shared memory stay as they are.

**A step** over a layout whose parameters all have dense gradients runs
:data:`CHUNK`-element slices of the buffers: a large contiguous parameter is
sliced in place (views of the parameter, its gradient and the buffers); a run
of small parameters is copied into one scratch slice (``torch._foreach_copy_``,
one call), updated there, and copied back. Every temporary of the core fits
in cache, and 2,000 small tensors cost a few dozen core calls. Everything else
(missing gradients, replaced state, tensor subclasses) takes
:func:`update_many` or one core call per tensor; all give bitwise the same
result.

**Compiled** (``compiled=True``): the same slices, each through the core
compiled by ``torch.compile`` (Inductor: one kernel per slice). Every real
hyperparameter enters as a float64 0-d tensor, so one compiled graph serves
every value in every optimizer of the process; only dtypes, devices and the
two flags ``bias_correction``/``maximize`` select a graph.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import array_api_compat.torch as xp
import torch

from sophia_core import SophiaState, sophia_update

__all__ = ["CHUNK", "COMPILED_CHUNK", "StateLayout", "update_many", "update_one"]

#: Elements per core call on the multi-tensor path. 2**17 float32 elements
#: (512 KiB) per temporary keeps the core's intermediates in cache (measured
#: on the project's machine, docs/frameworks/torch.md).
CHUNK = 1 << 17
#: Elements per core call when compiled (no temporaries to keep in cache: the
#: kernel reads p, g, m, h once and writes p, m once) and on accelerators,
#: where each operation is a kernel launch (not measured on a GPU yet).
COMPILED_CHUNK = 1 << 22

#: The core's real-valued keyword arguments (tensors when compiled).
_REALS = ("lr", "b1", "gamma", "weight_decay", "eps", "clip_threshold")


def update_one(p: torch.Tensor, grad: torch.Tensor, m: torch.Tensor, h: torch.Tensor, *,
               step: Any, **kwargs: Any) -> None:
    """One core call; write the new parameter and momentum in place."""
    new_p, new_state = sophia_update(p, grad, SophiaState(m, h), step=step, xp=xp, **kwargs)
    p.copy_(new_p)
    m.copy_(new_state.m)


@functools.cache
def _compiled_update() -> Callable[..., None]:
    return torch.compile(update_one, fullgraph=True, dynamic=True)


def compiled_update(p: torch.Tensor, grad: torch.Tensor, m: torch.Tensor, h: torch.Tensor, *,
                    step: Any, **kwargs: Any) -> None:
    """:func:`update_one` under ``torch.compile``, hyperparameters as tensors.

    A float64 0-d tensor rounds to the compute dtype inside the kernel exactly
    as a Python float does in eager mode, so this is bitwise the eager update.
    """
    for key in _REALS:
        kwargs[key] = _as_scalar_tensor(kwargs[key])
    return _compiled_update()(p, grad, m, h, step=_as_scalar_tensor(step), **kwargs)


def _as_scalar_tensor(value: Any) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value.detach().reshape(()).to(dtype=torch.float64)
    return torch.tensor(float(value), dtype=torch.float64)


def chunk_for(device: torch.device, compiled: bool) -> int:
    """Slice length: cache-sized on CPU; large for accelerators and compiled kernels."""
    return CHUNK if device.type == "cpu" and not compiled else COMPILED_CHUNK


def update_many(members: Sequence[tuple[torch.Tensor, ...]], *, step: Any, chunk: int,
                update: Callable[..., None] = update_one, **kwargs: Any) -> None:
    """The core on ``(p, grad, m, h)`` tuples of one device and dtype, in slices.

    Large contiguous tensors are sliced in place; runs of small ones are
    concatenated, updated, and copied back. For state that is not in a
    :class:`StateLayout` (replaced, loaded without a step since, or a step
    where some gradients are missing).
    """
    small: list[tuple[torch.Tensor, ...]] = []
    small_size = 0
    for tensors in members:
        n = tensors[0].numel()
        if n >= chunk and all(t.is_contiguous() for t in tensors):
            flat = [t.view(-1) for t in tensors]
            for start in range(0, n, chunk):
                update(*(t[start:start + chunk] for t in flat), step=step, **kwargs)
            continue
        small.append(tensors)
        small_size += n
        if small_size >= chunk:
            _update_concatenated(small, step=step, update=update, **kwargs)
            small, small_size = [], 0
    if small:
        _update_concatenated(small, step=step, update=update, **kwargs)


def _update_concatenated(members: list[tuple[torch.Tensor, ...]], *, step: Any,
                         update: Callable[..., None], **kwargs: Any) -> None:
    if len(members) == 1:
        update(*members[0], step=step, **kwargs)
        return
    params, grads, ms, hs = zip(*members, strict=True)
    flat = [torch.cat([t.reshape(-1) for t in ts]) for ts in (params, grads, ms, hs)]
    update(*flat, step=step, **kwargs)
    sizes = [t.numel() for t in params]
    for targets, source in ((params, flat[0]), (ms, flat[2])):
        torch._foreach_copy_(list(targets), [v.view_as(t) for v, t in
                                             zip(source.split(sizes), targets, strict=True)])


class _Slice:
    """``params[index]``'s elements ``[start, end)``, at ``offset`` in the buffers."""

    __slots__ = ("end", "index", "offset", "start")

    def __init__(self, index: int, start: int, end: int, offset: int) -> None:
        self.index, self.start, self.end, self.offset = index, start, end, offset


class _Run:
    """Consecutive small parameters ``first:last`` at ``[offset, offset+size)``."""

    __slots__ = ("first", "last", "offset", "param_views", "grad_views", "size")

    def __init__(self, first: int, last: int, offset: int, size: int) -> None:
        self.first, self.last, self.offset, self.size = first, last, offset, size
        self.param_views: list[torch.Tensor] = []
        self.grad_views: list[torch.Tensor] = []


class StateLayout:
    """The state of some parameters of one group in flat buffers, as views.

    ``params`` share a device and a dtype. ``m`` and ``h`` of each are views
    of two flat buffers (``dtype``), its ``"step"`` a 0-d view of a float64
    CPU buffer (so one ``add_`` counts a step for all of them, where torch's
    optimizers launch one add per parameter). ``initial`` gives each one's
    existing ``(m, h, step)`` to copy in (else zeros). The views are written
    into ``states[p]`` under ``keys`` (momentum, Hessian) and ``"step"``; for
    the fast step, the layout keeps the slices described in the module
    docstring.
    """

    def __init__(self, params: list[torch.Tensor], states: Any, keys: tuple[str, str], *,
                 dtype: torch.dtype, chunk: int,
                 initial: list[tuple[torch.Tensor, torch.Tensor, Any]] | None = None) -> None:
        self.params = params
        self.keys = keys
        self.param_dtype = params[0].dtype
        sizes = [p.numel() for p in params]
        total = sum(sizes)
        device = params[0].device
        self.m = torch.zeros(total, dtype=dtype, device=device)
        self.h = torch.zeros(total, dtype=dtype, device=device)
        self.step_buffer = torch.zeros(len(params), dtype=torch.float64)
        if initial is not None:
            self.step_buffer.copy_(torch.tensor([float(step) for _, _, step in initial],
                                                dtype=torch.float64))
        self.ms: list[torch.Tensor] = []
        self.hs: list[torch.Tensor] = []
        self.steps: list[torch.Tensor] = []
        for i, (p, m, h) in enumerate(zip(params, self.m.split(sizes), self.h.split(sizes),
                                          strict=True)):
            m, h = m.view(p.shape), h.view(p.shape)
            if initial is not None:
                m.copy_(initial[i][0])
                h.copy_(initial[i][1])
            state = states[p]
            state[keys[0]], state[keys[1]], state["step"] = m, h, self.step_buffer[i]
            self.ms.append(m)
            self.hs.append(h)
            self.steps.append(state["step"])
        #: The common step count of the parameters while they step together
        #: (None: read it from the buffer before relying on it).
        self.step_value: int | None = None
        self.chunk = chunk
        self.slices, self.runs, scratch = self._plan(sizes, chunk)
        self.scratch_param = torch.empty(scratch, dtype=self.param_dtype, device=device)
        self.scratch_grad: torch.Tensor | None = None
        for run in self.runs:
            run.param_views = self._views(self.scratch_param, run)

    def _plan(self, sizes: list[int], chunk: int) -> tuple[list[_Slice], list[_Run], int]:
        slices: list[_Slice] = []
        runs: list[_Run] = []
        first = offset = run_offset = run_size = 0
        scratch = 0

        def close(last: int) -> None:
            nonlocal scratch
            if last > first:
                runs.append(_Run(first, last, run_offset, run_size))
                scratch = max(scratch, run_size)

        for i, n in enumerate(sizes):
            if n >= chunk and self.params[i].is_contiguous():
                close(i)
                slices.extend(_Slice(i, a, min(a + chunk, n), offset + a)
                              for a in range(0, n, chunk))
                first, run_size = i + 1, 0
            else:
                if run_size and run_size + n > chunk:
                    close(i)
                    first, run_size = i, 0
                if run_size == 0:
                    run_offset = offset
                run_size += n
            offset += n
        close(len(sizes))
        return slices, runs, scratch

    def _views(self, buffer: torch.Tensor, run: _Run) -> list[torch.Tensor]:
        views, offset = [], 0
        for p in self.params[run.first:run.last]:
            views.append(buffer[offset:offset + p.numel()].view(p.shape))
            offset += p.numel()
        return views

    def intact(self, states: Any) -> bool:
        """Whether every parameter's state still holds this layout's views."""
        m_key, h_key = self.keys
        for p, m, h, step in zip(self.params, self.ms, self.hs, self.steps, strict=True):
            state = states.get(p)
            if state is None or state.get(m_key) is not m or state.get(h_key) is not h \
                    or state.get("step") is not step:
                return False
        return True

    def gradients(self) -> list[torch.Tensor] | None:
        """The parameters' gradients, if every one is dense and of one dtype."""
        grads = [p.grad for p in self.params]
        dtype = self.param_dtype
        for p, g in zip(self.params, grads, strict=True):
            if g is None or g.layout is not torch.strided or g.dtype is not dtype \
                    or p.dtype is not dtype:
                return None
        return grads

    def common_step(self) -> int | None:
        """The parameters' common step count, or None if they differ."""
        if self.step_value is None:
            low, high = int(self.step_buffer.min()), int(self.step_buffer.max())
            self.step_value = low if low == high else None
        return self.step_value

    def count_step(self) -> int:
        """Add one step to every parameter; return the largest count."""
        self.step_buffer.add_(1.0)
        if self.step_value is not None:
            self.step_value += 1
            return self.step_value
        return int(self.step_buffer.max())

    def step(self, grads: list[torch.Tensor], *, update: Callable[..., None],
             **kwargs: Any) -> None:
        """One step of every parameter (the caller checked :meth:`gradients`)."""
        if self.scratch_grad is None or self.scratch_grad.dtype is not grads[0].dtype:
            self.scratch_grad = torch.empty_like(self.scratch_param, dtype=grads[0].dtype)
            for run in self.runs:
                run.grad_views = self._views(self.scratch_grad, run)
        m, h = self.m, self.h
        for piece in self.slices:
            p = self.params[piece.index]
            g = grads[piece.index]
            flat_p = p.view(-1)  # a view of the parameter: its storage is what we write
            flat_g = g.view(-1) if g.is_contiguous() else g.reshape(-1)
            a, b = piece.offset, piece.offset + piece.end - piece.start
            update(flat_p[piece.start:piece.end], flat_g[piece.start:piece.end], m[a:b],
                   h[a:b], **kwargs)
        for run in self.runs:
            params = self.params[run.first:run.last]
            torch._foreach_copy_(run.param_views, params)
            torch._foreach_copy_(run.grad_views, grads[run.first:run.last])
            a, b = run.offset, run.offset + run.size
            update(self.scratch_param[:run.size], self.scratch_grad[:run.size], m[a:b], h[a:b],
                   **kwargs)
            torch._foreach_copy_(params, run.param_views)

    def state_slices(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """``m`` and ``h`` in slices of at most ``chunk`` elements (for statistics)."""
        n = self.m.numel()
        return ([self.m[a:a + self.chunk] for a in range(0, n, self.chunk)],
                [self.h[a:a + self.chunk] for a in range(0, n, self.chunk)])
