"""Sophia as optax gradient transformations.

The math is ``sophia_core``'s: :func:`sophia_core.sophia_update` for the
step, :func:`sophia_core.fold_hessian` for the Hessian EMA (with its
non-finite policy), :func:`sophia_core.gamma_for_unclipped_share`,
:func:`sophia_core.unclipped_share`, :func:`sophia_core.sign_momentum_regime`
and :func:`sophia_core.missing_refresh` for what the optimizer tells about
itself. This module maps optax's conventions onto them: a pytree of
parameters, a ``NamedTuple`` state, schedules, weight-decay masks, one
keyword extra argument for the estimator and a ``lax.cond`` refresh.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import optax

import sophia_core

from ._estimators import (
    ESTIMATOR_ARG,
    GaussNewtonBartlett,
    HessianDiagonalFn,
    Hutchinson,
    SophiaEstimator,
    estimate_hessian,
)
from ._host import OneTimeWarnings, is_traced, raise_if

__all__ = [
    "ExactSophia",
    "SophiaState",
    "exact_sophia",
    "optax_contrib_sophia",
    "scale_by_sophia",
    "sophia",
    "sophia_state",
]

_D = sophia_core.DEFAULTS
_INT32_MAX = 2**31 - 1
_ESTIMATORS = (GaussNewtonBartlett, Hutchinson, HessianDiagonalFn)
#: The extra arguments of sophia_jax 0.1, named in the error that replaces them.
_OLD_ARGS = ("hhat", "logits_fn", "loss_fn", "label_mask")


class SophiaState(NamedTuple):
    """Optax state of :func:`sophia`, :func:`scale_by_sophia` and :func:`exact_sophia`.

    Attributes:
      count: completed steps. int64 when ``jax_enable_x64`` is on (exact
        far past ``2**31``); int32 otherwise, and the update raises before
        it would wrap.
      m, h: momentum and Hessian EMA, pytrees shaped like the parameters
        (float32 for bfloat16/float16 parameters by default).
      key: the ``jax.random`` key of the estimators' noise (a typed key
        unless a raw ``uint32[2]`` key was given), split on every refresh.
      hessian_refreshes: estimates folded into ``h`` so far.
      rejected_hessian_coordinates: estimate coordinates kept out of ``h``
        because they were not finite (``sophia_core.fold_hessian``).
      gamma: the gamma in use (set at each refresh when
        ``target_unclipped_share`` is given, else the hyperparameter).
      unclipped_share: share of coordinates whose step was not clipped, at
        the last refresh (0 before the first).
      sign_momentum_streak: consecutive refreshes with that share below
        ``sophia_core.SIGN_MOMENTUM_SHARE`` (the regime detector's state).
    """

    count: jax.Array
    m: optax.Updates
    h: optax.Updates
    key: jax.Array
    hessian_refreshes: jax.Array
    rejected_hessian_coordinates: jax.Array
    gamma: jax.Array
    unclipped_share: jax.Array
    sign_momentum_streak: jax.Array


class ExactSophia(NamedTuple):
    """:func:`exact_sophia`'s pair: ``init(params)`` and
    ``apply(grads, state, params, **extra_args) -> (new_params, new_state)``."""

    init: Callable[[optax.Params], SophiaState]
    apply: Callable[..., tuple[optax.Params, SophiaState]]


def _is_array(value: Any) -> bool:
    return hasattr(value, "shape") and hasattr(value, "dtype") and not callable(value)


def _validate(**values: Any) -> None:
    """The core's validator; arrays (``optax.inject_hyperparams``) as host forms.

    A real given as an array is listed as ``dynamic`` (range-checked when
    concrete). An integer given as a concrete one-element integer array is
    passed as its Python int; a traced one was checked at ``init``.
    """
    dynamic, checked = ["lr"], {}
    for name, value in values.items():
        if _is_array(value):
            if name in ("hessian_interval", "n_probes"):
                if is_traced(value):
                    continue
                if jnp.issubdtype(value.dtype, jnp.integer) and value.size == 1:
                    value = int(value.reshape(()))
            elif name == "target_unclipped_share":
                raise TypeError(
                    "target_unclipped_share must be a Python float or None (it sets the "
                    "quantile taken at each refresh); under optax.inject_hyperparams pass "
                    "static_args=('target_unclipped_share',)")
            else:
                dynamic.append(name)
        checked[name] = value
    sophia_core.validate_hyperparameters(dynamic=tuple(dynamic), **checked)


def _is_python_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _compute_scalar(value: Any, like: Any) -> Any:
    """A scalar hyperparameter for one leaf: Python numbers stay Python.

    An array (a schedule's output, an injected hyperparameter) is cast to the
    leaf's compute dtype, so it cannot promote a float32 parameter to float64.
    """
    if _is_python_number(value):
        return value
    return jnp.asarray(value).astype(sophia_core.compute_dtype(like.dtype, xp=jnp))


def _widest_float() -> Any:
    return jax.dtypes.canonicalize_dtype(jnp.float64)  # float32 unless x64


def _as_exponent(count: jax.Array) -> jax.Array:
    """An exact count as the widest float JAX has (float64 under x64).

    ``sophia_core.bias_corrected`` and ``hessian_decay`` then form
    ``1 - b**n`` in double precision, as numpy does from a Python int.
    """
    return count.astype(_widest_float())


def _make_key(key: Any) -> jax.Array:
    """The state's key: a typed key from a seed; a given key as it is."""
    if key is None:
        return jax.random.key(0)
    if isinstance(key, numbers.Integral) and not isinstance(key, bool):
        return jax.random.key(key)
    if _is_array(key):
        if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
            return key
        if key.shape == () and jnp.issubdtype(key.dtype, jnp.integer):
            return jax.random.key(key)
        if key.shape == (2,) and key.dtype == jnp.uint32:
            return jnp.asarray(key)
    raise TypeError(f"key must be None, an int seed or a jax.random key, got {key!r}")


class _Refresh(NamedTuple):
    """The part of the state a refresh changes."""

    h: Any
    key: jax.Array
    refreshes: jax.Array
    rejected: jax.Array
    gamma: jax.Array
    share: jax.Array
    streak: jax.Array


class _Sophia:
    """What :func:`sophia`, :func:`exact_sophia` and :func:`scale_by_sophia` share."""

    def __init__(self, *, lr: Any, weight_decay: Any, weight_decay_mask: Any, b1: Any,
                 b2: Any, gamma: Any, eps: Any, clip_threshold: Any, hessian_interval: Any,
                 refresh_at_start: bool, bias_correction: bool, maximize: bool,
                 hessian_bias_correction: bool, target_unclipped_share: float | None,
                 require_refresh: bool, warn_sign_momentum: bool,
                 refresh_when: str, refresh_after_step: bool, probe: str, n_probes: Any,
                 key: Any, state_dtype: Any, axis_name: Any) -> None:
        core = dict(b1=b1, b2=b2, gamma=gamma, eps=eps, clip_threshold=clip_threshold,
                    hessian_interval=hessian_interval, refresh_at_start=refresh_at_start,
                    bias_correction=bias_correction, maximize=maximize,
                    hessian_bias_correction=hessian_bias_correction,
                    target_unclipped_share=target_unclipped_share,
                    require_refresh=require_refresh, warn_sign_momentum=warn_sign_momentum,
                    probe=probe, n_probes=n_probes)
        if lr is not None:
            core.update(lr=lr, weight_decay=weight_decay)
        _validate(**core)
        if refresh_when not in ("due", "given"):
            raise ValueError(f"refresh_when must be 'due' or 'given', got {refresh_when!r}")
        if not isinstance(refresh_after_step, bool):
            raise TypeError(f"refresh_after_step must be a bool, got {refresh_after_step!r}")
        if state_dtype is not None and not jnp.issubdtype(state_dtype, jnp.floating):
            raise TypeError(f"state_dtype must be a floating dtype or None, got {state_dtype!r}")
        _make_key(key)  # a bad key fails here, not at init
        self.lr, self.weight_decay, self.weight_decay_mask = lr, weight_decay, weight_decay_mask
        self.b1, self.b2, self.gamma, self.eps = b1, b2, gamma, eps
        self.clip_threshold, self.hessian_interval = clip_threshold, hessian_interval
        self.refresh_at_start, self.bias_correction = refresh_at_start, bias_correction
        self.maximize, self.hessian_bias_correction = maximize, hessian_bias_correction
        self.target = target_unclipped_share
        self.require_refresh, self.warn_sign_momentum = require_refresh, warn_sign_momentum
        self.refresh_when, self.refresh_after_step = refresh_when, refresh_after_step
        self.probe, self.n_probes, self.key = probe, n_probes, key
        self.state_dtype, self.axis_name = state_dtype, axis_name
        self.warnings = OneTimeWarnings()

    # -- state ---------------------------------------------------------------

    def init(self, params: optax.Params) -> SophiaState:
        leaves, treedef = jax.tree.flatten(params)
        compute = {sophia_core.compute_dtype(p.dtype, xp=jnp) for p in leaves}
        for dtype in compute:
            sophia_core.check_eps(self.eps, dtype, xp=jnp, gamma=self.gamma)
        states = [sophia_core.init_state(p, state_dtype=self.state_dtype, xp=jnp)
                  for p in leaves]
        floats = jnp.float64 if jnp.dtype(jnp.float64) in compute else jnp.float32
        counter = jax.dtypes.canonicalize_dtype(jnp.int64)

        def zero() -> jax.Array:  # a buffer of its own each (they may be donated)
            return jnp.zeros([], counter)

        return SophiaState(
            count=zero(),
            m=treedef.unflatten([s.m for s in states]),
            h=treedef.unflatten([s.h for s in states]),
            key=_make_key(self.key),
            hessian_refreshes=zero(),
            rejected_hessian_coordinates=zero(),
            gamma=jnp.array(self.gamma, dtype=floats),
            unclipped_share=jnp.zeros([], floats),
            sign_momentum_streak=zero(),
        )

    # -- one update ------------------------------------------------------------

    def run(self, step: Callable[..., tuple[Any, Any]], grads: Any, state: SophiaState,
            params: Any, extra_args: dict[str, Any]) -> tuple[Any, SophiaState]:
        """``step(grads, m, h, count, params, gamma) -> (out, m)`` with refresh and counters."""
        estimator = self._estimator(extra_args, params)
        refresh = _Refresh(state.h, state.key, state.hessian_refreshes,
                           state.rejected_hessian_coordinates, state.gamma,
                           state.unclipped_share, state.sign_momentum_streak)
        if not self.refresh_after_step:
            refresh = self._maybe_refresh(refresh, state.count, state.m, state.count, params,
                                          estimator)
        gamma = self.gamma if self.target is None else refresh.gamma
        out, m = step(grads, state.m, refresh.h, state.count, params, gamma)
        count = self._increment(state.count)
        if self.refresh_after_step:  # due by the incoming count, as optax.contrib.sophia
            refresh = self._maybe_refresh(refresh, state.count, m, count, params, estimator)
        count = self._check_missing(count, refresh.refreshes, estimator)
        if self.target is None:  # the hyperparameter (it may be injected)
            refresh = refresh._replace(gamma=jnp.asarray(self.gamma).astype(state.gamma.dtype))
        return out, SophiaState(
            count=count, m=m, h=refresh.h, key=refresh.key,
            hessian_refreshes=refresh.refreshes,
            rejected_hessian_coordinates=refresh.rejected,
            gamma=refresh.gamma, unclipped_share=refresh.share,
            sign_momentum_streak=refresh.streak,
        )

    def _estimator(self, extra_args: dict[str, Any], params: Any) -> SophiaEstimator | None:
        estimator = extra_args.get(ESTIMATOR_ARG)
        if estimator is None:
            if self.refresh_when == "due" and self.require_refresh:
                old = [k for k in _OLD_ARGS if k in extra_args]
                raise TypeError(
                    f"tx.update got no {ESTIMATOR_ARG}=, so h would stay 0 and every step "
                    "would be a sign-momentum step, not Sophia. Pass one on every update (it "
                    "is evaluated only when a refresh is due), e.g. "
                    f"{ESTIMATOR_ARG}=sophia_jax.GaussNewtonBartlett(logits_fn); build the "
                    "optimizer with refresh_when='given' to refresh exactly on the updates "
                    "that get one; or require_refresh=False for plain sign momentum."
                    + (f" ({', '.join(old)}= of sophia_jax 0.1 became {ESTIMATOR_ARG}=.)"
                       if old else "")
                )
            return None
        if not isinstance(estimator, _ESTIMATORS):
            raise TypeError(
                f"{ESTIMATOR_ARG} must be a sophia_jax.GaussNewtonBartlett, Hutchinson or "
                f"HessianDiagonalFn, got {type(estimator).__name__}")
        if params is None:
            raise ValueError("params must be passed to update to refresh the Hessian "
                             "estimate: tx.update(grads, state, params, ...)")
        return estimator

    def _increment(self, count: jax.Array) -> jax.Array:
        if count.dtype == jnp.int32:
            count = raise_if(count >= _INT32_MAX, OverflowError,
                             "sophia_jax: the step counter reached 2**31 - 1, the largest "
                             "int32; turn on 64-bit counters (jax.config.update("
                             "'jax_enable_x64', True) or JAX_ENABLE_X64=1) to train longer",
                             count)
        return count + 1

    def _check_missing(self, count: jax.Array, refreshes: jax.Array,
                       estimator: SophiaEstimator | None) -> jax.Array:
        """Warn once if no estimate has arrived in time; returns ``count``."""
        if not self.require_refresh:
            return count
        if self.refresh_when == "due" and estimator is not None and estimator.where is None:
            return count  # every due step refreshes: nothing can go missing
        k = self.hessian_interval
        first_due = 0 if self.refresh_at_start else k
        if count.dtype == jnp.int32 and isinstance(k, int) and first_due + k >= _INT32_MAX:
            return count  # the counter cannot get there
        missing = sophia_core.missing_refresh(count, refreshes, hessian_interval=k,
                                              refresh_at_start=self.refresh_at_start)
        fix = (f"Pass {ESTIMATOR_ARG}= to tx.update: on every update with refresh_when='due' "
               "(it runs only when a refresh is due), or on the updates that should refresh "
               "with refresh_when='given'; check the estimator's where=.")
        return self.warnings.warn("missing_refresh", missing,
                                  lambda c: sophia_core.missing_refresh_message(int(c), fix),
                                  count, count)

    # -- the refresh -------------------------------------------------------------

    def _maybe_refresh(self, refresh: _Refresh, incoming: jax.Array, m: Any,
                       completed: jax.Array, params: Any,
                       estimator: SophiaEstimator | None) -> _Refresh:
        """Fold an estimate if one is due at ``incoming`` steps; ``m`` and
        ``completed`` describe the state the statistics are taken on."""
        if estimator is None:
            return refresh
        due: Any = True
        if self.refresh_when == "due":
            due = sophia_core.refresh_due(incoming, hessian_interval=self.hessian_interval,
                                          refresh_at_start=self.refresh_at_start)
        if estimator.where is not None:
            due = jnp.logical_and(due, estimator.where)

        def fold(r: _Refresh) -> _Refresh:
            return self._refresh(r, m, completed, params, estimator)

        if not is_traced(due):
            # Eager: run the estimate op by op, as numpy would (a lax.cond
            # would compile the branch and let XLA fuse multiply-adds).
            return fold(refresh) if bool(due) else refresh
        return jax.lax.cond(due, fold, lambda r: r, refresh)

    def _refresh(self, r: _Refresh, m: Any, completed: jax.Array, params: Any,
                 estimator: SophiaEstimator) -> _Refresh:
        key, subkey = jax.random.split(r.key)
        hhat = estimate_hessian(estimator, params, subkey, probe=self.probe,
                                n_probes=self.n_probes, axis_name=self.axis_name)
        refreshes = r.refreshes + 1
        number = _as_exponent(refreshes) if self.hessian_bias_correction else None
        treedef = jax.tree.structure(r.h)
        try:
            hhats = treedef.flatten_up_to(hhat)
        except (ValueError, TypeError) as exc:
            raise ValueError(f"the Hessian estimate's tree does not match the parameters': "
                             f"{exc}") from exc
        hs, rejected = [], jnp.zeros([], r.rejected.dtype)
        for old, new in zip(treedef.flatten_up_to(r.h), hhats, strict=True):
            fold = sophia_core.fold_hessian(
                old, new, b2=_compute_scalar(self.b2, old), refresh=number,
                bias_correction=self.hessian_bias_correction, xp=jnp)
            hs.append(fold.h)
            rejected = rejected + fold.rejected.astype(rejected.dtype)
        if rejected.dtype == jnp.int32:
            rejected = raise_if(r.rejected > _INT32_MAX - rejected, OverflowError,
                                "sophia_jax: rejected_hessian_coordinates would pass 2**31 - 1; "
                                "turn on 64-bit counters (JAX_ENABLE_X64=1)", rejected)
        after = sophia_core.after_fold(
            treedef.flatten_up_to(m), hs, target=self.target,
            gamma=self.gamma if self.target is None else r.gamma, streak=r.streak,
            refreshes=refreshes, eps=self.eps, clip_threshold=self.clip_threshold, b1=self.b1,
            step=_as_exponent(jnp.maximum(completed, 1)), bias_correction=self.bias_correction,
            xp=jnp)
        gamma = r.gamma if self.target is None else after.gamma.astype(r.gamma.dtype)
        streak = after.streak.astype(r.streak.dtype)
        if self.warn_sign_momentum:
            streak = self.warnings.warn("sign_momentum", after.warn,
                                        lambda s: sophia_core.sign_momentum_message(float(s)),
                                        streak, after.share)
        return _Refresh(h=treedef.unflatten(hs), key=key, refreshes=refreshes,
                        rejected=r.rejected + rejected, gamma=gamma,
                        share=after.share.astype(r.share.dtype), streak=streak)

    # -- the two steps -------------------------------------------------------------

    def _decays(self, params: Any) -> list[Any]:
        treedef = jax.tree.structure(params)
        mask = self.weight_decay_mask
        if mask is None:
            return [self.weight_decay] * treedef.num_leaves
        mask = mask(params) if callable(mask) else mask
        mask = treedef.flatten_up_to(jax.tree.broadcast(mask, params))
        return [self.weight_decay if bool(keep) else 0.0 for keep in mask]

    def new_params(self, grads: Any, m: Any, h: Any, count: jax.Array, params: Any,
                   gamma: Any) -> tuple[Any, Any]:
        """The core's step on every leaf: ``(new_params, new_m)``."""
        if params is None:
            raise ValueError("sophia's update needs params: tx.update(grads, state, params)")
        lr = self.lr(count) if callable(self.lr) else self.lr
        step = _as_exponent(count + 1)
        treedef = jax.tree.structure(params)
        thetas, ms = [], []
        for p, g, m_, h_, wd in zip(
            treedef.flatten_up_to(params), treedef.flatten_up_to(grads),
            treedef.flatten_up_to(m), treedef.flatten_up_to(h), self._decays(params),
            strict=True,
        ):
            theta, core_state = sophia_core.sophia_update(
                p, g, sophia_core.SophiaState(m=m_, h=h_), step=step,
                lr=_compute_scalar(lr, p), b1=_compute_scalar(self.b1, p),
                gamma=_compute_scalar(gamma, p), weight_decay=_compute_scalar(wd, p),
                eps=_compute_scalar(self.eps, p),
                clip_threshold=_compute_scalar(self.clip_threshold, p),
                bias_correction=self.bias_correction, maximize=self.maximize, xp=jnp,
            )
            thetas.append(theta)
            ms.append(core_state.m)
        return treedef.unflatten(thetas), treedef.unflatten(ms)

    def direction(self, grads: Any, m: Any, h: Any, count: jax.Array, params: Any,
                  gamma: Any) -> tuple[Any, Any]:
        """``u = clip(mhat / max(gamma*h, eps), -c, c)`` on every leaf: ``(u, new_m)``."""
        del params
        step = _as_exponent(count + 1)
        treedef = jax.tree.structure(grads)
        us, ms = [], []
        for g, m_, h_ in zip(treedef.flatten_up_to(grads), treedef.flatten_up_to(m),
                             treedef.flatten_up_to(h), strict=True):
            dtype = sophia_core.compute_dtype(g.dtype, xp=jnp)
            b1 = _compute_scalar(self.b1, g)
            new_m = sophia_core.momentum_update(m_.astype(dtype), g.astype(dtype), b1=b1,
                                                maximize=self.maximize)
            mhat = sophia_core.bias_corrected(new_m, b1=b1, step=step,
                                              bias_correction=self.bias_correction, xp=jnp)
            u = sophia_core.preconditioned_step(
                mhat, h_.astype(dtype), gamma=_compute_scalar(gamma, g),
                eps=_compute_scalar(self.eps, g),
                clip_threshold=_compute_scalar(self.clip_threshold, g), xp=jnp,
            )
            us.append(u.astype(g.dtype))
            ms.append(new_m.astype(m_.dtype))
        return treedef.unflatten(us), treedef.unflatten(ms)


def scale_by_sophia(
    *,
    b1: float = _D["b1"],
    b2: float = _D["b2"],
    gamma: float = _D["gamma"],
    eps: float = _D["eps"],
    clip_threshold: float = _D["clip_threshold"],
    hessian_interval: int = _D["hessian_interval"],
    refresh_at_start: bool = _D["refresh_at_start"],
    bias_correction: bool = _D["bias_correction"],
    maximize: bool = _D["maximize"],
    hessian_bias_correction: bool = _D["hessian_bias_correction"],
    target_unclipped_share: float | None = _D["target_unclipped_share"],
    require_refresh: bool = _D["require_refresh"],
    warn_sign_momentum: bool = _D["warn_sign_momentum"],
    refresh_when: Literal["due", "given"] = "due",
    refresh_after_step: bool = False,
    probe: Literal["gaussian", "rademacher"] = "gaussian",
    n_probes: int = 1,
    key: int | jax.Array | None = None,
    state_dtype: Any = None,
    axis_name: Any = None,
) -> optax.GradientTransformationExtraArgs:
    r"""Sophia's clipped, preconditioned direction, without learning rate or decay.

    Outputs :math:`u = \operatorname{clip}(\hat m / \max(\gamma h, \epsilon), -c, c)`
    (built from :func:`sophia_core.momentum_update`,
    :func:`sophia_core.bias_corrected` and :func:`sophia_core.preconditioned_step`),
    in the sign convention of ``optax.scale_by_adam``: chain it with
    ``optax.add_decayed_weights`` and ``optax.scale_by_learning_rate``, which
    gives :math:`\theta - \eta(u + \lambda\theta)` (the same as
    :func:`sophia` mathematically, not bitwise: :func:`sophia` applies the
    core's :math:`\theta(1-\eta\lambda) - \eta u`).

    Arguments, refresh and state as in :func:`sophia`.
    """
    impl = _Sophia(lr=None, weight_decay=None, weight_decay_mask=None, b1=b1, b2=b2,
                   gamma=gamma, eps=eps, clip_threshold=clip_threshold,
                   hessian_interval=hessian_interval, refresh_at_start=refresh_at_start,
                   bias_correction=bias_correction, maximize=maximize,
                   hessian_bias_correction=hessian_bias_correction,
                   target_unclipped_share=target_unclipped_share,
                   require_refresh=require_refresh, warn_sign_momentum=warn_sign_momentum,
                   refresh_when=refresh_when, refresh_after_step=refresh_after_step,
                   probe=probe, n_probes=n_probes, key=key, state_dtype=state_dtype,
                   axis_name=axis_name)

    def update(updates: optax.Updates, state: SophiaState, params: optax.Params | None = None,
               **extra_args: Any) -> tuple[optax.Updates, SophiaState]:
        return impl.run(impl.direction, updates, state, params, extra_args)

    return optax.GradientTransformationExtraArgs(impl.init, update)


def exact_sophia(
    learning_rate: optax.ScalarOrSchedule = _D["lr"],
    *,
    b1: float = _D["b1"],
    b2: float = _D["b2"],
    gamma: float = _D["gamma"],
    weight_decay: float = _D["weight_decay"],
    eps: float = _D["eps"],
    clip_threshold: float = _D["clip_threshold"],
    hessian_interval: int = _D["hessian_interval"],
    refresh_at_start: bool = _D["refresh_at_start"],
    bias_correction: bool = _D["bias_correction"],
    maximize: bool = _D["maximize"],
    hessian_bias_correction: bool = _D["hessian_bias_correction"],
    target_unclipped_share: float | None = _D["target_unclipped_share"],
    require_refresh: bool = _D["require_refresh"],
    warn_sign_momentum: bool = _D["warn_sign_momentum"],
    refresh_when: Literal["due", "given"] = "due",
    refresh_after_step: bool = False,
    weight_decay_mask: Any = None,
    probe: Literal["gaussian", "rademacher"] = "gaussian",
    n_probes: int = 1,
    key: int | jax.Array | None = None,
    state_dtype: Any = None,
    axis_name: Any = None,
) -> ExactSophia:
    """:func:`sophia`'s step returning the new parameters themselves.

    ``apply(grads, state, params, **extra_args) -> (new_params, new_state)``
    gives the parameters exactly as :func:`sophia_core.sophia_update`
    computes them; ``optax.apply_updates(params, updates)`` after
    :func:`sophia` gives the same numbers except where adding
    ``new - old`` back rounds (a coordinate that crosses zero or changes by
    more than a factor of two in one step). Use it where trajectories must
    match other backends bit for bit (the conformance suite does). The
    arguments and the state are :func:`sophia`'s.
    """
    impl = _Sophia(lr=learning_rate, weight_decay=weight_decay,
                   weight_decay_mask=weight_decay_mask, b1=b1, b2=b2, gamma=gamma, eps=eps,
                   clip_threshold=clip_threshold, hessian_interval=hessian_interval,
                   refresh_at_start=refresh_at_start, bias_correction=bias_correction,
                   maximize=maximize, hessian_bias_correction=hessian_bias_correction,
                   target_unclipped_share=target_unclipped_share,
                   require_refresh=require_refresh, warn_sign_momentum=warn_sign_momentum,
                   refresh_when=refresh_when, refresh_after_step=refresh_after_step,
                   probe=probe, n_probes=n_probes, key=key, state_dtype=state_dtype,
                   axis_name=axis_name)

    def apply(grads: optax.Updates, state: SophiaState, params: optax.Params,
              **extra_args: Any) -> tuple[optax.Params, SophiaState]:
        return impl.run(impl.new_params, grads, state, params, extra_args)

    return ExactSophia(impl.init, apply)


def sophia(
    learning_rate: optax.ScalarOrSchedule = _D["lr"],
    *,
    b1: float = _D["b1"],
    b2: float = _D["b2"],
    gamma: float = _D["gamma"],
    weight_decay: float = _D["weight_decay"],
    eps: float = _D["eps"],
    clip_threshold: float = _D["clip_threshold"],
    hessian_interval: int = _D["hessian_interval"],
    refresh_at_start: bool = _D["refresh_at_start"],
    bias_correction: bool = _D["bias_correction"],
    maximize: bool = _D["maximize"],
    hessian_bias_correction: bool = _D["hessian_bias_correction"],
    target_unclipped_share: float | None = _D["target_unclipped_share"],
    require_refresh: bool = _D["require_refresh"],
    warn_sign_momentum: bool = _D["warn_sign_momentum"],
    refresh_when: Literal["due", "given"] = "due",
    refresh_after_step: bool = False,
    weight_decay_mask: Any = None,
    probe: Literal["gaussian", "rademacher"] = "gaussian",
    n_probes: int = 1,
    key: int | jax.Array | None = None,
    state_dtype: Any = None,
    axis_name: Any = None,
) -> optax.GradientTransformationExtraArgs:
    r"""Sophia (Liu et al., 2024) as an optax transformation.

    Each step is :func:`sophia_core.sophia_update` on every leaf (the math is
    in its docstring); the updates returned are ``new_params - params``, so
    ``optax.apply_updates`` gives the core's parameters (to the rounding of
    that subtraction; :func:`exact_sophia` gives them exactly).

    The Hessian estimate comes in through one keyword extra argument,
    ``tx.update(grads, state, params, sophia_estimator=...)``, a
    :class:`~sophia_jax.GaussNewtonBartlett` (Sophia-G), a
    :class:`~sophia_jax.Hutchinson` (Sophia-H) or a
    :class:`~sophia_jax.HessianDiagonalFn` (your own). It is evaluated only
    when a refresh happens (``lax.cond`` under ``jax.jit``) and folded into
    ``h`` with :func:`sophia_core.fold_hessian`; the new ``h`` is used by
    this very step. With the default ``refresh_when="due"`` a refresh
    happens when :func:`sophia_core.refresh_due` says so for the count of
    completed steps, and an update without an estimator is an error (unless
    ``require_refresh=False``).

    Args:
      learning_rate: a float or an optax schedule of the step count.
      b1, b2, gamma, weight_decay, eps, clip_threshold, hessian_interval,
        refresh_at_start, bias_correction, maximize: the core's
        hyperparameters (``sophia_core.DEFAULTS``).
      hessian_bias_correction: fold the n-th estimate with decay
        ``1 - (1-b2)/(1-b2**n)`` (the first sets ``h = hhat``).
      target_unclipped_share: set gamma at each refresh so that this share
        of coordinates takes unclipped steps (None: gamma stays fixed).
      require_refresh: with the default ``refresh_when="due"``, an update
        without ``sophia_estimator=`` is a ``TypeError`` at trace time, and
        a run whose estimates never arrive warns once. ``False`` allows
        plain sign momentum (h = 0).
      warn_sign_momentum: warn once when the unclipped share stays below
        ``sophia_core.SIGN_MOMENTUM_SHARE`` (the regime detector).
      refresh_when: ``"due"``: the estimator (given on every update) runs
        when ``sophia_core.refresh_due`` says so; ``"given"``: it runs on
        every update that gets one, so the loop sets the cadence.
      refresh_after_step: fold the estimate in *after* this step instead of
        before it (the estimate is still taken at ``params``): the order of
        ``optax.contrib.sophia``.
      weight_decay_mask: a pytree of bools (or a prefix of the parameters'
        tree), or a function of the parameters returning one; ``False``
        leaves get no weight decay.
      probe: ``"gaussian"`` or ``"rademacher"`` Hutchinson probes.
      n_probes: Hutchinson probes per refresh (vmapped; may be injected).
      key: an int seed or a ``jax.random`` key (typed or raw) for the
        estimators' noise.
      state_dtype: dtype of ``m`` and ``h`` (default: float32 for narrow
        parameters, else the parameter's).
      axis_name: the data-parallel axis inside ``shard_map``/``pmap``; the
        estimate is then reduced across it (see ``estimate_hessian``).

    Returns:
      An ``optax.GradientTransformationExtraArgs`` with state
      :class:`SophiaState`.

    Example:
      >>> import jax.numpy as jnp, optax, sophia_jax
      >>> params = {"w": jnp.ones(3, jnp.float32)}
      >>> tx = sophia_jax.sophia(0.5, b1=0.0, b2=0.0, weight_decay=0.0, hessian_interval=1)
      >>> state = tx.init(params)
      >>> grads = {"w": jnp.array([1.0, -1.0, 0.0], jnp.float32)}
      >>> # hhat = 50: u = g / (0.04 * 50) = g / 2, a step of lr * g / 2
      >>> hessian = sophia_jax.HessianDiagonalFn(lambda p, key: {"w": jnp.full(3, 50.0)})
      >>> updates, state = tx.update(grads, state, params, sophia_estimator=hessian)
      >>> int(state.hessian_refreshes), updates["w"].tolist()
      (1, [-0.25, 0.25, 0.0])
    """
    exact = exact_sophia(
        learning_rate, b1=b1, b2=b2, gamma=gamma, weight_decay=weight_decay, eps=eps,
        clip_threshold=clip_threshold, hessian_interval=hessian_interval,
        refresh_at_start=refresh_at_start, bias_correction=bias_correction, maximize=maximize,
        hessian_bias_correction=hessian_bias_correction,
        target_unclipped_share=target_unclipped_share, require_refresh=require_refresh,
        warn_sign_momentum=warn_sign_momentum, refresh_when=refresh_when,
        refresh_after_step=refresh_after_step, weight_decay_mask=weight_decay_mask,
        probe=probe, n_probes=n_probes, key=key, state_dtype=state_dtype, axis_name=axis_name)

    def update(updates: optax.Updates, state: SophiaState, params: optax.Params | None = None,
               **extra_args: Any) -> tuple[optax.Updates, SophiaState]:
        theta, state = exact.apply(updates, state, params, **extra_args)
        return jax.tree.map(lambda new, old: new - old, theta, params), state

    return optax.GradientTransformationExtraArgs(exact.init, update)


def optax_contrib_sophia(
    learning_rate: optax.ScalarOrSchedule,
    b1: float = 0.965,
    b2: float = 0.99,
    eps: float = 1e-8,
    weight_decay: float = 1e-4,
    weight_decay_mask: Any = None,
    gamma: float = 0.01,
    clip_threshold: float = 1.0,
    update_interval: int = 10,
    *,
    key: int | jax.Array | None = None,
    require_refresh: bool = _D["require_refresh"],
) -> optax.GradientTransformationExtraArgs:
    """Our configuration that reproduces ``optax.contrib.sophia`` step for step.

    Takes ``optax.contrib.sophia``'s arguments in its order. It (levanter's
    variant) differs from the authors' defaults in: bias-corrected momentum,
    ``eps=1e-8``, ``gamma=0.01``, ``weight_decay=1e-4`` added to the
    direction (``theta - lr*(u + wd*theta)``), Rademacher probes, and the
    refresh folded in *after* the step of every call whose incoming count is
    a multiple of ``update_interval`` (count 0 included). Pass
    ``sophia_estimator=sophia_jax.Hutchinson(obj_fn)`` where optax takes
    ``obj_fn=``. With ``key`` equal to optax's ``random_seed`` the probes
    are optax's (negated, which leaves ``u*Hu`` unchanged). Steps agree
    bitwise except where the bias correction enters an unclipped
    coordinate: optax divides by ``1 - b1**t``,
    :func:`sophia_core.bias_corrected` multiplies by the reciprocal (an ulp
    apart).
    """
    _validate(lr=learning_rate, weight_decay=weight_decay)
    return optax.chain(
        scale_by_sophia(
            b1=b1, b2=b2, gamma=gamma, eps=eps, clip_threshold=clip_threshold,
            hessian_interval=update_interval, refresh_at_start=True, bias_correction=True,
            refresh_after_step=True, probe="rademacher", key=key,
            require_refresh=require_refresh,
        ),
        optax.add_decayed_weights(weight_decay, mask=weight_decay_mask),
        optax.scale_by_learning_rate(learning_rate),
    )


def sophia_state(opt_state: Any) -> SophiaState:
    """The :class:`SophiaState` inside ``opt_state``.

    Searches any nesting of optax states (``optax.chain``,
    ``optax.inject_hyperparams``, ``optax.masked``...). Raises ValueError
    when there is none or more than one.
    """
    found = [
        leaf for leaf in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, SophiaState))
        if isinstance(leaf, SophiaState)
    ]
    if len(found) != 1:
        raise ValueError(f"expected one SophiaState in the optimizer state, found {len(found)}")
    return found[0]
