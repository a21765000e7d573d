"""Sophia for JAX and optax.

The math is ``sophia_core``'s (``jax.numpy`` is an array-API namespace);
this package adds autodiff for the estimators, ``jax.random`` noise, the
optax state and the ``jax.jit``/sharding glue. See ``docs/frameworks/jax.md``.

>>> import jax.numpy as jnp, optax, sophia_jax
>>> tx = optax.chain(optax.clip_by_global_norm(1.0), sophia_jax.sophia(3e-4))
>>> state = tx.init({"w": jnp.zeros(2)})
>>> int(sophia_jax.sophia_state(state).hessian_refreshes)
0
"""

from ._estimators import (
    ESTIMATOR_ARG,
    GaussNewtonBartlett,
    HessianDiagonalFn,
    Hutchinson,
    SophiaEstimator,
    estimate_hessian,
)
from ._portable import export_state, import_state
from ._transform import (
    ExactSophia,
    SophiaState,
    exact_sophia,
    optax_contrib_sophia,
    scale_by_sophia,
    sophia,
    sophia_state,
)

__all__ = [
    "ESTIMATOR_ARG",
    "ExactSophia",
    "GaussNewtonBartlett",
    "HessianDiagonalFn",
    "Hutchinson",
    "SophiaEstimator",
    "SophiaState",
    "estimate_hessian",
    "exact_sophia",
    "export_state",
    "import_state",
    "optax_contrib_sophia",
    "scale_by_sophia",
    "sophia",
    "sophia_state",
]
