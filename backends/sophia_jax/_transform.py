"""Sophia as optax gradient transformations.

The update math is :func:`sophia_core.sophia_update` (see its docstring and
``sophia_core._update``); this module maps optax's conventions onto it: a
pytree of parameters, a ``NamedTuple`` state, schedules, weight-decay masks,
estimator inputs as keyword extra arguments and a ``lax.cond`` refresh.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

import sophia_core

from ._estimators import estimate_hessian, estimator_inputs

__all__ = [
    "SophiaState",
    "SophiaTransformation",
    "optax_contrib_sophia",
    "scale_by_sophia",
    "sophia",
    "sophia_state",
]


class SophiaState(NamedTuple):
    """Optax state of :func:`sophia` and :func:`scale_by_sophia`.

    ``count`` is the number of completed steps (int32, like optax's
    counters); ``m`` and ``h`` are pytrees shaped like the parameters
    (float32 for bfloat16/float16 parameters by default); ``key`` is the
    ``jax.random`` key of the estimators' noise, split on every refresh.
    """

    count: jax.Array
    m: optax.Updates
    h: optax.Updates
    key: jax.Array


class SophiaTransformation(optax.GradientTransformationExtraArgs):
    """A ``GradientTransformationExtraArgs`` that also knows its hyperparameters.

    ``tx.apply(grads, state, params, **extra_args) -> (new_params, new_state)``
    (only for :func:`sophia`) returns the parameters exactly as
    :func:`sophia_core.sophia_update` computes them. ``optax.apply_updates``
    adds ``new_params - params`` back, which is the same number except where
    that subtraction rounds (a coordinate that crosses zero or changes by
    more than a factor of two in one step); the conformance suite uses
    ``apply``.
    """

    __slots__ = ()

    @property
    def hyperparameters(self) -> dict[str, Any]:
        """The hyperparameters in the core's spelling (for ``export_state``)."""
        return dict(self.update.hyperparameters)

    def apply(self, grads: Any, state: Any, params: Any, **extra_args: Any) -> tuple[Any, Any]:
        apply = getattr(self.update, "apply", None)
        if apply is None:
            raise TypeError("apply() is only available on sophia(), not on scale_by_sophia()")
        return apply(grads, state, params, **extra_args)


def _validate(**values: Any) -> None:
    """The core's validation of every value it can see (Python, not arrays).

    ``optax.inject_hyperparams`` hands arrays (traced under ``jax.jit``) to
    the factory; those are left to the host, like the core does for reals.
    """
    seen = {k: v for k, v in values.items() if isinstance(v, (numbers.Number, str))}
    sophia_core.validate_hyperparameters(**seen)


def _is_python_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _compute_scalar(value: Any, param: Any) -> Any:
    """A scalar hyperparameter for one leaf: Python numbers stay Python.

    An array (a schedule's output, an injected hyperparameter) is cast to the
    leaf's compute dtype, so it cannot promote a float32 parameter to float64.
    """
    if _is_python_number(value):
        return value
    return jnp.asarray(value).astype(sophia_core.compute_dtype(param.dtype, xp=jnp))


def _step_exponent(count: jax.Array) -> jax.Array:
    """The 1-based step as the widest float JAX has (float64 under x64).

    ``sophia_core.bias_corrected`` then computes ``1 - b1**t`` in double
    precision, as numpy does with a Python int and as ``optax`` does.
    """
    return optax.safe_int32_increment(count).astype(jax.dtypes.canonicalize_dtype(jnp.float64))


def _make_key(key: Any) -> jax.Array:
    """A raw ``uint32[2]`` key (a plain array leaf) from a seed or any key."""
    if key is None:
        return jax.random.PRNGKey(0)
    if hasattr(key, "dtype") and jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
        return jax.random.key_data(key)
    if isinstance(key, numbers.Integral) or (hasattr(key, "shape") and key.shape == ()):
        return jax.random.PRNGKey(key)
    return jnp.asarray(key)


