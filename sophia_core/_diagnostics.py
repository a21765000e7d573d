r"""What Sophia can tell about itself: the unclipped share, the sign-momentum
regime, missing refreshes, and gamma from a target unclipped share.

A coordinate's step is *unclipped* when :math:`|\hat m| / \max(\gamma h,
\epsilon) < c`. Its share of all coordinates (the authors' "win rate") says
which regime Sophia is in: near 0 every coordinate takes the sign step
:math:`\eta c\,\mathrm{sign}(m)` (sign momentum, the curvature has no say);
the authors tune :math:`\gamma` for 0.1 to 0.5. Raising :math:`\gamma`
raises the share.

Adapters evaluate these once per refresh, right after the fold
(:func:`after_fold` runs the three in order for one set of arrays):

1. :func:`gamma_for_unclipped_share` when ``target_unclipped_share`` is set
   (the new gamma is used from the next step on);
2. :func:`unclipped_count` / :func:`unclipped_share` with the gamma in use;
3. :func:`sign_momentum_regime` on that share, which says when to warn
   (once per optimizer, :func:`sign_momentum_message`).

:func:`missing_refresh` says when an optimizer has gone past its first due
refresh by more than ``hessian_interval`` steps with no Hessian estimate at
all (every step so far was a sign step).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

from ._namespace import check_same_shape, namespace_of
from ._update import bias_corrected, denominator

__all__ = [
    "SIGN_MOMENTUM_PATIENCE",
    "SIGN_MOMENTUM_SHARE",
    "SIGN_MOMENTUM_WARMUP",
    "AfterFold",
    "after_fold",
    "clip_fraction",
    "gamma_for_unclipped_share",
    "missing_refresh",
    "missing_refresh_message",
    "sign_momentum_message",
    "sign_momentum_regime",
    "unclipped_count",
    "unclipped_share",
]

#: Below this unclipped share Sophia is, in effect, sign momentum.
SIGN_MOMENTUM_SHARE = 0.1
#: Refreshes before the detector starts judging (m and h have a history).
SIGN_MOMENTUM_WARMUP = 10
#: Consecutive refreshes below :data:`SIGN_MOMENTUM_SHARE` before it warns.
SIGN_MOMENTUM_PATIENCE = 10


def _size(array: Any) -> int:
    size = 1
    for n in array.shape:
        size *= int(n)
    return size


def _check_pairs(ms: Sequence[Any], hs: Sequence[Any], what: str) -> None:
    if len(ms) != len(hs):
        raise ValueError(f"got {len(ms)} momentum arrays but {len(hs)} Hessian arrays")
    if not ms:
        raise ValueError(f"{what} needs at least one array")
    for m, h in zip(ms, hs, strict=True):
        check_same_shape("m", m, "h", h)


def unclipped_count(
    ms: Sequence[Any],
    hs: Sequence[Any],
    *,
    gamma: Any,
    eps: Any,
    clip_threshold: Any,
    b1: Any = 0.0,
    step: Any = 1,
    bias_correction: bool = False,
    xp: Any = None,
) -> tuple[Any, int]:
    """``(count, total)``: coordinates whose step is not clipped, and all of them.

    ``|mhat / max(gamma*h, eps)| < c`` with the update's own
    ``mhat`` and denominator, counted exactly (an integer array) over all
    the given arrays; ``total`` is a Python int. Param groups with different
    gamma add their counts.
    """
    _check_pairs(ms, hs, "unclipped_count")
    xp = namespace_of(*ms, *hs, xp=xp)
    count = None
    for m, h in zip(ms, hs, strict=True):
        mhat = bias_corrected(m, b1=b1, step=step, bias_correction=bias_correction, xp=xp)
        ratio = xp.abs(mhat / denominator(h, gamma=gamma, eps=eps, xp=xp))
        part = xp.sum(xp.astype(ratio < clip_threshold, xp.int32))
        count = part if count is None else count + part
    return count, sum(_size(m) for m in ms)


def unclipped_share(
    ms: Sequence[Any],
    hs: Sequence[Any],
    *,
    gamma: Any,
    eps: Any,
    clip_threshold: Any,
    b1: Any = 0.0,
    step: Any = 1,
    bias_correction: bool = False,
    xp: Any = None,
) -> Any:
    """Share of coordinates whose step is *not* clipped (0-d float array).

    :func:`unclipped_count` divided by the total (0 for no elements). The
    authors suggest tuning ``gamma`` so that this lies between 0.1 and 0.5;
    near 0, Sophia takes sign-momentum steps: raise ``gamma``.
    """
    xp = namespace_of(*ms, *hs, xp=xp)
    count, total = unclipped_count(ms, hs, gamma=gamma, eps=eps, clip_threshold=clip_threshold,
                                   b1=b1, step=step, bias_correction=bias_correction, xp=xp)
    return xp.astype(count, ms[0].dtype) / max(total, 1)


#: The name :func:`unclipped_share` had in 0.1 (it never was a clipped
#: fraction); kept so old code runs.
clip_fraction = unclipped_share


def sign_momentum_regime(streak: Any, share: Any, *, refreshes: Any,
                         threshold: float = SIGN_MOMENTUM_SHARE,
                         warmup: int = SIGN_MOMENTUM_WARMUP,
                         patience: int = SIGN_MOMENTUM_PATIENCE,
                         xp: Any = None) -> tuple[Any, Any]:
    """``(streak, warn)``: the detector's state after one refresh.

    ``streak`` counts consecutive refreshes, after the first ``warmup``
    ones, whose unclipped ``share`` was below ``threshold``; ``warn`` is
    true exactly when it reaches ``patience`` (so a warning fires once per
    low episode; adapters warn once per optimizer). ``refreshes`` is the
    number of folds so far, this one included. Python numbers give Python
    results; arrays give arrays (``streak`` then an integer array).
    """
    if isinstance(share, (int, float)) and isinstance(refreshes, int):
        low = share < threshold and refreshes > warmup
        streak = streak + 1 if low else 0
        return streak, streak == patience
    xp = namespace_of(share, xp=xp)
    low = (share < threshold) & (refreshes > warmup)
    if isinstance(streak, int):
        streak = xp.zeros_like(xp.astype(low, xp.int32)) + streak
    streak = xp.where(low, streak + 1, xp.zeros_like(streak))
    return streak, streak == patience


def sign_momentum_message(share: float) -> str:
    """The one-time warning of the regime detector."""
    return (
        f"Sophia is running as sign momentum: only {100 * share:.1f} % of coordinates took an "
        f"unclipped step over the last {SIGN_MOMENTUM_PATIENCE} Hessian refreshes (the authors "
        "aim for 10-50 %), so the curvature estimate has no say. Raise gamma (or set "
        "target_unclipped_share); if h is still warming up (b2 close to 1, a short run), "
        "hessian_bias_correction=True helps; in this regime the best learning rate is well "
        "below AdamW's. See the hyperparameter guide; pass warn_sign_momentum=False to "
        "silence this warning."
    )


def missing_refresh(completed_steps: Any, refreshes: Any, *, hessian_interval: int,
                    refresh_at_start: bool = True) -> Any:
    """Whether the optimizer has gone too long without any Hessian estimate.

    True when no estimate was ever folded (``refreshes == 0``) and more
    than ``hessian_interval`` steps have passed since the first refresh was
    due (after step 0 with ``refresh_at_start``, else after step k). Python
    ints give a bool; integer arrays a bool array.
    """
    first_due = 0 if refresh_at_start else hessian_interval
    return (refreshes == 0) & (completed_steps > first_due + hessian_interval)


def missing_refresh_message(completed_steps: int, fix: str) -> str:
    """The one-time warning for :func:`missing_refresh`; ``fix`` is the host's remedy."""
    return (
        f"Sophia has taken {completed_steps} steps without any Hessian estimate: h is 0, so "
        f"every step was a sign-momentum step, not Sophia. {fix} Pass require_refresh=False "
        "if plain sign momentum is what you want."
    )


