"""Sophia as a ``torch.optim.Optimizer`` over :mod:`sophia_core`.

The arithmetic is :func:`sophia_core.sophia_update` and
:func:`sophia_core.hessian_ema`; this module supplies state containers
(``self.state``), in-place writes into parameters, the step counter, the
refresh schedule bookkeeping and the multi-tensor fast path.

**The fast path** (``foreach=True``, the default in eager mode). After the
first step, each param group whose parameters share a device and dtype is
viewed into flat buffers (parameters, ``m``, ``h``; ``p.data`` becomes a view,
see :class:`_FlatLayout`), and a step runs the core on slices of
:data:`CHUNK` elements: every temporary the core allocates stays in cache,
and 2,000 small tensors cost a few dozen core calls instead of thousands.
Until then (and for groups that do not fit) tensors are grouped into buckets
of the same size. ``fused=True`` runs the same core call under
``torch.compile`` (one Inductor kernel per slice). The arithmetic per
element is always the core's, so every path gives bitwise the result of
``foreach=False`` (one core call per tensor), which is also what runs under
``torch.compile`` of the whole step and for tensor subclasses such as
FSDP2's ``DTensor``.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import array_api_compat.torch as xp
import torch
from torch.optim import Optimizer

import sophia_core
from sophia_core import SophiaState, hessian_ema, init_state, refresh_due, sophia_update

__all__ = ["CHUNK", "FUSED_CHUNK", "Sophia", "SophiaG", "SophiaH"]

#: Elements per core call on the fast path. 2**17 float32 elements (512 KiB)
#: per temporary keeps the core's intermediates in cache; measured on the
#: project's machine (docs/frameworks/torch.md).
CHUNK = 1 << 17
#: Elements per core call with ``fused=True`` (no temporaries to keep in
#: cache: the compiled kernel reads p, g, m, h once and writes p, m once) and
#: on accelerators, where each operation is a kernel launch (not measured on
#: a GPU yet: the project's machines had none).
FUSED_CHUNK = 1 << 22

# Group keys spelled as in the core (torch's ``betas`` and the authors' ``rho``
# are mapped in _validate_group).
_CORE_KEYS = ("gamma", "weight_decay", "eps", "clip_threshold", "bias_correction", "maximize")


def _validate_group(group: dict[str, Any]) -> None:
    """Validate one param group's hyperparameters with the core's checks."""
    betas = group["betas"]
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ValueError(f"betas must be a pair (b1, b2), got {betas!r}")
    lr = group["lr"]
    if isinstance(lr, torch.Tensor):
        if lr.numel() != 1:
            raise ValueError("lr as a Tensor must have one element")
        lr = float(lr)
    values = {"lr": lr, "b1": betas[0], "b2": betas[1]}
    values.update({key: group[key] for key in _CORE_KEYS if key in group})
    if "rho" in group:  # SophiaG spells gamma "rho" (the authors' name)
        values["gamma"] = group["rho"]
    sophia_core.validate_hyperparameters(**values)


def _check_grad(p: torch.Tensor, grad: torch.Tensor) -> None:
    if grad.is_sparse:
        raise RuntimeError(
            "Sophia does not support sparse gradients; use a dense embedding "
            "(nn.Embedding(sparse=False)) or a sparse optimizer for that parameter"
        )
    if torch.is_complex(p):
        raise RuntimeError(
            "Sophia does not support complex parameters (the clipped Newton step is "
            "defined per real coordinate); optimize torch.view_as_real(p) instead"
        )


def _all_params(optimizer: Optimizer) -> list[torch.Tensor]:
    return [p for group in optimizer.param_groups for p in group["params"]]


def _step_tensor(value: Any) -> torch.Tensor:
    """A step count as AdamW keeps it: a float32 scalar tensor on the CPU."""
    if isinstance(value, torch.Tensor):
        # A copy: a loaded state_dict must not share its counter with the source.
        return value.detach().to(device="cpu", dtype=torch.float32).reshape(()).clone()
    return torch.tensor(float(value), dtype=torch.float32)


def _plain(t: torch.Tensor) -> bool:
    """A dense strided tensor the fast path may view or concatenate."""
    return type(t) in (torch.Tensor, torch.nn.Parameter) and t.layout == torch.strided


class Sophia(Optimizer):
    r"""Sophia (Liu et al., 2024) for PyTorch: the core's update, in place.

    The update and its math are :func:`sophia_core.sophia_update` (see its
    docstring); the Hessian EMA is :func:`sophia_core.hessian_ema`. This class
    maps torch's spelling to the core's: ``betas = (b1, b2)``; the rest keep
    the core's names.

    Args:
        params: parameters or param groups (every hyperparameter below except
            ``hessian_interval`` / ``refresh_at_start`` may differ per group).
        lr, betas, gamma, weight_decay, eps, clip_threshold, bias_correction,
            maximize: as in :class:`sophia_core.Hyperparameters`.
        hessian_interval, refresh_at_start: the refresh schedule read by
            :meth:`hessian_refresh_due` (the caller computes the estimate and
            calls :meth:`update_hessian`).
        foreach: the fast path (module docstring): flat buffers and slices
            of :data:`CHUNK` elements (default ``None``: yes, except under
            ``torch.compile`` and for tensor subclasses, which take one core
            call per tensor). Bitwise the same result either way. Note that
            it makes ``p.data`` a view into a flat buffer after the first
            step; pass ``foreach=False`` if other code swaps ``p.data``.
        fused: run the fast path's core calls under ``torch.compile`` (one
            kernel per slice; the first step compiles, for seconds; needs a
            C++ compiler on CPU). Bitwise the same as eager unless
            ``bias_correction`` (the step count is then a float32 tensor).
        state_dtype: dtype of ``m`` and ``h``; default: the parameter's for
            float32/float64, float32 for bfloat16/float16.

    State per parameter: ``"m"``, ``"h"`` (tensors of the parameter's shape)
    and ``"step"``, a float32 CPU scalar tensor counting the steps this
    parameter took (as ``torch.optim.AdamW``: ``torch.compile`` does not
    recompile as it changes; eager steps hand the core ``int(step)``, so the
    bias correction is computed in double precision like every backend's).
    The refresh schedule counts completed optimizer steps: the largest
    ``"step"`` of any parameter.

    Example::

        >>> import torch, sophia_torch
        >>> model = torch.nn.Linear(4, 2)
        >>> opt = sophia_torch.Sophia(model.parameters(), lr=1e-3)
        >>> x = torch.randn(8, 4)
        >>> logits = model(x)
        >>> params = list(model.parameters())
        >>> if opt.hessian_refresh_due():
        ...     hhats = sophia_torch.gnb_hessian(logits, params, retain_graph=True)
        ...     opt.update_hessian(hhats)
        >>> loss = torch.nn.functional.cross_entropy(logits, torch.zeros(8, dtype=torch.long))
        >>> loss.backward()
        >>> opt.step()
        >>> opt.zero_grad()
        >>> sorted(opt.state[model.weight])
        ['h', 'm', 'step']
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float | torch.Tensor = sophia_core.DEFAULTS["lr"],
        betas: tuple[float, float] = (sophia_core.DEFAULTS["b1"], sophia_core.DEFAULTS["b2"]),
        gamma: float = sophia_core.DEFAULTS["gamma"],
        weight_decay: float = sophia_core.DEFAULTS["weight_decay"],
        eps: float = sophia_core.DEFAULTS["eps"],
        clip_threshold: float = sophia_core.DEFAULTS["clip_threshold"],
        hessian_interval: int = sophia_core.DEFAULTS["hessian_interval"],
        refresh_at_start: bool = sophia_core.DEFAULTS["refresh_at_start"],
        bias_correction: bool = sophia_core.DEFAULTS["bias_correction"],
        maximize: bool = sophia_core.DEFAULTS["maximize"],
        *,
        foreach: bool | None = None,
        fused: bool = False,
        state_dtype: torch.dtype | None = None,
    ) -> None:
        defaults = dict(
            lr=lr, betas=tuple(betas), gamma=gamma, weight_decay=weight_decay, eps=eps,
            clip_threshold=clip_threshold, bias_correction=bias_correction,
            maximize=maximize, foreach=foreach, fused=fused,
        )
        self._init(params, defaults, hessian_interval, refresh_at_start, state_dtype)

    def _init(self, params: Iterable[Any], defaults: dict[str, Any], hessian_interval: int,
              refresh_at_start: bool, state_dtype: torch.dtype | None) -> None:
        sophia_core.validate_hyperparameters(
            hessian_interval=hessian_interval, refresh_at_start=refresh_at_start)
        _validate_group(defaults)
        if state_dtype is not None and not state_dtype.is_floating_point:
            raise TypeError(f"state_dtype must be a floating dtype, got {state_dtype}")
        self.hessian_interval = hessian_interval
        self.refresh_at_start = refresh_at_start
        self.state_dtype = state_dtype
        super().__init__(params, defaults)

    #: Attributes beyond torch's defaults/state/param_groups that pickling
    #: and ``copy.deepcopy`` must keep (the flat layout is rebuilt instead).
    _CONFIG = ("hessian_interval", "refresh_at_start", "state_dtype", "n_probes", "probe")

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state.update({k: getattr(self, k) for k in self._CONFIG if hasattr(self, k)})
        return state

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if isinstance(param_group, dict):
            _validate_group({**self.defaults, **param_group})
        super().add_param_group(param_group)

    # -- schedule -------------------------------------------------------------

    @property
    def completed_steps(self) -> int:
        """Optimizer steps taken so far (the largest per-parameter ``"step"``)."""
        return max((int(s.get("step", 0)) for s in self.state.values()), default=0)

    def hessian_refresh_due(self) -> bool:
        """Whether the schedule asks for a Hessian refresh before the next step.

        :func:`sophia_core.refresh_due` on :attr:`completed_steps`.
        """
        return bool(refresh_due(self.completed_steps, hessian_interval=self.hessian_interval,
                                refresh_at_start=self.refresh_at_start))

    # -- state ----------------------------------------------------------------

    def _state_for(self, p: torch.Tensor) -> dict[str, Any]:
        state = self.state[p]
        if "m" not in state:
            m, h = init_state(p.detach(), state_dtype=self.state_dtype, xp=xp)
            state["step"] = _step_tensor(state.get("step", 0))
            state["m"], state["h"] = m, h
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """``Optimizer.load_state_dict``, keeping the saved dtype of ``m`` and ``h``.

        torch casts floating state to the parameter's dtype, which would round a
        bf16 parameter's float32 state to bf16 and break bitwise resumption.
        """
        saved_groups = state_dict["param_groups"]
        saved_ids = list(itertools.chain.from_iterable(g["params"] for g in saved_groups))
        Optimizer.load_state_dict(self, state_dict)
        for pid, p in zip(saved_ids, _all_params(self), strict=False):
            saved = state_dict["state"].get(pid)
            if not saved:
                continue
            state = self.state[p]
            for key in ("m", "h"):
                value = saved.get(key)
                if isinstance(value, torch.Tensor) and value.dtype != state[key].dtype:
                    state[key] = value.to(device=p.device, copy=True)
            if "step" in state:
                state["step"] = _step_tensor(state["step"])

    # -- portable state (sophia_core.portable: npz, no pickle) -------------------

    def export_state(self, path: Any) -> None:
        """Write step, ``m`` and ``h`` of every parameter to a portable file.

        Parameters in ``param_groups`` order; a parameter with no state yet
        is written as zeros. Hyperparameters are those of the first group in
        the core's spelling (schedules resolved to the current number).
        """
        from sophia_core import portable

        ms, hs = [], []
        for p in _all_params(self):
            state = self.state.get(p)
            if state and "m" in state:
                m, h = state["m"], state["h"]
            else:
                m, h = init_state(p.detach(), state_dtype=self.state_dtype, xp=xp)
            ms.append(m.detach().cpu().numpy())
            hs.append(h.detach().cpu().numpy())
        portable.save_state(path, step=self.completed_steps, ms=ms, hs=hs,
                            hyperparameters=self._core_hyperparameters())

    @torch.no_grad()
    def import_state(self, path: Any) -> None:
        """Load step, ``m`` and ``h`` from a portable file (any backend wrote it).

        Shapes are checked against this optimizer's parameters; state keeps
        the dtype this optimizer would use (float32 for bf16/fp16 params).
        """
        from sophia_core import portable

        params = _all_params(self)
        loaded = portable.load_state(path, expect_shapes=[tuple(p.shape) for p in params])
        for p, m, h in zip(params, loaded.ms, loaded.hs, strict=True):
            state = self.state[p]
            state.clear()
            state["step"] = _step_tensor(0)
            fresh = self._state_for(p)
            fresh["m"].copy_(torch.from_numpy(m))
            fresh["h"].copy_(torch.from_numpy(h))
            fresh["step"] = _step_tensor(loaded.step)

    def _core_hyperparameters(self) -> dict[str, Any]:
        group = self.param_groups[0]
        lr = group["lr"]
        values = {
            "lr": float(lr), "b1": float(group["betas"][0]), "b2": float(group["betas"][1]),
            "gamma": float(self._gamma_for_export(group)),
            "weight_decay": float(group["weight_decay"]), "eps": float(group["eps"]),
            "clip_threshold": float(group["clip_threshold"]),
            "hessian_interval": self.hessian_interval,
            "refresh_at_start": self.refresh_at_start,
            "bias_correction": bool(group["bias_correction"]),
            "maximize": bool(group["maximize"]),
        }
        return values

    def _gamma_for_export(self, group: dict[str, Any]) -> float:
        return group["gamma"]

    # -- the Hessian EMA --------------------------------------------------------

    @torch.no_grad()
    def update_hessian(self, hhats: Sequence[torch.Tensor | None]) -> None:
        """Fold ``hhats`` into ``h`` with :func:`sophia_core.hessian_ema`, now.

        ``hhats`` is parallel to ``[p for g in opt.param_groups for p in
        g["params"]]``; ``None`` leaves that parameter's ``h`` unchanged.
        Whether a refresh is due is the caller's decision
        (:meth:`hessian_refresh_due`).
        """
        params = _all_params(self)
        hhats = list(hhats)
        if len(hhats) != len(params):
            raise ValueError(
                f"update_hessian got {len(hhats)} estimates for {len(params)} parameters "
                "(one per parameter, in param_groups order; None to skip one)")
        index = 0
        folded = []  # every estimate is checked before any h is written
        for group in self.param_groups:
            b2 = group["betas"][1]
            for p in group["params"]:
                hhat = hhats[index]
                index += 1
                if hhat is None:
                    continue
                if torch.is_complex(p):
                    _check_grad(p, hhat)
                h = self._state_for(p)["h"]
                folded.append((h, hessian_ema(h, hhat.detach(), b2=b2, xp=xp)))
        for h, new_h in folded:
            h.copy_(new_h)

    # -- the step ----------------------------------------------------------------

    def _gamma(self, group: dict[str, Any]) -> float:
        return group["gamma"]

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One Sophia step on every parameter that has a ``.grad``."""
        return self._step(closure)

    def _step(self, closure: Callable[[], Any] | None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for index, group in enumerate(self.param_groups):
            self._step_group(index, group, self._gamma(group))
        return loss

    def _step_group(self, index: int, group: dict[str, Any], gamma: Any) -> None:
        kwargs = dict(
            lr=group["lr"], b1=group["betas"][0], gamma=gamma,
            weight_decay=group["weight_decay"], eps=group["eps"],
            clip_threshold=group["clip_threshold"],
            bias_correction=group["bias_correction"], maximize=group["maximize"],
        )
        compiling = torch.compiler.is_compiling()
        foreach = group.get("foreach")
        foreach = (not compiling) if foreach is None else (foreach and not compiling)
        flats = self.__dict__.setdefault("_flat", {})
        if foreach:
            flat = flats.get(index)
            if flat is not None and flat.ready(group["params"], self.state):
                flat.step(fused=bool(group.get("fused")), **kwargs)
                return
            flats.pop(index, None)
        buckets: dict[tuple[Any, ...], list[tuple[torch.Tensor, ...]]] = {}
        for p in group["params"]:
            grad = p.grad
            if grad is None:
                continue
            _check_grad(p, grad)
            state = self._state_for(p)
            state["step"] += 1
            # Eager: the core gets a Python int (bias correction in double, as
            # on every backend). Compiled: the tensor itself (no recompiles).
            step = state["step"] if compiling else int(state["step"])
            m, h = state["m"], state["h"]
            if foreach and _plain(p) and _plain(grad):
                # The step count enters the math only through the bias correction.
                key = (p.device, p.dtype, grad.dtype, m.dtype,
                       step if group["bias_correction"] else 0)
                buckets.setdefault(key, []).append((p, grad, m, h))
            else:
                _update(p, grad, m, h, step=step, **kwargs)
        for key, members in buckets.items():
            _update_many(members, step=key[-1] if group["bias_correction"] else 1,
                         chunk=_chunk(key[0], False), **kwargs)
        if foreach and len(buckets) == 1:
            members = next(iter(buckets.values()))
            if len(members) == len(group["params"]) and _FlatLayout.fits(members):
                chunk = _chunk(members[0][0].device, bool(group.get("fused")))
                flats[index] = _FlatLayout(group["params"], self.state, chunk)


class _FlatLayout:
    """One param group's parameters, ``m`` and ``h`` viewed into three flat buffers.

    Built after a step in which every parameter of the group had a dense
    gradient of one device and dtype; from then on a step runs the core on
    :data:`CHUNK`-element slices of the buffers (gradients: views of large
    ones, one ``torch.cat`` per run of small ones), with no other per-tensor
    work.
    ``p.data`` becomes a view into the buffer (``p``, its ``.grad`` and
    autograd are unaffected); ``state[p]["m"]``/``["h"]`` become views too,
    so memory stays 2x the parameters. Anything that replaces one of these
    tensors (``load_state_dict``, ``p.data = ...``) or a step where some
    parameter has no gradient sends the group back to the bucketed path,
    which rebuilds the layout.
    """

    def __init__(self, params: list[torch.Tensor], states: Any, chunk: int) -> None:
        self.params = list(params)
        sizes = [p.numel() for p in self.params]
        self.size = sum(sizes)
        self.param = torch.cat([p.detach().reshape(-1) for p in self.params])
        self.m = torch.cat([states[p]["m"].reshape(-1) for p in self.params])
        self.h = torch.cat([states[p]["h"].reshape(-1) for p in self.params])
        self.steps = [states[p]["step"] for p in self.params]
        self.plan = _plan(sizes, chunk)
        self.ms, self.hs, self.pointers = [], [], []
        for p, pv, mv, hv in zip(self.params, self.param.split(sizes), self.m.split(sizes),
                                 self.h.split(sizes), strict=True):
            p.data = pv.view(p.shape)
            states[p]["m"] = mv.view(p.shape)
            states[p]["h"] = hv.view(p.shape)
            self.ms.append(states[p]["m"])
            self.hs.append(states[p]["h"])
            self.pointers.append(p.data_ptr())

    @staticmethod
    def fits(members: list[tuple[torch.Tensor, ...]]) -> bool:
        """Contiguous tensors and one step count (the bucket key has one)."""
        return all(t.is_contiguous() for tensors in members for t in tensors)

    def ready(self, params: list[torch.Tensor], states: Any) -> bool:
        """Same parameters, still our views, every one with a dense gradient."""
        if len(params) != len(self.params):
            return False
        for p, mine, ptr, m, h, step in zip(params, self.params, self.pointers, self.ms,
                                            self.hs, self.steps, strict=True):
            grad = p.grad
            if (p is not mine or grad is None or grad.layout != torch.strided
                    or p.data_ptr() != ptr):
                return False
            state = states[p]
            if state.get("m") is not m or state.get("h") is not h or state.get("step") is not step:
                return False
        return True

    def step(self, *, fused: bool, **kwargs: Any) -> None:
        torch._foreach_add_(self.steps, 1.0)
        if fused:
            # The core compiled by Inductor: one kernel per slice. Numbers that
            # change between steps go in as tensors (no recompilation); a
            # float64 0-d tensor rounds to float32 in the kernel exactly as a
            # Python float does in eager mode.
            update = _compiled_update()
            step = self.steps[0]
            for key in ("lr", "gamma"):
                kwargs[key] = torch.as_tensor(kwargs[key], dtype=torch.float64)
        else:
            update = _update
            step = int(self.steps[0])
        grads = [p.grad.reshape(-1) for p in self.params]
        for start, end, members, offset in self.plan:
            if len(members) == 1:  # a slice of one parameter: its gradient's view
                grad = grads[members[0]][offset:offset + end - start]
            else:  # a run of small parameters: one concatenation
                grad = torch.cat([grads[i] for i in members])
            update(self.param[start:end], grad, self.m[start:end], self.h[start:end],
                   step=step, **kwargs)


def _plan(sizes: list[int], chunk: int) -> list[tuple[int, int, list[int], int]]:
    """Slices of the flat buffer of at most ``chunk`` elements: ``(start, end,
    parameter indices, offset in the first)``. A large parameter is cut into
    slices of itself (its gradient is viewed, not copied); consecutive small
    ones are grouped (their gradients are concatenated)."""
    plan: list[tuple[int, int, list[int], int]] = []
    run: list[int] = []
    run_start = position = 0
    for i, n in enumerate(sizes):
        if n >= chunk:
            if run:
                plan.append((run_start, position, run, 0))
                run = []
            plan.extend((position + a, position + min(a + chunk, n), [i], a)
                        for a in range(0, n, chunk))
        else:
            if run and position + n - run_start > chunk:
                plan.append((run_start, position, run, 0))
                run = []
            if not run:
                run_start = position
            run.append(i)
        position += n
    if run:
        plan.append((run_start, position, run, 0))
    return plan


def _update(p: torch.Tensor, grad: torch.Tensor, m: torch.Tensor, h: torch.Tensor, *,
            step: int, **kwargs: Any) -> None:
    """One core call; write the new parameter and momentum in place."""
    new_p, new_state = sophia_update(p, grad, SophiaState(m, h), step=step, xp=xp, **kwargs)
    p.copy_(new_p)
    m.copy_(new_state.m)


_COMPILED: list[Any] = []


def _compiled_update() -> Callable[..., None]:
    """:func:`_update` (the core plus the in-place writes) under ``torch.compile``."""
    if not _COMPILED:
        _COMPILED.append(torch.compile(_update, fullgraph=True))
    return _COMPILED[0]


def _chunk(device: torch.device, fused: bool) -> int:
    """Slice length: cache-sized on CPU; on accelerators (no cache to fit,
    a launch per operation) and for compiled kernels, large."""
    return CHUNK if device.type == "cpu" and not fused else FUSED_CHUNK


def _update_many(members: list[tuple[torch.Tensor, ...]], *, step: int, chunk: int,
                 **kwargs: Any) -> None:
    """The fast path: the core on buckets of at most ``chunk`` elements."""
    small: list[tuple[torch.Tensor, ...]] = []
    small_size = 0
    for tensors in members:
        n = tensors[0].numel()
        if n >= chunk and all(t.is_contiguous() for t in tensors):
            flat = [t.view(-1) for t in tensors]
            for start in range(0, n, chunk):
                _update(*(t[start:start + chunk] for t in flat), step=step, **kwargs)
            continue
        small.append(tensors)
        small_size += n
        if small_size >= chunk:
            _update_concatenated(small, step=step, **kwargs)
            small, small_size = [], 0
    if small:
        _update_concatenated(small, step=step, **kwargs)


def _update_concatenated(members: list[tuple[torch.Tensor, ...]], *, step: int,
                         **kwargs: Any) -> None:
    if len(members) == 1:
        _update(*members[0], step=step, **kwargs)
        return
    params, grads, ms, hs = zip(*members, strict=True)
    flat = [torch.cat([t.reshape(-1) for t in ts]) for ts in (params, grads, ms, hs)]
    _update(*flat, step=step, **kwargs)
    sizes = [t.numel() for t in params]
    torch._foreach_copy_(list(params), [v.view_as(p) for v, p in
                                        zip(flat[0].split(sizes), params, strict=True)])
    torch._foreach_copy_(list(ms), [v.view_as(m) for v, m in
                                    zip(flat[2].split(sizes), ms, strict=True)])


class SophiaH(Sophia):
    """Sophia-H: :class:`Sophia` plus its Hutchinson estimator.

    ``update_hessian(loss=loss)`` estimates hhat with
    :func:`sophia_torch.hutchinson_hessian` (``n_probes`` probes of kind
    ``probe`` drawn from ``generator``) and folds it; ``loss`` must have been
    computed with a graph (no ``torch.no_grad``). ``update_hessian(hhats)``
    folds given estimates, as in :class:`Sophia`. ``.grad`` is not touched.
    """

    def __init__(self, params: Iterable[Any], lr: float | torch.Tensor = 1e-4,
                 betas: tuple[float, float] = (0.965, 0.99), gamma: float = 0.04,
                 weight_decay: float = 0.1, eps: float = 1e-12, clip_threshold: float = 1.0,
                 hessian_interval: int = 10, refresh_at_start: bool = True,
                 bias_correction: bool = False, maximize: bool = False, *,
                 n_probes: int = 1, probe: str = "gaussian",
                 generator: torch.Generator | None = None,
                 foreach: bool | None = None, fused: bool = False,
                 state_dtype: torch.dtype | None = None) -> None:
        sophia_core.validate_hyperparameters(n_probes=n_probes, probe=probe)
        self.n_probes = n_probes
        self.probe = probe
        self.generator = generator
        super().__init__(params, lr, betas, gamma, weight_decay, eps, clip_threshold,
                         hessian_interval, refresh_at_start, bias_correction, maximize,
                         foreach=foreach, fused=fused, state_dtype=state_dtype)

    def update_hessian(self, hhats: Sequence[torch.Tensor | None] | None = None, *,
                       loss: torch.Tensor | None = None, retain_graph: bool = False) -> None:
        """Fold ``hhats``, or a Hutchinson estimate of ``loss``'s Hessian diagonal.

        ``retain_graph=True`` keeps ``loss``'s graph for the training backward.
        """
        if (hhats is None) == (loss is None):
            raise TypeError("update_hessian takes exactly one of hhats or loss=")
        if loss is not None:
            from ._estimators import hutchinson_hessian

            hhats = hutchinson_hessian(loss, _all_params(self), n_probes=self.n_probes,
                                       probe=self.probe, generator=self.generator,
                                       retain_graph=retain_graph)
        super().update_hessian(hhats)


class SophiaG(Sophia):
    """Drop-in for the authors' ``SophiaG`` (PyPI ``sophia-opt``), on the core.

    Same signature and loop: ``step(closure=None, bs=5120)`` and
    ``update_hessian()`` with no arguments, which folds ``p.grad**2`` (call
    it after the backward of the sampled-label loss, as their loop does).
    Their state is :math:`h = \\mathrm{EMA}(\\hat g^2)` and their step divides
    by ``rho*bs*h + 1e-15``; this class runs :func:`sophia_core.sophia_update`
    with ``gamma = rho*bs`` and ``eps = 1e-15``, i.e. ``max(rho*bs*h, 1e-15)``,
    which equals theirs to float32 rounding for ``h >= 0`` (it never walks
    uphill when a given ``h`` is negative). ``h`` stays in the authors' scale
    (N = 1 in :func:`sophia_core.gnb_estimate`; ``bs`` carries N).

    Extra keyword-only arguments (defaults reproduce the authors' code):
    ``eps=1e-15``, ``clip_threshold=1``, ``hessian_interval=10`` with
    ``refresh_at_start=False`` (for :meth:`hessian_refresh_due`),
    ``bias_correction=False``, ``foreach``, ``state_dtype``. ``capturable``
    is accepted for compatibility and has no effect (the step counter is a
    Python int; nothing syncs). ``load_state_dict`` also reads the authors'
    checkpoints (keys ``exp_avg``, ``hessian``, tensor ``step``).
    """

    def __init__(self, params: Iterable[Any], lr: float | torch.Tensor = 1e-4,
                 betas: tuple[float, float] = (0.965, 0.99), rho: float = 0.04,
                 weight_decay: float = 1e-1, *, maximize: bool = False,
                 capturable: bool = False, eps: float = 1e-15, clip_threshold: float = 1.0,
                 hessian_interval: int = 10, refresh_at_start: bool = False,
                 bias_correction: bool = False, foreach: bool | None = None,
                 fused: bool = False, state_dtype: torch.dtype | None = None) -> None:
        defaults = dict(
            lr=lr, betas=tuple(betas), rho=rho, weight_decay=weight_decay, eps=eps,
            clip_threshold=clip_threshold, bias_correction=bias_correction,
            maximize=maximize, capturable=capturable, foreach=foreach, fused=fused,
        )
        self._init(params, defaults, hessian_interval, refresh_at_start, state_dtype)

    def _gamma(self, group: dict[str, Any]) -> float:
        return group["rho"] * self._bs

    def _gamma_for_export(self, group: dict[str, Any]) -> float:
        # h is in the authors' scale (EMA of ghat**2): gamma is rho per position.
        return group["rho"]

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None, bs: int | float = 5120) -> Any:
        """One step; the denominator is ``max(rho*bs*h, eps)``."""
        if isinstance(bs, torch.Tensor):
            bs = bs.item()
        if not (isinstance(bs, (int, float)) and math.isfinite(bs) and bs > 0):
            raise ValueError(f"bs (the number of label positions N) must be > 0, got {bs!r}")
        self._bs = bs
        return self._step(closure)

    @torch.no_grad()
    def update_hessian(self, hhats: Sequence[torch.Tensor | None] | None = None) -> None:
        """With no argument, fold ``p.grad**2`` (the authors' behaviour).

        Given ``hhats``, fold those instead (in the authors' scale: the step
        multiplies ``h`` by ``rho*bs``).
        """
        if hhats is None:
            hhats = [
                None if p.grad is None else sophia_core.gnb_estimate(p.grad, 1, xp=xp)
                for p in _all_params(self)
            ]
        super().update_hessian(hhats)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        renamed = {"exp_avg": "m", "hessian": "h"}
        state = {}
        for pid, s in state_dict["state"].items():
            s = {renamed.get(k, k): v for k, v in s.items()}
            state[pid] = s
        super().load_state_dict({**state_dict, "state": state})