class _Refresh(NamedTuple):
    """What the refresh needs; shared by both transformations."""

    b2: Any
    hessian_interval: Any
    refresh_at_start: bool
    refresh_after_step: bool
    probe: str
    n_probes: Any
    axis_name: Any

    def maybe_refresh(self, state: SophiaState, params: Any, extra_args: dict[str, Any]):
        """``(h, key)``: folded with a new estimate if one is given and due."""
        inputs = estimator_inputs(extra_args)
        if not inputs:
            return state.h, state.key
        if params is None:
            raise ValueError("params must be passed to update to refresh the Hessian estimate")
        n_probes = self.n_probes
        if "loss_fn" in inputs and not isinstance(n_probes, numbers.Integral):
            try:
                n_probes = int(n_probes)
            except jax.errors.ConcretizationTypeError as exc:
                raise ValueError(
                    "n_probes must be a Python int; under optax.inject_hyperparams pass "
                    "static_args=('n_probes',)"
                ) from exc
        due = sophia_core.refresh_due(
            state.count, hessian_interval=self.hessian_interval,
            refresh_at_start=self.refresh_at_start,
        )

        def refresh(h: Any, key: jax.Array) -> tuple[Any, jax.Array]:
            key, subkey = jax.random.split(key)
            hhat = estimate_hessian(params, subkey, inputs, probe=self.probe,
                                    n_probes=n_probes, axis_name=self.axis_name)
            treedef = jax.tree.structure(h)
            hhats = treedef.flatten_up_to(hhat)
            folded = [
                sophia_core.hessian_ema(old, new, b2=_compute_scalar(self.b2, old), xp=jnp)
                for old, new in zip(treedef.flatten_up_to(h), hhats, strict=True)
            ]
            return treedef.unflatten(folded), key

        if not isinstance(due, jax.core.Tracer):
            # Eager: run the estimate op by op, as numpy would (a lax.cond
            # would compile the branch and let XLA fuse multiply-adds).
            return refresh(state.h, state.key) if bool(due) else (state.h, state.key)
        return jax.lax.cond(due, refresh, lambda h, key: (h, key), state.h, state.key)


def _init_fn(state_dtype: Any, key: Any) -> Callable[[Any], SophiaState]:
    def init(params: Any) -> SophiaState:
        leaves, treedef = jax.tree.flatten(params)
        states = [sophia_core.init_state(p, state_dtype=state_dtype, xp=jnp) for p in leaves]
        return SophiaState(
            count=jnp.zeros([], jnp.int32),
            m=treedef.unflatten([s.m for s in states]),
            h=treedef.unflatten([s.h for s in states]),
            key=_make_key(key),
        )

    return init


