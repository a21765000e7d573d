r"""The Sophia update, the Hessian EMA and the refresh schedule (SPEC 1, 2).

Every function is pure: arrays in, new arrays out, no in-place writes and no
Python branching on array values. Adapters write the results back.

The update for one parameter :math:`\theta` with gradient :math:`g`, at the
1-based step :math:`t` (the step being taken):

.. math::

    g &\leftarrow -g \quad \text{if maximize} \\
    m &\leftarrow \beta_1 m + (1 - \beta_1) g \\
    \hat m &\leftarrow m / (1 - \beta_1^t) \quad \text{if bias\_correction, else } m \\
    \theta &\leftarrow \theta \, (1 - \eta \lambda) \\
    u &\leftarrow \operatorname{clip}\!\big(\hat m / \max(\gamma h, \epsilon), -c, c\big) \\
    \theta &\leftarrow \theta - \eta u

and, on refresh steps only, :math:`h \leftarrow \beta_2 h + (1 - \beta_2)\hat h`
with :math:`\hat h` from an estimator (``sophia_core._estimators``).

Because :math:`\max(\gamma h, \epsilon) > 0`, a zero or negative :math:`h`
gives the sign step :math:`u = c\,\operatorname{sign}(m)`, and
:math:`|u| \le c` always: no coordinate moves more than :math:`\eta c` beyond
weight decay.

The operation order above is the contract for cross-backend bitwise
agreement: every backend runs these functions, so every backend executes the
same IEEE operation sequence. Scalar coefficients (``1 - b1``, ``1 - lr*wd``)
are computed in Python double precision when they are Python numbers.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from ._namespace import (
    LARGEST,
    check_eps,
    check_floating,
    check_same_shape,
    compute_dtype,
    dtype_name,
    namespace_of,
)

__all__ = [
    "HessianFold",
    "SophiaState",
    "apply_step",
    "bias_corrected",
    "fold_hessian",
    "hessian_decay",
    "hessian_ema",
    "init_state",
    "momentum_update",
    "preconditioned_step",
    "refresh_due",
    "sophia_update",
]


class SophiaState(NamedTuple):
    """Per-parameter state: momentum ``m`` and the Hessian EMA ``h``.

    The step counter is shared by all parameters and kept by the adapter.
    """

    m: Any
    h: Any


def init_state(param: Any, *, state_dtype: Any = None, xp: Any = None) -> SophiaState:
    """Zero state for ``param``: float32 for narrow parameters by default."""
    xp = namespace_of(param, xp=xp)
    check_floating("param", param, xp=xp)
    dtype = compute_dtype(param.dtype, xp=xp) if state_dtype is None else state_dtype
    zeros = xp.zeros_like(param, dtype=dtype)
    return SophiaState(m=zeros, h=xp.zeros_like(param, dtype=dtype))


def momentum_update(m: Any, grad: Any, *, b1: float, maximize: bool = False) -> Any:
    """``b1*m + (1-b1)*g``, with ``g`` negated when maximizing."""
    if maximize:
        grad = -grad
    return b1 * m + (1.0 - b1) * grad


def _as_float(step: Any, dtype: Any, xp: Any) -> Any:
    """A step count usable as an exponent: Python numbers stay Python.

    A float64 array step stays float64 (see :func:`bias_corrected`); any
    other array is cast to ``dtype``.
    """
    if isinstance(step, (int, float)):
        return step
    if step.dtype == xp.float64:
        return step
    return xp.astype(step, dtype)


def bias_corrected(m: Any, *, b1: float, step: Any, bias_correction: bool,
                   xp: Any = None) -> Any:
    """``m / (1 - b1**step)`` if ``bias_correction`` else ``m``.

    Computed as ``m * (1 / (1 - b1**step))`` with the factor formed first (in
    Python double precision for a Python ``step``): XLA rewrites division by
    a constant into multiplication by its reciprocal, so writing the
    multiplication ourselves keeps every backend on the same operation.
    A float64 array ``step`` forms the factor in double precision too and
    rounds it once to ``m``'s dtype, so compiled code with a traced step
    (``jax.jit`` with x64) matches the Python-int path bit for bit in
    float32; other array steps form it in ``m``'s dtype.
    """
    if not bias_correction:
        return m
    xp = namespace_of(m, xp=xp)
    factor = 1.0 / (1.0 - b1 ** _as_float(step, m.dtype, xp))
    if not isinstance(factor, float):
        factor = xp.astype(factor, m.dtype)
    return m * factor


def denominator(h: Any, *, gamma: Any, eps: Any, xp: Any = None) -> Any:
    """``d = max(gamma*h, eps)``, held below the dtype's largest finite value.

    The upper bound only acts where ``gamma*h`` overflowed, so ``mhat / d``
    is never ``inf / inf`` (NaN): an overflowed ``mhat`` then gives a clipped
    step, an overflowed ``gamma*h`` a step of 0. Elsewhere it is exactly
    ``max(gamma*h, eps)``.
    """
    xp = namespace_of(h, xp=xp)
    return xp.clip(gamma * h, min=eps, max=LARGEST[dtype_name(h.dtype, xp=xp)])


def preconditioned_step(mhat: Any, h: Any, *, gamma: float, eps: float,
                        clip_threshold: float, xp: Any = None) -> Any:
    """``u = clip(mhat / max(gamma*h, eps), -c, c)``: the clipped Newton step.

    Bounded by ``c`` for every finite input, also where ``mhat`` or
    ``gamma*h`` overflow (see :func:`denominator`).
    """
    xp = namespace_of(mhat, h, xp=xp)
    ratio = mhat / denominator(h, gamma=gamma, eps=eps, xp=xp)
    return xp.clip(ratio, min=-clip_threshold, max=clip_threshold)


def apply_step(param: Any, u: Any, *, lr: Any, weight_decay: float) -> Any:
    """Decoupled weight decay on the pre-update parameter, then ``- lr*u``.

    The decay is skipped only for a Python ``0``: an array ``weight_decay``
    (a traced or injected hyperparameter) is always applied, since branching
    on its value would break ``jax.jit`` (``1 - lr*0`` is exactly 1 anyway).
    """
    if not (isinstance(weight_decay, (int, float)) and weight_decay == 0):
        param = param * (1.0 - lr * weight_decay)
    return param - lr * u


def sophia_update(
    param: Any,
    grad: Any,
    state: SophiaState,
    *,
    step: Any,
    lr: Any,
    b1: float,
    gamma: float,
    weight_decay: float,
    eps: float,
    clip_threshold: float,
    bias_correction: bool = False,
    maximize: bool = False,
    xp: Any = None,
) -> tuple[Any, SophiaState]:
    """One Sophia step for one parameter; returns ``(new_param, new_state)``.

    ``step`` is the 1-based index of this step (completed steps + 1), a
    Python int or a 0-d integer array. ``lr`` is a float or a 0-d array.
    Parameters narrower than float32 are computed in float32 and cast back;
    the state keeps its own dtype. ``h`` is not changed here: see
    :func:`hessian_ema`.

    Raises TypeError for non-floating arrays and ValueError (naming both
    shapes) when a gradient or state shape differs from the parameter's.
    """
    xp = namespace_of(param, grad, state.m, state.h, xp=xp)
    for name, array in (("param", param), ("grad", grad), ("m", state.m), ("h", state.h)):
        check_floating(name, array, xp=xp)
        check_same_shape("param", param, name, array)
    dtype = compute_dtype(param.dtype, xp=xp)
    check_eps(eps, dtype, xp=xp, gamma=gamma)
    theta = xp.astype(param, dtype, copy=False)
    m = momentum_update(
        xp.astype(state.m, dtype, copy=False),
        xp.astype(grad, dtype, copy=False),
        b1=b1,
        maximize=maximize,
    )
    mhat = bias_corrected(m, b1=b1, step=step, bias_correction=bias_correction, xp=xp)
    u = preconditioned_step(
        mhat, xp.astype(state.h, dtype, copy=False),
        gamma=gamma, eps=eps, clip_threshold=clip_threshold, xp=xp,
    )
    theta = apply_step(theta, u, lr=lr, weight_decay=weight_decay)
    new_state = SophiaState(m=xp.astype(m, state.m.dtype, copy=False), h=state.h)
    return xp.astype(theta, param.dtype, copy=False), new_state


class HessianFold(NamedTuple):
    """The result of folding one Hessian estimate into ``h``."""

    #: The new Hessian EMA.
    h: Any
    #: How many coordinates kept their old ``h`` because the estimate was not
    #: finite there (0-d integer array).
    rejected: Any


def hessian_decay(b2: Any, refresh: Any = None, *, bias_correction: bool = False,
                  dtype: Any = None, xp: Any = None) -> Any:
    """The EMA's decay at the ``refresh``-th fold (1-based).

    ``b2`` without bias correction. With it, ``1 - (1-b2) / (1-b2**n)``:
    the first fold sets ``h = hhat`` and the decay rises to ``b2``, so ``h``
    is the bias-corrected average of the estimates so far (as Adam's second
    moment, folded into ``h`` itself). A Python int ``refresh`` gives a
    Python float (double precision, as on every backend); an array
    ``refresh`` is handled as :func:`bias_corrected` handles an array step
    (float64 stays float64, anything else is cast to ``dtype``).
    """
    if not bias_correction:
        return b2
    if refresh is None:
        raise ValueError("hessian_bias_correction needs the refresh count n (1-based)")
    if isinstance(refresh, int):
        if refresh < 1:
            raise ValueError(f"refresh must be >= 1, got {refresh}")
        return 1.0 - (1.0 - b2) / (1.0 - b2**refresh)
    xp = namespace_of(refresh, xp=xp)
    n = _as_float(refresh, dtype if dtype is not None else xp.float32, xp)
    return 1.0 - (1.0 - b2) / (1.0 - b2**n)


def fold_hessian(h: Any, hhat: Any, *, b2: Any, refresh: Any = None,
                 bias_correction: bool = False, xp: Any = None) -> HessianFold:
    """``h <- b2n*h + (1-b2n)*hhat`` where that is finite; elsewhere ``h`` stays.

    ``b2n`` is :func:`hessian_decay` (``b2`` unless ``bias_correction``,
    which needs ``refresh``, the 1-based index of this fold). The estimate
    is cast to ``h``'s dtype first. **Non-finite policy**: a coordinate whose
    new value would not be finite (a NaN or infinite estimate, a finite one
    that overflows ``h``'s dtype, or an overflowing sum) keeps its old ``h``;
    :attr:`HessianFold.rejected` counts them. A bad estimate therefore never
    enters ``h``, and a later finite one is folded normally.
    """
    xp = namespace_of(h, hhat, xp=xp)
    check_floating("h", h, xp=xp)
    check_floating("hhat", hhat, xp=xp)
    check_same_shape("h", h, "hhat", hhat)
    decay = hessian_decay(b2, refresh, bias_correction=bias_correction, dtype=h.dtype, xp=xp)
    rest = 1.0 - decay  # formed before rounding: a float64 decay gives numpy's 1 - b2n
    if not isinstance(decay, (int, float)):
        decay, rest = xp.astype(decay, h.dtype), xp.astype(rest, h.dtype)
    candidate = decay * h + rest * xp.astype(hhat, h.dtype, copy=False)
    finite = xp.isfinite(candidate)
    rejected = xp.sum(xp.astype(~finite, xp.int32))
    return HessianFold(h=xp.where(finite, candidate, h), rejected=rejected)


def hessian_ema(h: Any, hhat: Any, *, b2: float, xp: Any = None) -> Any:
    """``b2*h + (1-b2)*hhat`` in ``h``'s dtype, with :func:`fold_hessian`'s
    non-finite policy (no bias correction, no count)."""
    return fold_hessian(h, hhat, b2=b2, xp=xp).h


def refresh_due(completed_steps: Any, *, hessian_interval: int,
                refresh_at_start: bool = True) -> Any:
    """Whether the Hessian EMA is refreshed after ``completed_steps`` steps.

    Due when ``completed_steps % hessian_interval == 0``; with
    ``refresh_at_start=False`` (the authors' training loop) step 0 is not
    due, so refreshes follow steps k, 2k, ... only. Works on Python ints
    (returns bool) and 0-d integer arrays (returns a 0-d bool array, for
    ``lax.cond`` and friends).
    """
    due = (completed_steps % hessian_interval) == 0
    if not refresh_at_start:
        due = due & (completed_steps > 0)
    return due
