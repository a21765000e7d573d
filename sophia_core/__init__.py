"""Sophia, written once against the Python array API standard.

The update rule, the Hessian EMA, the refresh schedule and the array parts of
the Sophia-G (GNB) and Sophia-H (Hutchinson) estimators, as pure functions
over any array-API namespace (numpy, array_api_strict, torch and jax.numpy
through array-api-compat, TensorFlow through ``sophia_tf``'s shim).

Importing this package imports no deep-learning framework. Framework
packages (``sophia_torch``, ``sophia_jax``, ``sophia_tf``) add autodiff,
randomness, in-place writes and state containers on top.
"""

from . import portable
from ._estimators import (
    IGNORE_INDEX,
    gnb_estimate,
    hutchinson_estimate,
    masked_mean_cross_entropy,
    num_positions,
    probe_from_noise,
    sample_labels,
)
from ._hyperparameters import (
    ALIASES,
    DEFAULTS,
    PROBES,
    Hyperparameters,
    validate_hyperparameters,
)
from ._namespace import NAMESPACE_FUNCTIONS, check_same_shape, compute_dtype, namespace_of
from ._update import (
    SophiaState,
    apply_step,
    bias_corrected,
    clip_fraction,
    hessian_ema,
    init_state,
    momentum_update,
    preconditioned_step,
    refresh_due,
    sophia_update,
    unclipped_share,
)

__version__ = "0.1.0"

__all__ = [
    "ALIASES",
    "DEFAULTS",
    "IGNORE_INDEX",
    "NAMESPACE_FUNCTIONS",
    "PROBES",
    "Hyperparameters",
    "SophiaState",
    "apply_step",
    "bias_corrected",
    "check_same_shape",
    "clip_fraction",
    "compute_dtype",
    "gnb_estimate",
    "hessian_ema",
    "hutchinson_estimate",
    "init_state",
    "masked_mean_cross_entropy",
    "momentum_update",
    "namespace_of",
    "num_positions",
    "portable",
    "preconditioned_step",
    "probe_from_noise",
    "refresh_due",
    "sample_labels",
    "sophia_update",
    "unclipped_share",
    "validate_hyperparameters",
]