def _with_refresh(refresh: _Refresh, step: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap ``step(grads, state, params) -> (out, m)`` with the refresh and counter."""

    def run(grads: Any, state: SophiaState, params: Any, **extra_args: Any):
        h, key = state.h, state.key
        if not refresh.refresh_after_step:
            h, key = refresh.maybe_refresh(state, params, extra_args)
        out, m = step(grads, state._replace(h=h), params)
        if refresh.refresh_after_step:
            h, key = refresh.maybe_refresh(state, params, extra_args)
        count = optax.safe_int32_increment(state.count)
        return out, SophiaState(count=count, m=m, h=h, key=key)

    return run


def _refresh_config(b2, hessian_interval, refresh_at_start, refresh_after_step, probe,
                    n_probes, axis_name) -> _Refresh:
    return _Refresh(b2=b2, hessian_interval=hessian_interval,
                    refresh_at_start=refresh_at_start, refresh_after_step=refresh_after_step,
                    probe=probe, n_probes=n_probes, axis_name=axis_name)


def scale_by_sophia(
    b1: Any = sophia_core.DEFAULTS["b1"],
    b2: Any = sophia_core.DEFAULTS["b2"],
    gamma: Any = sophia_core.DEFAULTS["gamma"],
    eps: Any = sophia_core.DEFAULTS["eps"],
    clip_threshold: Any = sophia_core.DEFAULTS["clip_threshold"],
    hessian_interval: Any = sophia_core.DEFAULTS["hessian_interval"],
    refresh_at_start: bool = sophia_core.DEFAULTS["refresh_at_start"],
    bias_correction: bool = sophia_core.DEFAULTS["bias_correction"],
    maximize: bool = sophia_core.DEFAULTS["maximize"],
    *,
    refresh_after_step: bool = False,
    probe: str = "gaussian",
    n_probes: Any = 1,
    key: Any = None,
    state_dtype: Any = None,
    axis_name: Any = None,
) -> SophiaTransformation:
    r"""Sophia's clipped, preconditioned direction, without learning rate or decay.

    Outputs :math:`u = \operatorname{clip}(\hat m / \max(\gamma h, \epsilon), -c, c)`
    (built from :func:`sophia_core.momentum_update`,
    :func:`sophia_core.bias_corrected` and :func:`sophia_core.preconditioned_step`),
    in the sign convention of ``optax.scale_by_adam``: chain it with
    ``optax.add_decayed_weights`` and ``optax.scale_by_learning_rate``, which
    gives :math:`\theta - \eta(u + \lambda\theta)` (the same as
    :func:`sophia` mathematically, not bitwise: :func:`sophia` applies the
    core's :math:`\theta(1-\eta\lambda) - \eta u`).

    Arguments and refresh as in :func:`sophia`.
    """
    _validate(b1=b1, b2=b2, gamma=gamma, eps=eps, clip_threshold=clip_threshold,
              hessian_interval=hessian_interval, refresh_at_start=refresh_at_start,
              bias_correction=bias_correction, maximize=maximize, probe=probe,
              n_probes=n_probes)
    refresh = _refresh_config(b2, hessian_interval, refresh_at_start, refresh_after_step,
                              probe, n_probes, axis_name)

    def direction(grads: Any, state: SophiaState, params: Any) -> tuple[Any, Any]:
        del params
        step = _step_exponent(state.count)
        treedef = jax.tree.structure(grads)
        us, ms = [], []
        for g, m, h in zip(treedef.flatten_up_to(grads), treedef.flatten_up_to(state.m),
                           treedef.flatten_up_to(state.h), strict=True):
            dtype = sophia_core.compute_dtype(g.dtype, xp=jnp)
            new_m = sophia_core.momentum_update(
                m.astype(dtype), g.astype(dtype), b1=_compute_scalar(b1, g), maximize=maximize)
            mhat = sophia_core.bias_corrected(new_m, b1=_compute_scalar(b1, g), step=step,
                                              bias_correction=bias_correction, xp=jnp)
            u = sophia_core.preconditioned_step(
                mhat, h.astype(dtype), gamma=_compute_scalar(gamma, g),
                eps=_compute_scalar(eps, g), clip_threshold=_compute_scalar(clip_threshold, g),
                xp=jnp,
            )
            us.append(u.astype(g.dtype))
            ms.append(new_m.astype(m.dtype))
        return treedef.unflatten(us), treedef.unflatten(ms)

    run = _with_refresh(refresh, direction)

    def update(updates: Any, state: SophiaState, params: Any = None, **extra_args: Any):
        return run(updates, state, params, **extra_args)

    update.hyperparameters = dict(
        b1=b1, b2=b2, gamma=gamma, eps=eps, clip_threshold=clip_threshold,
        hessian_interval=hessian_interval, refresh_at_start=refresh_at_start,
        bias_correction=bias_correction, maximize=maximize,
    )
    return SophiaTransformation(_init_fn(state_dtype, key), update)


def sophia(
    learning_rate: optax.ScalarOrSchedule = sophia_core.DEFAULTS["lr"],
    b1: Any = sophia_core.DEFAULTS["b1"],
    b2: Any = sophia_core.DEFAULTS["b2"],
    gamma: Any = sophia_core.DEFAULTS["gamma"],
    weight_decay: Any = sophia_core.DEFAULTS["weight_decay"],
    eps: Any = sophia_core.DEFAULTS["eps"],
    clip_threshold: Any = sophia_core.DEFAULTS["clip_threshold"],
    hessian_interval: Any = sophia_core.DEFAULTS["hessian_interval"],
    refresh_at_start: bool = sophia_core.DEFAULTS["refresh_at_start"],
    bias_correction: bool = sophia_core.DEFAULTS["bias_correction"],
    maximize: bool = sophia_core.DEFAULTS["maximize"],
    *,
    weight_decay_mask: Any = None,
    refresh_after_step: bool = False,
    probe: str = "gaussian",
    n_probes: Any = 1,
    key: Any = None,
    state_dtype: Any = None,
    axis_name: Any = None,
) -> SophiaTransformation:
    r"""Sophia (Liu et al., 2024) as an optax transformation.

    Each step is :func:`sophia_core.sophia_update` on every leaf (the math is
    in its docstring); the updates returned are ``new_params - params``, so
    ``optax.apply_updates`` gives the core's parameters (``tx.apply`` gives
    them bitwise, see :class:`SophiaTransformation`).

    ``tx.update(grads, state, params)`` steps with the current Hessian EMA.
    Keyword extra arguments ask for a refresh, which happens when
    :func:`sophia_core.refresh_due` says so for the completed-step count
    (``lax.cond``); the refreshed ``h`` is used by this very step:

    - ``hhat=pytree``: a precomputed estimate;
    - ``logits_fn=f`` (``f(params) -> logits`` of shape ``(..., V)``, with an
      optional boolean ``label_mask=`` of shape ``(...)``): Sophia-G, labels
      sampled from the model with the key in the state, ``N`` counted from
      the mask;
    - ``loss_fn=f`` (``f(params) -> scalar``): Sophia-H, Hutchinson with
      ``n_probes`` ``probe`` probes and ``jax.jvp(jax.grad(f))`` products.

    Args:
      learning_rate: a float or an optax schedule of the step count.
      b1, b2, gamma, weight_decay, eps, clip_threshold, hessian_interval,
        refresh_at_start, bias_correction, maximize: the core's
        hyperparameters (``sophia_core.DEFAULTS``), validated by the core.
      weight_decay_mask: a pytree of bools (or a prefix of the parameters'
        tree), or a function of the parameters returning one; ``False``
        leaves get no weight decay.
      refresh_after_step: fold the estimate in *after* this step instead of
        before it (the estimate is still taken at ``params``): the order of
        ``optax.contrib.sophia``.
      probe: ``"gaussian"`` or ``"rademacher"`` Hutchinson probes.
      n_probes: Hutchinson probes per refresh (a static int).
      key: an int seed or a ``jax.random.PRNGKey`` for the estimators' noise.
      state_dtype: dtype of ``m`` and ``h`` (default: float32 for narrow
        parameters, else the parameter's).
      axis_name: the data-parallel axis inside ``shard_map``/``pmap``; the
        estimate is then reduced across it (see ``estimate_hessian``).

    Returns:
      A :class:`SophiaTransformation` (an ``optax.GradientTransformationExtraArgs``)
      with state :class:`SophiaState`.

    Example:
      >>> import jax.numpy as jnp, optax, sophia_jax
      >>> params = {"w": jnp.ones(3, jnp.float32)}
      >>> tx = sophia_jax.sophia(1e-2, weight_decay=0.0)
      >>> state = tx.init(params)
      >>> grads = {"w": jnp.array([1.0, -1.0, 0.0], jnp.float32)}
      >>> updates, state = tx.update(grads, state, params)
      >>> optax.apply_updates(params, updates)["w"].tolist()
      [0.9900000095367432, 1.0099999904632568, 1.0]
    """
    _validate(lr=learning_rate, b1=b1, b2=b2, gamma=gamma, weight_decay=weight_decay, eps=eps,
              clip_threshold=clip_threshold, hessian_interval=hessian_interval,
              refresh_at_start=refresh_at_start, bias_correction=bias_correction,
              maximize=maximize, probe=probe, n_probes=n_probes)
    refresh = _refresh_config(b2, hessian_interval, refresh_at_start, refresh_after_step,
                              probe, n_probes, axis_name)

    def decays(params: Any) -> list[Any]:
        treedef = jax.tree.structure(params)
        if weight_decay_mask is None:
            return [weight_decay] * treedef.num_leaves
        mask = weight_decay_mask(params) if callable(weight_decay_mask) else weight_decay_mask
        mask = treedef.flatten_up_to(jax.tree.broadcast(mask, params))
        return [weight_decay if bool(keep) else 0.0 for keep in mask]

    def new_params(grads: Any, state: SophiaState, params: Any) -> tuple[Any, Any]:
        if params is None:
            raise ValueError("sophia's update needs params: tx.update(grads, state, params)")
        lr = learning_rate(state.count) if callable(learning_rate) else learning_rate
        step = _step_exponent(state.count)
        treedef = jax.tree.structure(params)
        thetas, ms = [], []
        for p, g, m, h, wd in zip(
            treedef.flatten_up_to(params), treedef.flatten_up_to(grads),
            treedef.flatten_up_to(state.m), treedef.flatten_up_to(state.h), decays(params),
            strict=True,
        ):
            theta, core_state = sophia_core.sophia_update(
                p, g, sophia_core.SophiaState(m=m, h=h), step=step,
                lr=_compute_scalar(lr, p), b1=_compute_scalar(b1, p),
                gamma=_compute_scalar(gamma, p), weight_decay=_compute_scalar(wd, p),
                eps=_compute_scalar(eps, p), clip_threshold=_compute_scalar(clip_threshold, p),
                bias_correction=bias_correction, maximize=maximize, xp=jnp,
            )
            thetas.append(theta)
            ms.append(core_state.m)
        return treedef.unflatten(thetas), treedef.unflatten(ms)

    run = _with_refresh(refresh, new_params)

    def update(updates: Any, state: SophiaState, params: Any = None, **extra_args: Any):
        theta, state = run(updates, state, params, **extra_args)
        return jax.tree.map(lambda new, old: new - old, theta, params), state

    update.apply = run
    update.hyperparameters = dict(
        lr=learning_rate if _is_python_number(learning_rate) else None,
        b1=b1, b2=b2, gamma=gamma, weight_decay=weight_decay, eps=eps,
        clip_threshold=clip_threshold, hessian_interval=hessian_interval,
        refresh_at_start=refresh_at_start, bias_correction=bias_correction, maximize=maximize,
    )
    return SophiaTransformation(_init_fn(state_dtype, key), update)


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
    key: Any = None,
) -> optax.GradientTransformationExtraArgs:
    """Our configuration that reproduces ``optax.contrib.sophia`` step for step.

    ``optax.contrib.sophia`` (levanter's variant) differs from the authors'
    defaults in: bias-corrected momentum, ``eps=1e-8``, ``gamma=0.01``,
    ``weight_decay=1e-4`` added to the direction (``theta - lr*(u + wd*theta)``),
    Rademacher probes, and the refresh folded in *after* the step of every
    call whose incoming count is a multiple of ``update_interval`` (count 0
    included). Pass ``loss_fn=`` where optax takes ``obj_fn=``, or ``hhat=``.
    With ``key`` equal to optax's ``random_seed`` the probes are optax's
    (negated, which leaves ``u*Hu`` unchanged). Steps agree bitwise except
    where the bias correction enters an unclipped coordinate: optax divides
    by ``1 - b1**t``, :func:`sophia_core.bias_corrected` multiplies by the
    reciprocal (an ulp apart).
    """
    return optax.chain(
        scale_by_sophia(
            b1=b1, b2=b2, gamma=gamma, eps=eps, clip_threshold=clip_threshold,
            hessian_interval=update_interval, refresh_at_start=True, bias_correction=True,
            refresh_after_step=True, probe="rademacher", key=key,
        ),
        optax.add_decayed_weights(weight_decay, mask=weight_decay_mask),
        optax.scale_by_learning_rate(learning_rate),
    )


def sophia_state(opt_state: Any) -> SophiaState:
    """The :class:`SophiaState` (fields ``count``, ``m``, ``h``, ``key``) inside ``opt_state``.

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
