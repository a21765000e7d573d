"""Diagonal-Hessian estimates for JAX: autodiff and noise around the core's math.

The arithmetic (Gumbel-max sampling, the masked cross-entropy, ``N*ghat^2``,
``mean u*Hu``, probes from noise) is ``sophia_core``'s; this module supplies
what JAX does: ``jax.vjp`` for ``ghat``, forward-over-reverse
``jax.jvp(jax.grad(loss_fn))`` for Hessian-vector products (vmapped over the
probes), ``jax.random`` noise, and the cross-device reductions of a
``shard_map`` body.

An estimator is a small description of *how* to estimate, handed to
``tx.update(..., sophia_estimator=...)``; the transformation calls it only
inside its refresh branch, so nothing is computed on steps that do not
refresh.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, TypeAlias

import jax
import jax.extend.core as jax_core
import jax.numpy as jnp
import optax

import sophia_core

__all__ = [
    "ESTIMATOR_ARG",
    "GaussNewtonBartlett",
    "HessianDiagonalFn",
    "Hutchinson",
    "SophiaEstimator",
    "estimate_hessian",
]

#: The one keyword extra argument of ``tx.update`` this package reads. Its
#: name is specific to Sophia, so no other transformation of a chain reads it.
ESTIMATOR_ARG = "sophia_estimator"


def _check_common(owner: str, fn: Any, fn_name: str, inputs: Any, batch_fraction: Any) -> None:
    if not callable(fn):
        raise TypeError(f"{owner}: {fn_name} must be callable, got {type(fn).__name__}")
    if batch_fraction is not None:
        if inputs is None:
            raise ValueError(f"{owner}: batch_fraction needs inputs= (the batch whose leading "
                             "rows the estimate uses)")
        sophia_core.validate_hyperparameters(hessian_batch_fraction=batch_fraction)


@dataclasses.dataclass(frozen=True)
class GaussNewtonBartlett:
    """Sophia-G: ``hhat = N * ghat**2`` at labels sampled from the model.

    Args:
      logits_fn: ``logits_fn(params)`` or, with ``inputs``,
        ``logits_fn(params, inputs)``: logits of shape ``(..., V)``. It must
        compute them from its ``params`` argument (a function that closes
        over the model instead is rejected at trace time: its estimate would
        be 0).
      inputs: a batch (a pytree of arrays sharing a leading batch
        dimension). The estimate then uses its first
        ``sophia_core.estimate_rows(batch, batch_fraction)`` rows.
      label_mask: booleans of shape ``logits.shape[:-1]`` (sliced with
        ``inputs``): the positions that count; ``N`` is their number.
      batch_fraction: share of the rows of ``inputs`` to use; default
        ``sophia_core.DEFAULTS["hessian_batch_fraction"]`` with ``inputs``
        (every position without).
      params: the *whole* parameter tree, needed only where the
        transformation sees part of it (inside ``optax.masked`` or
        ``optax.multi_transform``); ``logits_fn`` is then evaluated on it,
        differentiated with respect to the part.
      where: a boolean (traced or not): refresh only where it is true (for
        ``optax.MultiSteps``, the last mini-step of a window).
    """

    logits_fn: Callable[..., jax.Array]
    inputs: Any = None
    label_mask: jax.Array | None = None
    batch_fraction: float | None = None
    params: Any = None
    where: Any = None

    def __post_init__(self) -> None:
        _check_common("GaussNewtonBartlett", self.logits_fn, "logits_fn", self.inputs,
                      self.batch_fraction)


@dataclasses.dataclass(frozen=True)
class Hutchinson:
    """Sophia-H: ``hhat = mean_j u_j * (H u_j)`` with forward-over-reverse products.

    ``loss_fn(params)`` (or ``loss_fn(params, inputs)``) is a scalar loss; the
    probes' distribution and number are the transformation's ``probe`` and
    ``n_probes``. ``inputs``, ``batch_fraction``, ``params`` and ``where`` as
    in :class:`GaussNewtonBartlett`.
    """

    loss_fn: Callable[..., jax.Array]
    inputs: Any = None
    batch_fraction: float | None = None
    params: Any = None
    where: Any = None

    def __post_init__(self) -> None:
        _check_common("Hutchinson", self.loss_fn, "loss_fn", self.inputs, self.batch_fraction)


@dataclasses.dataclass(frozen=True)
class HessianDiagonalFn:
    """Any estimate: ``fn(params, key) -> hhat`` (a pytree like ``params``).

    Called only when a refresh happens, with the state's key split for it:
    the way to bring your own estimator (or a stream of given estimates)
    without computing it on every step. ``params`` and ``where`` as in
    :class:`GaussNewtonBartlett` (under ``optax.masked`` ``fn`` gets the
    whole tree and returns an estimate for all of it).
    """

    fn: Callable[[Any, jax.Array], Any]
    params: Any = None
    where: Any = None

    def __post_init__(self) -> None:
        _check_common("HessianDiagonalFn", self.fn, "fn", None, None)


SophiaEstimator: TypeAlias = GaussNewtonBartlett | Hutchinson | HessianDiagonalFn


def _is_masked(x: Any) -> bool:
    return isinstance(x, optax.MaskedNode)


def _whole(params: Any, estimator: SophiaEstimator) -> Callable[[Any], Any]:
    """``part -> whole parameters``: the identity unless ``params`` is masked.

    Inside ``optax.masked`` the transformation sees ``MaskedNode`` where a
    leaf (or subtree) is not its own; the estimator's ``params`` fills those.
    """
    if not any(_is_masked(x) for x in jax.tree.leaves(params, is_leaf=_is_masked)):
        return lambda part: part
    if estimator.params is None:
        raise ValueError(
            f"{type(estimator).__name__}: this transformation sees only part of the parameters "
            "(it is inside optax.masked or optax.multi_transform), but the estimate needs the "
            "model's whole parameters: pass them as "
            f"{type(estimator).__name__}(..., params=params)"
        )
    whole = estimator.params

    def merge(part: Any) -> Any:
        return jax.tree.map(lambda p, w: w if _is_masked(p) else p, part, whole,
                            is_leaf=_is_masked)

    return merge


def _rows(estimator: GaussNewtonBartlett | Hutchinson) -> tuple[tuple[Any, ...], Any]:
    """``(extra call arguments, label mask)``: the leading rows of the batch."""
    if estimator.inputs is None:
        return (), getattr(estimator, "label_mask", None)
    leaves = jax.tree.leaves(estimator.inputs)
    sizes = {int(x.shape[0]) for x in leaves if getattr(x, "ndim", 0) > 0}
    if len(sizes) != 1:
        raise ValueError(f"{type(estimator).__name__}: inputs must be arrays sharing a leading "
                         f"batch dimension, got leading sizes {sorted(sizes)}")
    (batch,) = sizes
    fraction = estimator.batch_fraction
    if fraction is None:
        fraction = sophia_core.DEFAULTS["hessian_batch_fraction"]
    rows = sophia_core.estimate_rows(batch, fraction)
    inputs = jax.tree.map(lambda x: x[:rows], estimator.inputs)
    mask = getattr(estimator, "label_mask", None)
    return (inputs,), None if mask is None else mask[:rows]


def _depends_on_argument(fn: Callable[[Any], Any], params: Any) -> bool:
    """Whether ``fn(params)``'s output is computed from ``params`` at all.

    A backward walk over the jaxpr from the outputs; an equation counts as
    using all of its inputs (so a sub-computation never hides a use).
    """
    closed = jax.make_jaxpr(fn)(params)
    live = {v for v in closed.jaxpr.outvars if not isinstance(v, jax_core.Literal)}
    for eqn in reversed(closed.jaxpr.eqns):
        if any(v in live for v in eqn.outvars):
            live.update(v for v in eqn.invars if not isinstance(v, jax_core.Literal))
    return any(v in live for v in closed.jaxpr.invars)


def _require_use(fn: Callable[[Any], Any], params: Any, owner: str, fn_name: str) -> None:
    if jax.tree.leaves(params) and not _depends_on_argument(fn, params):
        raise ValueError(
            f"{owner}: {fn_name} does not use its params argument (it closes over the model "
            "instead), so its derivative, and every Hessian estimate, would be 0. Compute "
            f"from the argument: with flax nnx, {fn_name}=lambda p: nnx.merge(graphdef, p, "
            "rest)(x), not lambda p: model(x)."
        )


def estimate_hessian(
    estimator: SophiaEstimator,
    params: Any,
    key: jax.Array,
    *,
    probe: str = "gaussian",
    n_probes: int | jax.Array = 1,
    axis_name: Any = None,
) -> Any:
    """``hhat``, a pytree like ``params``, from ``estimator`` at ``params``.

    ``axis_name``: inside ``shard_map``/``pmap`` over a data-parallel axis,
    the name of that axis. Sophia-G then averages ``ghat`` over the devices
    (weighted by their label counts) and sums ``N`` before squaring, and
    Sophia-H averages the Hessian-vector products. Under ``jax.jit`` with
    sharded inputs no name is needed: the loss is already the global one.
    ``n_probes`` may be traced (``optax.inject_hyperparams``).
    """
    whole = _whole(params, estimator)
    if isinstance(estimator, HessianDiagonalFn):
        hhat = estimator.fn(whole(params), key)
        # Keep the part this transformation owns.
        return jax.tree.map(lambda p, h: p if _is_masked(p) else h, params, hhat,
                            is_leaf=_is_masked)
    extra, label_mask = _rows(estimator)
    if isinstance(estimator, GaussNewtonBartlett):
        def logits_fn(part: Any) -> Any:
            return estimator.logits_fn(whole(part), *extra)

        _require_use(logits_fn, params, "GaussNewtonBartlett", "logits_fn")
        return _gnb(params, key, logits_fn, label_mask, axis_name)
    if isinstance(estimator, Hutchinson):
        def loss_fn(part: Any) -> Any:
            return estimator.loss_fn(whole(part), *extra)

        _require_use(loss_fn, params, "Hutchinson", "loss_fn")
        return _hutchinson(params, key, loss_fn, probe=probe, n_probes=n_probes,
                           axis_name=axis_name)
    raise TypeError(
        f"{ESTIMATOR_ARG} must be a sophia_jax.GaussNewtonBartlett, Hutchinson or "
        f"HessianDiagonalFn, got {type(estimator).__name__}"
    )


def _per_device(tree: Any, axis_name: Any) -> Any:
    """``tree`` as values that vary over ``axis_name`` (``jax.lax.pcast``).

    Differentiating with respect to replicated parameters inside
    ``shard_map(..., check_vma=True)`` sums the devices' gradients (the
    transpose of the implicit broadcast); with varying ones each device gets
    its own, in either mode, and the reductions below are the only ones.
    """
    def cast(x: Any) -> Any:
        if axis_name in getattr(jax.typeof(x), "vma", frozenset()):
            return x
        return jax.lax.pcast(x, axis_name, to="varying")

    return jax.tree.map(cast, tree)


def _gnb(params: Any, key: jax.Array, logits_fn: Callable[[Any], Any], label_mask: Any,
         axis_name: Any) -> Any:
    """Sophia-G: sample labels from the model, ``ghat`` of their loss, ``N*ghat^2``."""
    if axis_name is not None:
        # Each device samples its own positions: independent noise per device.
        key = jax.random.fold_in(key, jax.lax.axis_index(axis_name))
        params = _per_device(params, axis_name)
    logits, pullback = jax.vjp(logits_fn, params)
    z = jax.lax.stop_gradient(logits)
    noise_dtype = sophia_core.compute_dtype(z.dtype, xp=jnp)
    uniform = jax.random.uniform(key, z.shape, dtype=noise_dtype)
    labels = sophia_core.sample_labels(z, uniform, mask=label_mask, xp=jnp)
    positions = sophia_core.num_positions(labels, xp=jnp)

    def sampled_loss(zz: Any) -> Any:
        return sophia_core.masked_mean_cross_entropy(zz, labels, xp=jnp)

    (ghat,) = pullback(jax.grad(sampled_loss)(logits).astype(logits.dtype))
    if axis_name is not None:
        # The global mean over all devices' positions: each device's mean
        # weighted by its count, then N is the global count.
        local = positions
        positions = jax.lax.psum(local, axis_name)
        weight = local / jnp.maximum(positions, 1)
        ghat = jax.tree.map(lambda g: jax.lax.psum(g * weight.astype(g.dtype), axis_name), ghat)
    return jax.tree.map(lambda g: sophia_core.gnb_estimate(g, positions, xp=jnp), ghat)


def _probe(key: jax.Array, params: Any, probe: str) -> Any:
    """One probe per leaf, from keys split like ``optax.tree.random_like`` splits them.

    Rademacher noise is uniform in the default float dtype, the draw
    ``jax.random.rademacher`` makes, so with the same key our probes are
    optax's with the opposite sign (and ``u*Hu`` is the same).
    """
    keys = optax.tree.split_key_like(key, params)

    def one(p: jax.Array, k: jax.Array) -> jax.Array:
        if probe == "gaussian":
            noise = jax.random.normal(k, p.shape, p.dtype)
        else:
            noise = jax.random.uniform(k, p.shape, jax.dtypes.canonicalize_dtype(jnp.float64))
        return sophia_core.probe_from_noise(noise, probe=probe, xp=jnp).astype(p.dtype)

    return jax.tree.map(one, params, keys)


def _probe_key(key: jax.Array, j: Any) -> jax.Array:
    """The key of probe ``j``: ``key`` itself for the first (optax's), then ``fold_in``."""
    return jnp.where(j == 0, key, jax.random.fold_in(key, j))


def _hutchinson(params: Any, key: jax.Array, loss_fn: Callable[[Any], Any], *, probe: str,
                n_probes: int | jax.Array, axis_name: Any) -> Any:
    """Sophia-H: ``mean_j u_j * (H u_j)``; probes vmapped (static count) or looped (traced)."""
    grad_fn = jax.grad(loss_fn)

    def probe_and_product(j: Any) -> tuple[Any, Any]:
        u = _probe(_probe_key(key, j), params, probe)
        if axis_name is None:
            return u, jax.jvp(grad_fn, (params,), (u,))[1]
        local = _per_device((params, u), axis_name)
        return u, jax.lax.pmean(jax.jvp(grad_fn, local[:1], local[1:])[1], axis_name)

    if isinstance(n_probes, int) or not isinstance(n_probes, jax.core.Tracer):
        n = int(n_probes)
        us, hvps = jax.vmap(probe_and_product)(jnp.arange(n))
        return jax.tree.map(
            lambda u, hu: sophia_core.hutchinson_estimate(list(u), list(hu), xp=jnp), us, hvps)

    # A traced count (optax.inject_hyperparams): the same probes, one by one.
    def add(j: Any, total: Any) -> Any:
        u, hvp = probe_and_product(j)
        terms = jax.tree.map(lambda a, b: sophia_core.hutchinson_estimate([a], [b], xp=jnp),
                             u, hvp)
        return jax.tree.map(jnp.add, total, terms)

    zeros = jax.eval_shape(lambda: jax.tree.map(
        lambda a, b: sophia_core.hutchinson_estimate([a], [b], xp=jnp), params, params))
    total = jax.lax.fori_loop(0, n_probes, add,
                              jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), zeros))
    return jax.tree.map(lambda t: t / n_probes.astype(t.dtype), total)
