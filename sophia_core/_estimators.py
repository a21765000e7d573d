r"""The array parts of the diagonal-Hessian estimators (SPEC section 3).

Frameworks supply what the array API cannot: random noise, gradients and
Hessian-vector products. Everything else lives here.

**Sophia-G (Gauss-Newton-Bartlett).** For a loss that is a mean of
cross-entropies over :math:`N` label positions with logits :math:`z`:

.. math::

    \hat y \sim \operatorname{Categorical}(\operatorname{softmax}(z)), \qquad
    \hat g = \nabla_\theta \tfrac1N \textstyle\sum_i \operatorname{CE}(z_i, \hat y_i), \qquad
    \hat h = N \, \hat g \odot \hat g .

Labels are sampled by Gumbel-max from given uniform noise :math:`U`:
:math:`\hat y = \arg\max(z - \log(-\log U))` (:func:`sample_labels`); the
framework differentiates :func:`masked_mean_cross_entropy` to get
:math:`\hat g`; :func:`gnb_estimate` forms :math:`\hat h`.

**Sophia-H (Hutchinson).** For any twice-differentiable loss :math:`\ell`
and probes :math:`u` (standard normal, or Rademacher :math:`\pm 1`):
:math:`\hat h = \frac1n \sum_j u_j \odot (\nabla^2 \ell\, u_j)`
(:func:`hutchinson_estimate`). :math:`\hat h` can be negative; the update
handles that (a sign step).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from ._namespace import check_floating, check_same_shape, compute_dtype, namespace_of

__all__ = [
    "IGNORE_INDEX",
    "estimate_rows",
    "gnb_estimate",
    "hutchinson_estimate",
    "masked_mean_cross_entropy",
    "num_positions",
    "probe_from_noise",
    "sample_labels",
]

#: Label value of positions that enter no loss (PyTorch's convention).
IGNORE_INDEX = -100


def estimate_rows(batch_size: Any, fraction: float, *, xp: Any = None) -> Any:
    """How many of a batch's sequences the in-loop Sophia-G estimate uses.

    ``ceil(fraction * batch_size)`` in double precision (``fraction`` in
    (0, 1], see ``DEFAULTS["hessian_batch_fraction"]``): at least one row of
    a non-empty batch. ``batch_size`` is a Python int, or a 0-d integer
    array for a batch size known only at run time (the count then comes as
    an array of the same dtype). Because ``hhat = N * ghat**2`` counts N on
    the rows used, a subset estimates the same quantity as the whole batch,
    with more noise, for ``fraction`` of the cost.
    """
    from ._hyperparameters import validate_hyperparameters

    validate_hyperparameters(hessian_batch_fraction=fraction)
    if isinstance(batch_size, int) and not isinstance(batch_size, bool) and batch_size >= 0:
        return math.ceil(fraction * batch_size)  # >= 1 for a non-empty batch: fraction > 0
    if not hasattr(batch_size, "dtype"):
        raise ValueError(f"batch_size must be an integer >= 0, got {batch_size!r}")
    xp = namespace_of(batch_size, xp=xp)
    exact = xp.astype(batch_size, xp.float64)
    return xp.astype(xp.ceil(fraction * exact), batch_size.dtype)


def _floating(array: Any, xp: Any) -> Any:
    check_floating("logits", array, xp=xp)
    return xp.astype(array, compute_dtype(array.dtype, xp=xp), copy=False)


def sample_labels(logits: Any, uniform: Any, *, mask: Any = None,
                  ignore_index: int = IGNORE_INDEX, xp: Any = None) -> Any:
    """Labels drawn from ``softmax(logits)`` by Gumbel-max.

    ``logits`` has shape ``(..., V)``, ``uniform`` the same shape with values
    in [0, 1) (a 0 is never chosen). ``mask`` (shape ``(...)``, bool) marks
    the positions that count; the others get ``ignore_index``. Returns an
    integer array of shape ``(...)``.
    """
    xp = namespace_of(logits, uniform, xp=xp)
    check_same_shape("logits", logits, "uniform", uniform)
    z = _floating(logits, xp)
    noise = xp.astype(uniform, z.dtype, copy=False)
    labels = xp.argmax(z - xp.log(-xp.log(noise)), axis=-1)
    if mask is None:
        return labels
    check_same_shape("labels", labels, "mask", mask)
    ignored = xp.zeros_like(labels) + ignore_index
    return xp.where(mask, labels, ignored)


def num_positions(labels: Any, *, ignore_index: int = IGNORE_INDEX, xp: Any = None) -> Any:
    """N: how many positions of ``labels`` enter the loss (0-d integer array)."""
    xp = namespace_of(labels, xp=xp)
    return xp.sum(xp.astype(labels != ignore_index, labels.dtype))


def masked_mean_cross_entropy(logits: Any, labels: Any, *,
                              ignore_index: int = IGNORE_INDEX, xp: Any = None) -> Any:
    """Mean cross-entropy of ``logits`` (``(..., V)``) at ``labels`` (``(...)``).

    Positions labelled ``ignore_index`` are left out of the sum and the count;
    with no counted position the result is 0. Built from differentiable array
    operations only, so each framework's autodiff gives ``ghat`` from it.
    Narrow logits are computed in float32.
    """
    xp = namespace_of(logits, labels, xp=xp)
    z = _floating(logits, xp)
    if tuple(z.shape[:-1]) != tuple(labels.shape):
        raise ValueError(
            f"shape mismatch: logits has shape {tuple(logits.shape)} "
            f"but labels has shape {tuple(labels.shape)} (expected logits.shape[:-1])"
        )
    classes = xp.arange(z.shape[-1], dtype=labels.dtype)
    one_hot = labels[..., None] == classes
    zeros = xp.zeros_like(z)
    picked = xp.sum(xp.where(one_hot, z, zeros), axis=-1)
    z_max = xp.max(z, axis=-1)
    log_sum_exp = xp.log(xp.sum(xp.exp(z - z_max[..., None]), axis=-1)) + z_max
    counted = labels != ignore_index
    per_position = xp.where(counted, log_sum_exp - picked, xp.zeros_like(picked))
    count = xp.sum(xp.astype(counted, z.dtype))
    return xp.sum(per_position) / xp.clip(count, min=1.0)


def gnb_estimate(sampled_grad: Any, positions: Any, *, xp: Any = None) -> Any:
    """``hhat = N * ghat * ghat`` from the gradient of the sampled-label loss.

    ``positions`` is N, the number of label positions that entered the mean
    (tokens, not sequences); under data parallelism ``sampled_grad`` must be
    the global mean and N the global count. Narrow gradients give float32.
    """
    xp = namespace_of(sampled_grad, xp=xp)
    check_floating("sampled_grad", sampled_grad, xp=xp)
    g = xp.astype(sampled_grad, compute_dtype(sampled_grad.dtype, xp=xp), copy=False)
    if not isinstance(positions, (int, float)):
        positions = xp.astype(positions, g.dtype)
    return positions * (g * g)


def hutchinson_estimate(probes: Sequence[Any], hvps: Sequence[Any], *, xp: Any = None) -> Any:
    """``hhat = mean_j u_j * (H u_j)`` over the probes of one parameter."""
    if len(probes) != len(hvps):
        raise ValueError(f"got {len(probes)} probes but {len(hvps)} Hessian-vector products")
    if not probes:
        raise ValueError("hutchinson_estimate needs at least one probe")
    xp = namespace_of(*probes, *hvps, xp=xp)
    total = None
    for u, hu in zip(probes, hvps, strict=True):
        check_floating("probe", u, xp=xp)
        check_floating("hvp", hu, xp=xp)
        check_same_shape("probe", u, "hvp", hu)
        dtype = compute_dtype(hu.dtype, xp=xp)
        term = xp.astype(u, dtype, copy=False) * xp.astype(hu, dtype, copy=False)
        total = term if total is None else total + term
    return total if len(probes) == 1 else total / len(probes)


def probe_from_noise(noise: Any, *, probe: str = "gaussian", xp: Any = None) -> Any:
    """A Hutchinson probe from framework noise.

    ``probe="gaussian"``: ``noise`` is standard normal and is the probe.
    ``probe="rademacher"``: ``noise`` is uniform on [0, 1); the probe is
    -1 where ``noise < 0.5`` and +1 elsewhere.
    """
    xp = namespace_of(noise, xp=xp)
    check_floating("noise", noise, xp=xp)
    if probe == "gaussian":
        return noise
    if probe == "rademacher":
        ones = xp.ones_like(noise)
        return xp.where(noise < 0.5, -ones, ones)
    raise ValueError(f"probe must be one of ('gaussian', 'rademacher'), got {probe!r}")
