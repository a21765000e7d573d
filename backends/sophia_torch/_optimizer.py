"""Sophia as a ``torch.optim.Optimizer`` over :mod:`sophia_core`.

The arithmetic is :func:`sophia_core.sophia_update` and
:func:`sophia_core.fold_hessian`; the statistics are the core's
(:func:`sophia_core.unclipped_count`, :func:`sophia_core.sign_momentum_regime`,
:func:`sophia_core.gamma_for_unclipped_share`,
:func:`sophia_core.missing_refresh`). This module supplies the state
containers, in-place writes, the step counters, the refresh bookkeeping, the
in-loop Sophia-G refresh and torch's optimizer contract (``state_dict``,
hooks, ``deepcopy``/pickle, ``torch.compile``). The multi-tensor path is in
:mod:`sophia_torch._multi_tensor`.

Where things live (so that every checkpointer keeps them):

- per parameter, ``state[p]``: ``"step"`` (a float64 CPU scalar tensor:
  exact to 2**53 steps), the momentum and the Hessian EMA (``"m"``/``"h"``;
  :class:`SophiaG` keeps the authors' ``"exp_avg"``/``"hessian"``), and two
  Python ints: ``"hessian_refreshes"`` (estimates folded into this ``h``)
  and ``"rejected_hessian_coordinates"`` (its coordinates that kept their
  old ``h`` because the estimate there was not finite);
- per param group: the hyperparameters, including ``gamma`` (``rho`` for
  :class:`SophiaG`), which ``target_unclipped_share`` re-sets at refreshes
  (nothing else: ``torch.compile`` guards on every value in a group);
- optimizer-wide, under the ``"sophia"`` key of ``state_dict()``: the
  regime detector's streak and the estimator's generator state.
"""

from __future__ import annotations

import itertools
import math
import warnings
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import array_api_compat.torch as xp
import torch
from torch.optim import Optimizer

import sophia_core

from ._multi_tensor import (
    StateLayout,
    chunk_for,
    compiled_update,
    update_many,
    update_one,
)

__all__ = ["Sophia", "SophiaG", "SophiaH"]

#: Options of a param group spelled as in the core (torch's ``betas`` and the
#: authors' ``rho`` are mapped in :meth:`Sophia._validate_group`).
_CORE_GROUP_KEYS = ("weight_decay", "eps", "clip_threshold", "bias_correction", "maximize",
                    "hessian_bias_correction", "target_unclipped_share")
#: Counters kept in every parameter's state.
_COUNTERS = ("hessian_refreshes", "rejected_hessian_coordinates")


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


def _step_tensor(value: Any) -> torch.Tensor:
    """A step count: a float64 CPU scalar tensor (exact; compiles without recompiling)."""
    if isinstance(value, torch.Tensor):
        return value.detach().to(device="cpu", dtype=torch.float64).reshape(()).clone()
    return torch.tensor(float(value), dtype=torch.float64)


def _plain(t: torch.Tensor) -> bool:
    """A dense strided tensor (not a subclass such as ``DTensor``)."""
    return type(t) in (torch.Tensor, torch.nn.Parameter) and t.layout == torch.strided


def _scalar(value: Any) -> Any:
    """A tensor learning rate as the update takes it: a CPU one as a Python
    float (no device sync), else reshaped to 0-d float64 (no sync either);
    both round as a Python float does, so every form is bitwise the same."""
    if not isinstance(value, torch.Tensor):
        return value
    if value.device.type == "cpu" and not torch.compiler.is_compiling():
        return value.item()
    return value.reshape(()).to(torch.float64)