def gamma_for_unclipped_share(
    ms: Sequence[Any],
    hs: Sequence[Any],
    *,
    target: float,
    gamma: Any,
    clip_threshold: Any,
    b1: Any = 0.0,
    step: Any = 1,
    bias_correction: bool = False,
    max_samples: int = 1 << 16,
    xp: Any = None,
) -> Any:
    r"""The gamma at which a share ``target`` of coordinates takes unclipped steps.

    A coordinate with :math:`h > 0` is unclipped when
    :math:`r = |\hat m| / (c\,h) < \gamma` (:math:`\epsilon` aside), so
    the answer is the ``target``-quantile of :math:`r` (:math:`r = +\infty`
    where :math:`h \le 0`). It is taken over a deterministic sample: the
    concatenation of all flattened arrays, in order, every
    ``ceil(total / max_samples)``-th element (no concatenation of the full
    arrays is made), sorted. Returns a 0-d array in the state's dtype; where
    the quantile is not finite or not positive (no curvature yet, or
    momentum 0 on most coordinates) the given ``gamma`` is returned.
    """
    _check_pairs(ms, hs, "gamma_for_unclipped_share")
    if not 0.0 < target < 1.0:
        raise ValueError(f"target_unclipped_share must be in (0, 1), got {target!r}")
    xp = namespace_of(*ms, *hs, xp=xp)
    total = sum(_size(m) for m in ms)
    stride = max(1, math.ceil(total / max_samples))
    ratios, offset = [], 0
    for m, h in zip(ms, hs, strict=True):
        size = _size(m)
        start = (-offset) % stride
        offset += size
        if start >= size:
            continue
        m_sample = xp.reshape(m, (-1,))[start::stride]
        h_sample = xp.reshape(h, (-1,))[start::stride]
        mhat = bias_corrected(m_sample, b1=b1, step=step, bias_correction=bias_correction,
                              xp=xp)
        curved = h_sample > 0
        scaled = clip_threshold * xp.where(curved, h_sample, xp.ones_like(h_sample))
        infinite = xp.zeros_like(scaled) + math.inf
        ratios.append(xp.where(curved, xp.abs(mhat) / scaled, infinite))
    if not ratios:  # no coordinates at all
        return xp.zeros_like(xp.sum(xp.reshape(ms[0], (-1,)))) + gamma
    ordered = xp.sort(ratios[0] if len(ratios) == 1 else xp.concat(ratios))
    index = min(ordered.shape[0] - 1, math.floor(target * ordered.shape[0]))
    quantile = ordered[index]
    previous = xp.astype(xp.zeros_like(quantile) + gamma, quantile.dtype)
    return xp.where(xp.isfinite(quantile) & (quantile > 0), quantile, previous)