class Sophia(Optimizer):
    r"""Sophia (Liu et al., 2024) for PyTorch: the core's update, in place.

    The update and its math are :func:`sophia_core.sophia_update`; the
    Hessian EMA is :func:`sophia_core.fold_hessian`. torch spells
    ``(b1, b2)`` as ``betas``; every other name is the core's
    (:class:`sophia_core.Hyperparameters`).

    Args:
        params: parameters, ``named_parameters()``, or param groups. Per group:
            ``lr``, ``betas``, ``gamma``, ``weight_decay``, ``eps``,
            ``clip_threshold``, ``bias_correction``, ``maximize``,
            ``hessian_bias_correction``, ``target_unclipped_share``,
            ``foreach``, ``compiled``.
        lr: a float, or a tensor with one element (any shape; a scheduler
            may write it in place).
        hessian_interval, refresh_at_start: the refresh schedule
            (:meth:`hessian_refresh_due`).
        hessian_bias_correction: fold the n-th estimate with decay
            ``1 - (1-b2)/(1-b2**n)`` (the first refresh sets ``h``).
        target_unclipped_share: re-set each group's ``gamma`` at every
            refresh so that this share of coordinates takes unclipped steps
            (:func:`sophia_core.gamma_for_unclipped_share`); None: off.
        require_refresh: warn once when steps go on with no Hessian estimate
            ever folded (:func:`sophia_core.missing_refresh`); False for plain
            sign momentum.
        warn_sign_momentum: warn once when the unclipped share stays below
            10 % (:func:`sophia_core.sign_momentum_regime`).
        hessian_batch_fraction: share of a batch's sequences that
            :meth:`refresh_hessian` uses (:func:`sophia_core.estimate_rows`).
        generator: the ``torch.Generator`` of the estimator's noise; default:
            one created on first use, seeded from torch's global generator.
            Its state is part of :meth:`state_dict`.
        foreach: torch's meaning: True the multi-tensor implementation, False
            a for-loop over tensors, None (default) multi-tensor except under
            ``torch.compile`` and for tensor subclasses such as ``DTensor``.
            Bitwise the same result either way.
        compiled: run the multi-tensor slices through ``torch.compile``
            (Inductor; the first step compiles, for seconds). Bitwise the
            eager result; any hyperparameters, any number of optimizers.
        state_dtype: dtype of ``m`` and ``h``; default: the parameter's for
            float32/float64, float32 for bfloat16/float16.

    Attributes:
        completed_steps: optimizer steps taken so far (exact).
        hessian_refreshes: Hessian folds so far (the most any parameter had).
        rejected_hessian_coordinates: coordinates that kept their old ``h``
            because the estimate there was not finite (all parameters).
        last_unclipped_share: share of coordinates whose step was not
            clipped, at the last refresh (None before).

    Example::

        >>> import torch, sophia_torch
        >>> model = torch.nn.Linear(4, 3)
        >>> opt = sophia_torch.Sophia(model.parameters(), lr=1e-3)
        >>> x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
        >>> logits = model(x)
        >>> loss = torch.nn.functional.cross_entropy(logits, y)
        >>> opt.refresh_hessian(model, x)   # when due: Sophia-G on part of this batch
        True
        >>> loss.backward()
        >>> opt.step()
        >>> opt.zero_grad()
        >>> sorted(opt.state[model.weight])
        ['h', 'm', 'step']
    """

    #: Names of the momentum and Hessian state (the authors' for SophiaG).
    momentum_key = "m"
    hessian_key = "h"
    #: One line telling a user of this class how to refresh.
    refresh_fix = ("Call opt.refresh_hessian(model, inputs) in the training loop (or "
                   "opt.update_hessian(estimates) when opt.hessian_refresh_due()).")

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
        hessian_bias_correction: bool = sophia_core.DEFAULTS["hessian_bias_correction"],
        target_unclipped_share: float | None = sophia_core.DEFAULTS["target_unclipped_share"],
        require_refresh: bool = sophia_core.DEFAULTS["require_refresh"],
        warn_sign_momentum: bool = sophia_core.DEFAULTS["warn_sign_momentum"],
        hessian_batch_fraction: float = sophia_core.DEFAULTS["hessian_batch_fraction"],
        generator: torch.Generator | None = None,
        foreach: bool | None = None,
        compiled: bool = False,
        fused: bool | None = None,
        state_dtype: torch.dtype | None = None,
    ) -> None:
        defaults = dict(
            lr=lr, betas=betas, gamma=gamma, weight_decay=weight_decay, eps=eps,
            clip_threshold=clip_threshold, bias_correction=bias_correction, maximize=maximize,
            hessian_bias_correction=hessian_bias_correction,
            target_unclipped_share=target_unclipped_share, foreach=foreach,
            compiled=_compiled_option(compiled, fused),
        )
        self._init(params, defaults, hessian_interval=hessian_interval,
                   refresh_at_start=refresh_at_start, require_refresh=require_refresh,
                   warn_sign_momentum=warn_sign_momentum,
                   hessian_batch_fraction=hessian_batch_fraction, generator=generator,
                   state_dtype=state_dtype)

    def _init(self, params: Iterable[Any], defaults: dict[str, Any], *, hessian_interval: int,
              refresh_at_start: bool, require_refresh: bool, warn_sign_momentum: bool,
              hessian_batch_fraction: float, generator: torch.Generator | None,
              state_dtype: torch.dtype | None) -> None:
        sophia_core.validate_hyperparameters(
            hessian_interval=hessian_interval, refresh_at_start=refresh_at_start,
            require_refresh=require_refresh, warn_sign_momentum=warn_sign_momentum,
            hessian_batch_fraction=hessian_batch_fraction)
        if state_dtype is not None and not (isinstance(state_dtype, torch.dtype)
                                            and state_dtype.is_floating_point):
            raise TypeError(f"state_dtype must be a floating torch.dtype, got {state_dtype!r}")
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator, got {generator!r}")
        defaults.setdefault("differentiable", False)  # torch's flag; this update is not
        self.hessian_interval = int(hessian_interval)
        self.refresh_at_start = bool(refresh_at_start)
        self.require_refresh = bool(require_refresh)
        self.warn_sign_momentum = bool(warn_sign_momentum)
        self.hessian_batch_fraction = float(hessian_batch_fraction)
        self.state_dtype = state_dtype
        self.generator = generator
        self.last_unclipped_share: float | None = None
        self.sign_momentum_streak = 0
        self._reset_caches()
        self._validate_group(defaults)
        super().__init__(params, defaults)

    # -- validation and older state ---------------------------------------------

    def _validate_group(self, group: dict[str, Any]) -> None:
        """All of a group's hyperparameters through the core's one validator;
        the eps and gamma checks for the dtypes of its parameters."""
        betas = group["betas"]
        if not isinstance(betas, (tuple, list)) or len(betas) != 2:
            raise TypeError(f"betas (b1, b2) must be a pair of real numbers, got {betas!r}")
        values = {"lr": group["lr"], "b1": betas[0], "b2": betas[1],
                  "gamma": group[self._gamma_key]}
        values.update({key: group[key] for key in _CORE_GROUP_KEYS if key in group})
        sophia_core.validate_hyperparameters(dynamic=("lr",), **values)
        for key in ("foreach",):
            if group.get(key) is not None and not isinstance(group[key], bool):
                raise TypeError(f"{key} must be None or a bool, got {group[key]!r}")
        if not isinstance(group.get("compiled", False), bool):
            raise TypeError(f"compiled must be a bool, got {group['compiled']!r}")
        for p in group.get("params", ()):
            if isinstance(p, torch.Tensor) and not (p.is_floating_point() or p.is_complex()):
                raise TypeError(f"Sophia optimizes floating-point parameters; got one of dtype "
                                f"{p.dtype}")
        for dtype in {p.dtype for p in group.get("params", ())
                      if isinstance(p, torch.Tensor) and p.is_floating_point()}:
            sophia_core.check_eps(values["eps"], sophia_core.compute_dtype(dtype, xp=xp), xp=xp,
                                  gamma=values["gamma"])

    #: The group key of gamma (the authors' ``rho`` for SophiaG).
    _gamma_key = "gamma"

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if isinstance(param_group, dict):
            params = param_group["params"]
            params = [params] if isinstance(params, torch.Tensor) else list(params)
            param_group = {**param_group, "params": params}
            tensors = [p[1] if isinstance(p, tuple) else p for p in params]
            self._validate_group({**self.defaults, **param_group, "params": tensors})
        super().add_param_group(param_group)
        self._reset_caches()

    def __setstate__(self, state: dict[str, Any]) -> None:
        """Fill what older state lacks (as ``AdamW`` does): hyperparameters from
        this optimizer's defaults, counters from 0, the options of 0.1."""
        super().__setstate__(state)
        defaults = self.__dict__.get("defaults", {})
        for group in self.param_groups:
            if "fused" in group:  # sophia_torch 0.1's name for the compiled path
                group.setdefault("compiled", bool(group.pop("fused")))
            for key, value in defaults.items():
                group.setdefault(key, value)
        for key, value in (("hessian_interval", sophia_core.DEFAULTS["hessian_interval"]),
                           ("refresh_at_start", self._refresh_at_start_default),
                           ("require_refresh", True), ("warn_sign_momentum", True),
                           ("hessian_batch_fraction",
                            sophia_core.DEFAULTS["hessian_batch_fraction"]),
                           ("state_dtype", None), ("generator", None),
                           ("last_unclipped_share", None), ("sign_momentum_streak", 0)):
            self.__dict__.setdefault(key, value)
        self._reset_caches()
        self._relayout(self.__dict__.pop("_loading", None))

    _refresh_at_start_default = True

    def _reset_caches(self) -> None:
        """Forget everything derived from the state (rebuilt on demand)."""
        self._layouts: dict[int, list[StateLayout]] = {}
        self._completed: int | None = None
        self._refreshed_at: int | None = None
        self._folded: bool | None = None
        self._warned_missing = self.__dict__.get("_warned_missing", False)
        self._warned_sign = self.__dict__.get("_warned_sign", False)

    # -- pickling and copies ------------------------------------------------------

    #: Attributes beyond torch's ``defaults``/``state``/``param_groups`` that
    #: pickling and ``copy.deepcopy`` keep (the state buffers' bookkeeping is
    #: rebuilt instead).
    _PICKLED = ("hessian_interval", "refresh_at_start", "require_refresh", "warn_sign_momentum",
                "hessian_batch_fraction", "state_dtype", "generator", "last_unclipped_share",
                "sign_momentum_streak", "_warned_missing", "_warned_sign")

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state.update({k: self.__dict__[k] for k in self._PICKLED if k in self.__dict__})
        return state

    # -- schedule and counters ---------------------------------------------------

    @property
    def completed_steps(self) -> int:
        """Optimizer steps taken so far: the largest per-parameter ``"step"`` (exact)."""
        if self._completed is None:
            steps = [s["step"] for s in self.state.values()
                     if isinstance(s, dict) and "step" in s]
            self._completed = int(torch.stack(steps).max()) if steps else 0
        return self._completed

    def hessian_refresh_due(self) -> bool:
        """Whether the schedule asks for a Hessian refresh before the next step
        (:func:`sophia_core.refresh_due` on :attr:`completed_steps`)."""
        return bool(sophia_core.refresh_due(self.completed_steps,
                                            hessian_interval=self.hessian_interval,
                                            refresh_at_start=self.refresh_at_start))

    @property
    def hessian_refreshes(self) -> int:
        """Hessian folds so far (the most any parameter's ``h`` had)."""
        return max((int(s.get("hessian_refreshes", 0)) for s in self._states()), default=0)

    @property
    def rejected_hessian_coordinates(self) -> int:
        """Coordinates that kept their old ``h`` (a non-finite estimate), all parameters."""
        return sum(int(s.get("rejected_hessian_coordinates", 0)) for s in self._states())

    def _states(self) -> list[dict[str, Any]]:
        return [s for s in self.state.values() if isinstance(s, dict)]

    # -- state --------------------------------------------------------------------

    def _state_dtype_for(self, p: torch.Tensor) -> torch.dtype:
        return self.state_dtype or sophia_core.compute_dtype(p.dtype, xp=xp)

    def _init_states(self, index: int, params: list[torch.Tensor], *, flat: bool) -> None:
        """Zero state for ``params`` (of group ``index``), which have none yet.

        ``flat``: plain tensors get :class:`StateLayout` buffers (one per
        device and dtype); the others one tensor each.
        """
        for p in params:
            state = self.state[p]
            state["step"] = _step_tensor(state.get("step", 0))
            for key in _COUNTERS:
                state.setdefault(key, 0)
        rest = params
        if flat:
            rest = [p for p in params if not _plain(p)]
            self._make_layouts(index, [p for p in params if _plain(p)])
        for p in rest:
            m, h = sophia_core.init_state(p.detach(), state_dtype=self.state_dtype, xp=xp)
            self.state[p][self.momentum_key], self.state[p][self.hessian_key] = m, h

    def _make_layouts(self, index: int, params: list[torch.Tensor],
                      initial: dict[torch.Tensor, tuple[Any, ...]] | None = None) -> None:
        """:class:`StateLayout` buffers for ``params`` (copying ``initial``)."""
        partitions: dict[tuple[Any, ...], list[torch.Tensor]] = {}
        for p in params:
            dtype = initial[p][0].dtype if initial else self._state_dtype_for(p)
            partitions.setdefault((p.device, p.dtype, dtype), []).append(p)
        compiled = bool(self.param_groups[index].get("compiled"))
        for (device, _, dtype), members in partitions.items():
            layout = StateLayout(
                members, self.state, (self.momentum_key, self.hessian_key), dtype=dtype,
                chunk=chunk_for(device, compiled),
                initial=[initial[p] for p in members] if initial else None)
            self._layouts.setdefault(index, []).append(layout)

    def _relayout(self, saved: dict[int, dict[str, Any]] | None = None) -> None:
        """Move loaded or copied state into fresh :class:`StateLayout` buffers.

        After ``load_state_dict``, pickling or ``copy.deepcopy``. ``saved``
        maps ``id(p)`` to the state as saved, whose ``m``/``h`` dtype is kept
        (torch's loader casts them to the parameter's dtype, which would
        round a bf16 parameter's float32 state to bf16); steps become exact
        float64 counters.
        """
        keys = (self.momentum_key, self.hessian_key)
        for index, group in enumerate(self.param_groups):
            initial: dict[torch.Tensor, tuple[Any, ...]] = {}
            for p in group["params"]:
                state = self.state.get(p)
                if not state:
                    continue
                for key in _COUNTERS:
                    state.setdefault(key, 0)
                source = (saved or {}).get(id(p)) or {}
                step = source.get("step", state.get("step", 0))
                state["step"] = _step_tensor(step)
                if any(key not in state for key in keys):
                    continue
                pair = []
                for key in keys:
                    value = source.get(key)
                    if not (isinstance(value, torch.Tensor) and value.is_floating_point()
                            and value.shape == p.shape):
                        value = state[key]
                    pair.append(value.to(device=p.device))
                initial[p] = (pair[0], pair[1].to(pair[0].dtype), state["step"])
            flat = [p for p in initial if _plain(p) and self._foreach(group)]
            in_layout = {id(p) for p in flat}
            for p, (m, h, _) in initial.items():
                if id(p) not in in_layout:
                    self.state[p][keys[0]], self.state[p][keys[1]] = m.clone(), h.clone()
            self._make_layouts(index, flat, initial)

    def state_dict(self) -> dict[str, Any]:
        """torch's ``state_dict`` plus ``"sophia"``: the optimizer-wide values
        (the regime detector's streak, the generator's state)."""
        state_dict = super().state_dict()
        extra: dict[str, Any] = {"sign_momentum_streak": int(self.sign_momentum_streak)}
        if self.generator is not None:
            extra["generator"] = {"device": str(self.generator.device),
                                  "state": self.generator.get_state()}
        state_dict["sophia"] = extra
        return state_dict

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """``Optimizer.load_state_dict``, then: ``m``/``h`` keep their saved
        dtype and move into fresh state buffers, steps become exact float64
        counters, what older state lacks takes this optimizer's defaults
        (``__setstate__``), and the ``"sophia"`` values are restored."""
        state_dict = self._rename_loaded_state(state_dict)
        for group, saved in zip(self.param_groups, state_dict["param_groups"], strict=False):
            values = {k: v for k, v in saved.items() if k not in ("params", "fused")}
            self._validate_group({**self.defaults, **values, "params": group["params"]})
        saved_ids = list(itertools.chain.from_iterable(
            g["params"] for g in state_dict["param_groups"]))
        params = self._all_params()
        if len(saved_ids) == len(params):
            self._loading = {id(p): state_dict["state"].get(i)
                             for i, p in zip(saved_ids, params, strict=True)}
        try:
            Optimizer.load_state_dict(self, state_dict)  # calls __setstate__
        finally:
            self.__dict__.pop("_loading", None)
        extra = state_dict.get("sophia") or {}
        self.sign_momentum_streak = int(extra.get("sign_momentum_streak", 0))
        saved_generator = extra.get("generator")
        if saved_generator is not None:
            if self.generator is None:
                self.generator = torch.Generator(device=saved_generator["device"])
            self.generator.set_state(saved_generator["state"])

    def _rename_loaded_state(self, state_dict: dict[str, Any]) -> dict[str, Any]:
        return state_dict

    # -- portable state (sophia_core.portable: no pickle) -------------------------

    def _param_names(self) -> list[str]:
        """Each parameter's name: ``param_names`` of the groups when the
        optimizer was given ``named_parameters()``, else the flat index."""
        names: list[str] = []
        index = 0
        for group in self.param_groups:
            given = group.get("param_names")
            for i, _ in enumerate(group["params"]):
                names.append(str(given[i]) if given else str(index))
                index += 1
        return names

    def export_state(self, path: Any) -> None:
        """Write step, ``m``, ``h`` and the counters to a portable file
        (:func:`sophia_core.portable.save_state`, any backend reads it).

        Tensors are named by :meth:`_param_names`; a parameter with no state
        yet is written as zeros. Hyperparameters are the first group's, in
        the core's spelling, with the gamma the update uses (for
        :class:`SophiaG`, ``rho*bs`` of the last step: its ``h`` is in the
        authors' scale, and ``gamma*h`` is what another backend needs).
        """
        from sophia_core import portable

        ms, hs = [], []
        for p in self._all_params():
            state = self.state.get(p)
            if state and self.momentum_key in state:
                m, h = state[self.momentum_key], state[self.hessian_key]
            else:
                m, h = sophia_core.init_state(p.detach(), state_dtype=self.state_dtype, xp=xp)
            ms.append(m.detach().cpu().numpy())
            hs.append(h.detach().cpu().numpy())
        group = self.param_groups[0]
        counters = {"hessian_refreshes": self.hessian_refreshes,
                    "rejected_hessian_coordinates": self.rejected_hessian_coordinates,
                    "gamma": float(self._effective_gamma(group)),
                    "sign_momentum_streak": int(self.sign_momentum_streak)}
        portable.save_state(path, step=self.completed_steps, ms=ms, hs=hs,
                            hyperparameters=self._core_hyperparameters(), names=self._param_names(),
                            counters=counters)

    @torch.no_grad()
    def import_state(self, path: Any) -> None:
        """Load step, ``m``, ``h`` and the counters from a portable file.

        Tensors are matched by name (:meth:`_param_names`); shapes are
        checked. State keeps the dtype this optimizer uses (float32 for
        bf16/fp16 parameters).
        """
        from sophia_core import portable

        params = self._all_params()
        expect = dict(zip(self._param_names(), (tuple(p.shape) for p in params), strict=True))
        loaded = portable.load_state(path, expect=expect)
        counters = loaded.counters or {}
        position = {id(p): i for i, p in enumerate(params)}
        for index, group in enumerate(self.param_groups):
            initial = {}
            for p in group["params"]:
                i = position[id(p)]
                dtype = self._state_dtype_for(p)
                self.state[p].clear()
                self.state[p]["step"] = _step_tensor(loaded.step)
                initial[p] = (torch.from_numpy(loaded.ms[i]).to(p.device, dtype),
                              torch.from_numpy(loaded.hs[i]).to(p.device, dtype),
                              loaded.step)
            self._layouts.pop(index, None)
            flat = [p for p in initial if _plain(p) and self._foreach(group)]
            in_layout = {id(p) for p in flat}
            for p, (m, h, _) in initial.items():
                if id(p) not in in_layout:
                    self.state[p][self.momentum_key], self.state[p][self.hessian_key] = m, h
            self._make_layouts(index, flat, initial)
            for p in group["params"]:
                self.state[p]["hessian_refreshes"] = int(counters.get("hessian_refreshes", 0))
                self.state[p]["rejected_hessian_coordinates"] = 0
            if "gamma" in counters and group.get("target_unclipped_share") is not None:
                self._set_effective_gamma(group, float(counters["gamma"]))
        if params:  # the file keeps the total only
            self.state[params[0]]["rejected_hessian_coordinates"] = int(
                counters.get("rejected_hessian_coordinates", 0))
        self.sign_momentum_streak = int(counters.get("sign_momentum_streak", 0))
        self._completed = None
        self._folded = None

    def _core_hyperparameters(self) -> dict[str, Any]:
        group = self.param_groups[0]
        lr = group["lr"]
        return {
            "lr": float(lr) if isinstance(lr, torch.Tensor) else lr,
            "b1": group["betas"][0], "b2": group["betas"][1],
            "gamma": float(self._effective_gamma(group)),
            "weight_decay": group["weight_decay"], "eps": group["eps"],
            "clip_threshold": group["clip_threshold"],
            "hessian_interval": self.hessian_interval,
            "refresh_at_start": self.refresh_at_start,
            "bias_correction": group["bias_correction"], "maximize": group["maximize"],
            "hessian_bias_correction": group["hessian_bias_correction"],
            "target_unclipped_share": group["target_unclipped_share"],
        }

    def _all_params(self) -> list[torch.Tensor]:
        return [p for group in self.param_groups for p in group["params"]]

    # -- the Hessian ---------------------------------------------------------------

    @torch.no_grad()
    def update_hessian(self, hhats: Sequence[torch.Tensor | None]) -> None:
        """Fold one estimate per parameter into ``h``
        (:func:`sophia_core.fold_hessian`).

        ``hhats`` is parallel to ``[p for g in opt.param_groups for p in
        g["params"]]``; ``None`` leaves that parameter's ``h`` unchanged. A
        coordinate whose estimate is not finite keeps its ``h`` and is
        counted in :attr:`rejected_hessian_coordinates`. Every estimate is
        checked (shape, dtype) before any ``h`` is written. Whether a refresh
        is due is the caller's decision (:meth:`hessian_refresh_due`).
        """
        params = self._all_params()
        hhats = list(hhats)
        if len(hhats) != len(params):
            raise ValueError(
                f"update_hessian got {len(hhats)} estimates for {len(params)} parameters "
                "(one per parameter, in param_groups order; None to skip one)")
        per_group: list[list[tuple[torch.Tensor, torch.Tensor]]] = []
        index = 0
        for group in self.param_groups:
            pairs = []
            for p in group["params"]:
                hhat = hhats[index]
                index += 1
                if hhat is None:
                    continue
                if not isinstance(hhat, torch.Tensor) or not hhat.is_floating_point():
                    raise TypeError(f"estimate {index - 1} must be a floating tensor, "
                                    f"got {type(hhat).__name__}")
                if torch.is_complex(p):
                    _check_grad(p, hhat)
                sophia_core.check_same_shape("param", p, "hhat", hhat)
                pairs.append((p, hhat.detach()))
            per_group.append(pairs)
        for gi, (group, pairs) in enumerate(zip(self.param_groups, per_group, strict=True)):
            if not pairs:
                continue
            new = [p for p, _ in pairs if self.hessian_key not in self.state.get(p, {})]
            if new:
                self._init_states(gi, new, flat=self._foreach(group))
            rejected = []
            for p, hhat in pairs:
                state = self.state[p]
                state["hessian_refreshes"] = int(state.get("hessian_refreshes", 0)) + 1
                rejected.append(self._fold(state[self.hessian_key], hhat, group,
                                           state["hessian_refreshes"]))
            counts = torch.stack(rejected).tolist()  # one device sync per refresh
            for (p, _), count in zip(pairs, counts, strict=True):
                state = self.state[p]
                state["rejected_hessian_coordinates"] = int(
                    state.get("rejected_hessian_coordinates", 0)) + int(count)
        self._folded = True
        self._after_refresh()

    def _fold(self, h: torch.Tensor, hhat: torch.Tensor, group: dict[str, Any],
              refresh: int) -> torch.Tensor:
        """Fold ``hhat`` into ``h`` in place, in slices; return the rejected count."""
        kwargs = dict(b2=group["betas"][1], refresh=refresh,
                      bias_correction=group["hessian_bias_correction"], xp=xp)
        if not (_plain(h) and h.is_contiguous() and hhat.is_contiguous()):
            fold = sophia_core.fold_hessian(h, hhat, **kwargs)
            h.copy_(fold.h)
            rejected = fold.rejected
            if hasattr(rejected, "full_tensor"):  # a DTensor: the count over all shards
                rejected = rejected.full_tensor()
            return rejected.to(device="cpu", dtype=torch.int64)
        chunk = chunk_for(h.device, False)
        flat_h, flat_hhat = h.view(-1), hhat.reshape(-1)
        rejected = []
        for a in range(0, flat_h.numel(), chunk):
            fold = sophia_core.fold_hessian(flat_h[a:a + chunk], flat_hhat[a:a + chunk], **kwargs)
            flat_h[a:a + chunk].copy_(fold.h)
            rejected.append(fold.rejected)
        if not rejected:
            return torch.zeros((), dtype=torch.int64)
        return torch.stack(rejected).sum().to(device="cpu", dtype=torch.int64)

    def _after_refresh(self) -> None:
        """Right after a fold: gamma from the target share, the share, the regime."""
        step = max(self.completed_steps, 1)
        for group in self.param_groups:
            target = group.get("target_unclipped_share")
            ms, hs = self._group_state(group, sliced=False)
            if target is None or not ms:
                continue
            gamma = sophia_core.gamma_for_unclipped_share(
                ms, hs, target=target, gamma=self._effective_gamma(group),
                clip_threshold=group["clip_threshold"], b1=group["betas"][0], step=step,
                bias_correction=group["bias_correction"], xp=xp)
            self._set_effective_gamma(group, float(gamma))
        count, total = 0, 0
        for group in self.param_groups:
            ms, hs = self._group_state(group, sliced=True)
            if not ms:
                continue
            c, n = sophia_core.unclipped_count(
                ms, hs, gamma=self._effective_gamma(group), eps=group["eps"],
                clip_threshold=group["clip_threshold"], b1=group["betas"][0], step=step,
                bias_correction=group["bias_correction"], xp=xp)
            count += int(c)
            total += n
        if total == 0:
            return
        share = count / total
        self.last_unclipped_share = share
        self.sign_momentum_streak, warn = sophia_core.sign_momentum_regime(
            int(self.sign_momentum_streak), share, refreshes=self.hessian_refreshes)
        if warn and self.warn_sign_momentum and not self._warned_sign:
            self._warned_sign = True
            _warn(sophia_core.sign_momentum_message(share))

    def _group_state(self, group: dict[str, Any], *, sliced: bool,
                     ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """``m`` and ``h`` of the group's parameters that have state, in group
        order; ``sliced``: flat-buffer slices where a layout holds them (same
        elements, fewer and cache-sized calls)."""
        ms, hs = [], []
        index = next(i for i, g in enumerate(self.param_groups) if g is group)
        in_layout: set[int] = set()
        if sliced:
            for layout in self._layouts.get(index, []):
                if layout.intact(self.state):
                    m, h = layout.state_slices()
                    ms.extend(m)
                    hs.extend(h)
                    in_layout.update(id(p) for p in layout.params)
        for p in group["params"]:
            state = self.state.get(p)
            if id(p) in in_layout or not state or self.momentum_key not in state:
                continue
            ms.append(state[self.momentum_key])
            hs.append(state[self.hessian_key])
        return ms, hs

    def _effective_gamma(self, group: dict[str, Any]) -> float:
        """The gamma the update uses for this group."""
        return group["gamma"]

    def _set_effective_gamma(self, group: dict[str, Any], gamma: float) -> None:
        group["gamma"] = gamma

    # -- the in-loop Sophia-G refresh ----------------------------------------------

    def refresh_hessian(self, model: Callable[..., Any], *inputs: Any,
                        targets: torch.Tensor | None = None,
                        ignore_index: int = sophia_core.IGNORE_INDEX,
                        shift_targets: bool = False, **model_kwargs: Any) -> bool:
        """When a refresh is due, fold a Sophia-G estimate from this batch.

        Call it once per optimizer step, anywhere before :meth:`step`; it does
        nothing (and returns False) unless :meth:`hessian_refresh_due`, and at
        most once per step (gradient accumulation may call it on every
        micro-batch). When due, it runs ``model`` on the first
        :func:`sophia_core.estimate_rows` ``(B, hessian_batch_fraction)``
        sequences of the batch (dim 0 of every tensor in ``inputs`` and
        ``model_kwargs``), samples labels from the logits, and folds
        :func:`sophia_torch.gnb_hessian` (``p.grad`` is not touched).

        Args:
            model: the model (a DDP wrapper is unwrapped); its output is the
                logits ``(..., V)``, or has ``.logits``, or is a tuple whose
                first item is.
            targets: the batch's labels, aligned with the logits' positions
                (``(B, T)`` for ``(B, T, V)``); positions equal to
                ``ignore_index`` do not count (padding, prompts).
            shift_targets: logits at position t predict ``targets[t+1]``
                (Hugging Face causal LMs shift inside the model).

        Returns whether it refreshed.
        """
        if not self._refresh_wanted():
            return False
        from ._estimators import in_loop_gnb

        estimates = in_loop_gnb(
            model, inputs, model_kwargs, self._all_params(), targets=targets,
            ignore_index=ignore_index, shift_targets=shift_targets,
            fraction=self.hessian_batch_fraction, generator=self._generator_for,
            scale=self._gnb_scale)
        self.update_hessian(estimates)
        return True

    def _refresh_wanted(self) -> bool:
        """Due, and not done yet at this step count."""
        completed = self.completed_steps
        if self._refreshed_at == completed or not self.hessian_refresh_due():
            return False
        self._refreshed_at = completed
        return True

    def _gnb_scale(self, used: int, batch: int) -> float:
        """Factor on ``N * ghat**2`` from ``used`` of the batch's ``batch``
        positions: 1 here (``h`` is in the core's scale)."""
        return 1.0

    def _generator_for(self, device: torch.device) -> torch.Generator:
        """The estimator's generator (created on first use, on ``device``)."""
        if self.generator is None:
            seed = int(torch.randint(0, 2**62, (), dtype=torch.int64))
            self.generator = torch.Generator(device=device).manual_seed(seed)
        return self.generator

    # -- the step --------------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One Sophia step on every parameter that has a ``.grad``."""
        return self._step(closure)

    def _step(self, closure: Callable[[], Any] | None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        compiling = torch.compiler.is_compiling()
        stepped: int | None = None
        for index, group in enumerate(self.param_groups):
            value = self._step_group(index, group, compiling)
            if value is not None:
                stepped = value if stepped is None else max(stepped, value)
        if compiling:
            self._completed = None
        elif stepped is not None:
            self._completed = max(self.completed_steps, stepped)
            self._check_refreshes()
        return loss

    def _foreach(self, group: dict[str, Any]) -> bool:
        foreach = group.get("foreach")
        return (foreach is None or foreach) and not torch.compiler.is_compiling()

    def _step_group(self, index: int, group: dict[str, Any], compiling: bool) -> int | None:
        """Update the group's parameters; return the largest new step count
        (None if nothing stepped)."""
        kwargs = dict(
            lr=_scalar(group["lr"]), b1=group["betas"][0], gamma=self._effective_gamma(group),
            weight_decay=group["weight_decay"], eps=group["eps"],
            clip_threshold=group["clip_threshold"],
            bias_correction=group["bias_correction"], maximize=group["maximize"],
        )
        params = group["params"]
        foreach = self._foreach(group)
        compiled = bool(group.get("compiled")) and foreach
        update = compiled_update if compiled else update_one
        new = [p for p in params if p.grad is not None
               and self.momentum_key not in self.state.get(p, {})]
        if new:
            for p in new:
                _check_grad(p, p.grad)
            self._init_states(index, new, flat=foreach)
        largest: int | None = None
        done: set[int] = set()
        layouts = self._layouts.get(index, []) if foreach else []
        for layout in list(layouts):
            if not layout.intact(self.state):
                layouts.remove(layout)  # its state was replaced: per tensor from now on
                continue
            grads = layout.gradients()
            if grads is None:
                continue  # some parameter sits this step out: per tensor below
            step = layout.common_step()
            if step is None and group["bias_correction"]:
                continue  # differing step counts: per step count below
            largest = max(largest or 0, layout.count_step())
            layout.step(grads, update=update, step=(step or 0) + 1, **kwargs)
            done.update(id(p) for p in layout.params)
        if len(done) == len(params):
            return largest
        buckets: dict[tuple[Any, ...], list[tuple[torch.Tensor, ...]]] = {}
        for p in params:
            grad = p.grad
            if grad is None or id(p) in done:
                continue
            _check_grad(p, grad)
            state = self.state[p]
            state["step"] += 1
            if compiling:
                step: Any = state["step"]
            else:
                step = int(state["step"])
                largest = max(largest or 0, step)
            m, h = state[self.momentum_key], state[self.hessian_key]
            if foreach and _plain(p) and _plain(grad) and _plain(m):
                key = (p.device, p.dtype, grad.dtype, m.dtype, h.dtype,
                       step if group["bias_correction"] else 0)
                buckets.setdefault(key, []).append((p, grad, m, h))
            else:
                update_one(p, grad, m, h, step=step, **kwargs)
        for layout in layouts:
            if id(layout.params[0]) not in done:
                layout.step_value = None  # its parameters may have stepped unevenly
        for key, members in buckets.items():
            update_many(members, step=key[-1] if group["bias_correction"] else 1,
                        chunk=chunk_for(key[0], compiled), update=update, **kwargs)
        return largest

    def _check_refreshes(self) -> None:
        """Warn once if steps go on with no Hessian estimate ever folded."""
        if not self.require_refresh or self._warned_missing:
            return
        if self._folded is None:  # state saved without counters: h says whether it folded
            self._folded = self.hessian_refreshes > 0 or any(
                bool(s[self.hessian_key].any()) for s in self._states() if self.hessian_key in s)
        if self._folded:
            return
        completed = self.completed_steps
        if sophia_core.missing_refresh(completed, 0, hessian_interval=self.hessian_interval,
                                       refresh_at_start=self.refresh_at_start):
            self._warned_missing = True
            _warn(sophia_core.missing_refresh_message(completed, self.refresh_fix))


def _warn(message: str) -> None:
    """A UserWarning attributed to the first caller outside torch and this package."""
    import inspect
    import os

    inside = (os.path.dirname(__file__), os.path.dirname(torch.__file__))
    level, frame = 1, inspect.currentframe()
    while frame is not None and frame.f_code.co_filename.startswith(inside):
        frame = frame.f_back
        level += 1
    warnings.warn(message, UserWarning, stacklevel=level)


def _compiled_option(compiled: bool, fused: bool | None) -> bool:
    """``compiled``, accepting 0.1's ``fused`` with a deprecation warning."""
    if fused is not None:
        warnings.warn("fused= is deprecated: the option runs the core under torch.compile "
                      "and is called compiled= now", FutureWarning, stacklevel=3)
        return bool(fused) or compiled
    return compiled


class SophiaH(Sophia):
    """Sophia-H: :class:`Sophia` with its Hutchinson estimator.

    ``update_hessian(loss=loss)`` estimates hhat with
    :func:`sophia_torch.hutchinson_hessian` (``n_probes`` probes of kind
    ``probe`` drawn from :attr:`generator`) and folds it; ``loss`` must have
    been computed with a graph. :meth:`refresh_hessian` does that when a
    refresh is due. ``update_hessian(hhats)`` folds given estimates, as in
    :class:`Sophia`. ``.grad`` is not touched. The generator's state is part
    of :meth:`state_dict`, so a resumed run draws the same probes.
    """

    refresh_fix = ("Call opt.refresh_hessian(loss) before loss.backward() in the training "
                   "loop (or opt.update_hessian(loss=loss, retain_graph=True) when "
                   "opt.hessian_refresh_due()).")
    _PICKLED = (*Sophia._PICKLED, "n_probes", "probe")

    def __init__(self, params: Iterable[Any], lr: float | torch.Tensor = 1e-4,
                 betas: tuple[float, float] = (0.965, 0.99), gamma: float = 0.04,
                 weight_decay: float = 0.1, eps: float = 1e-12, clip_threshold: float = 1.0,
                 hessian_interval: int = 10, refresh_at_start: bool = True,
                 bias_correction: bool = False, maximize: bool = False, *,
                 n_probes: int = 1, probe: str = "gaussian", **options: Any) -> None:
        sophia_core.validate_hyperparameters(n_probes=n_probes, probe=probe)
        self.n_probes = int(n_probes)
        self.probe = probe
        super().__init__(params, lr, betas, gamma, weight_decay, eps, clip_threshold,
                         hessian_interval, refresh_at_start, bias_correction, maximize,
                         **options)

    def update_hessian(self, hhats: Sequence[torch.Tensor | None] | None = None, *,
                       loss: torch.Tensor | None = None, retain_graph: bool = False) -> None:
        """Fold ``hhats``, or a Hutchinson estimate of ``loss``'s Hessian diagonal.

        ``retain_graph=True`` keeps ``loss``'s graph for the training backward.
        """
        if (hhats is None) == (loss is None):
            raise TypeError("update_hessian takes exactly one of hhats or loss=")
        if loss is not None:
            from ._estimators import hutchinson_hessian

            params = self._all_params()
            hhats = hutchinson_hessian(loss, params, n_probes=self.n_probes, probe=self.probe,
                                       generator=self._generator_for(loss.device),
                                       retain_graph=retain_graph)
        super().update_hessian(hhats)

    def refresh_hessian(self, loss: torch.Tensor, *, retain_graph: bool = True) -> bool:  # type: ignore[override]
        """When a refresh is due (once per step), fold a Hutchinson estimate of
        ``loss`` (call it before ``loss.backward()``). Returns whether it did."""
        if not self._refresh_wanted():
            return False
        self.update_hessian(loss=loss, retain_graph=retain_graph)
        return True


class SophiaG(Sophia):
    """Drop-in for the authors' ``SophiaG`` (PyPI ``sophia-opt``), on the core.

    Same signature, loop and state: ``step(closure=None, bs=5120)``,
    ``update_hessian()`` with no arguments folding ``p.grad**2`` (after the
    backward of the sampled-label loss, as their loop does), and per
    parameter ``state["exp_avg"]``, ``state["hessian"]`` and a tensor
    ``state["step"]``: their logging reads it, their checkpoints load here
    and this class's load into theirs.

    Their ``h`` is :math:`\\mathrm{EMA}(\\hat g^2)` and their step divides by
    ``rho*bs*h + 1e-15``; this class runs :func:`sophia_core.sophia_update`
    with ``gamma = rho*bs`` and ``eps = 1e-15``, i.e. ``max(rho*bs*h,
    1e-15)``: theirs to float32 rounding for ``h >= 0`` (and never uphill
    where a given ``h`` is negative). ``h`` stays in their scale (N = 1 in
    :func:`sophia_core.gnb_estimate`; ``bs`` carries N).

    Keyword-only extras (defaults reproduce their code): ``eps=1e-15``,
    ``clip_threshold``, ``hessian_interval=10`` with
    ``refresh_at_start=False`` (their loop refreshes after steps k, 2k, ...),
    and every :class:`Sophia` option. ``capturable`` is accepted and has no
    effect. :meth:`refresh_hessian` folds an estimate in their scale for a
    batch of N positions (so ``step(bs=N)`` matches it).
    """

    momentum_key = "exp_avg"
    hessian_key = "hessian"
    _gamma_key = "rho"
    _refresh_at_start_default = False
    refresh_fix = ("Refresh as the authors' loop does (every k steps: backward a loss on labels "
                   "sampled from the model, then optimizer.update_hessian()), or call "
                   "optimizer.refresh_hessian(model, inputs) before optimizer.step().")
    _PICKLED = (*Sophia._PICKLED, "_bs")

    def __init__(self, params: Iterable[Any], lr: float | torch.Tensor = 1e-4,
                 betas: tuple[float, float] = (0.965, 0.99), rho: float = 0.04,
                 weight_decay: float = 1e-1, *, maximize: bool = False,
                 capturable: bool = False, eps: float = 1e-15, clip_threshold: float = 1.0,
                 hessian_interval: int = 10, refresh_at_start: bool = False,
                 bias_correction: bool = False,
                 hessian_bias_correction: bool = sophia_core.DEFAULTS["hessian_bias_correction"],
                 target_unclipped_share: float | None = None,
                 require_refresh: bool = True, warn_sign_momentum: bool = True,
                 hessian_batch_fraction: float = sophia_core.DEFAULTS["hessian_batch_fraction"],
                 generator: torch.Generator | None = None, foreach: bool | None = None,
                 compiled: bool = False, fused: bool | None = None,
                 state_dtype: torch.dtype | None = None) -> None:
        if not isinstance(capturable, bool):
            raise TypeError(f"capturable must be a bool, got {capturable!r}")
        defaults = dict(
            lr=lr, betas=betas, rho=rho, weight_decay=weight_decay, eps=eps,
            clip_threshold=clip_threshold, bias_correction=bias_correction, maximize=maximize,
            capturable=capturable, hessian_bias_correction=hessian_bias_correction,
            target_unclipped_share=target_unclipped_share, foreach=foreach,
            compiled=_compiled_option(compiled, fused),
        )
        #: The ``bs`` of the last step (N, the positions per batch).
        self._bs: float = 5120
        self._init(params, defaults, hessian_interval=hessian_interval,
                   refresh_at_start=refresh_at_start, require_refresh=require_refresh,
                   warn_sign_momentum=warn_sign_momentum,
                   hessian_batch_fraction=hessian_batch_fraction, generator=generator,
                   state_dtype=state_dtype)

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self.__dict__.setdefault("_bs", 5120)
        for group in self.param_groups:
            group.setdefault("capturable", False)

    def _effective_gamma(self, group: dict[str, Any]) -> float:
        return group["rho"] * self._bs

    def _set_effective_gamma(self, group: dict[str, Any], gamma: float) -> None:
        group["rho"] = gamma / self._bs

    def _gnb_scale(self, used: int, batch: int) -> float:
        # N_used * ghat**2 estimates N_batch * (the batch's ghat)**2; their h is
        # the latter over N_batch.
        return 1.0 / max(batch, 1)

    def _rename_loaded_state(self, state_dict: dict[str, Any]) -> dict[str, Any]:
        """sophia_torch 0.1 saved ``"m"``/``"h"``: read those as theirs."""
        renamed = {"m": self.momentum_key, "h": self.hessian_key}
        state = {pid: {renamed.get(k, k): v for k, v in s.items()}
                 for pid, s in state_dict["state"].items()}
        return {**state_dict, "state": state}

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None, bs: int | float = 5120) -> Any:
        """One step; the denominator is ``max(rho*bs*h, eps)``."""
        if isinstance(bs, torch.Tensor):
            bs = bs.item()
        if isinstance(bs, bool) or not isinstance(bs, (int, float)):
            raise TypeError(f"bs (the number of label positions N) must be a number, got {bs!r}")
        if not (math.isfinite(bs) and bs > 0):
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
            hhats = [None if p.grad is None else sophia_core.gnb_estimate(p.grad, 1, xp=xp)
                     for p in self._all_params()]
        super().update_hessian(hhats)