@dataclasses.dataclass(frozen=True)
class AfterFold:
    """What one refresh tells, right after its fold (see :func:`after_fold`)."""

    #: The gamma of the next steps: from the target share, or the one given.
    gamma: Any
    #: The unclipped share at that gamma (0-d float array).
    share: Any
    #: The sign-momentum detector's streak, and whether to warn now.
    streak: Any
    warn: Any


def after_fold(
    ms: Sequence[Any],
    hs: Sequence[Any],
    *,
    gamma: Any,
    target: float | None,
    streak: Any,
    refreshes: Any,
    eps: Any,
    clip_threshold: Any,
    b1: Any = 0.0,
    step: Any = 1,
    bias_correction: bool = False,
    xp: Any = None,
) -> AfterFold:
    """Steps 1 to 3 above, in order, on the folded ``hs``.

    ``gamma`` is the one in use (the last one set from ``target``, or the
    hyperparameter); with a ``target`` the returned gamma is
    :func:`gamma_for_unclipped_share`'s, else ``gamma`` itself. ``streak``
    and ``refreshes`` (this fold included) feed :func:`sign_momentum_regime`.
    """
    statistics = dict(clip_threshold=clip_threshold, b1=b1, step=step,
                      bias_correction=bias_correction, xp=xp)
    if target is not None:
        gamma = gamma_for_unclipped_share(ms, hs, target=target, gamma=gamma, **statistics)
    share = unclipped_share(ms, hs, gamma=gamma, eps=eps, **statistics)
    streak, warn = sign_momentum_regime(streak, share, refreshes=refreshes, xp=xp)
    return AfterFold(gamma=gamma, share=share, streak=streak, warn=warn)
