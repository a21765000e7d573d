"""Sophia, written once against the Python array API standard.

The update rule, the Hessian EMA, the refresh schedule and the array parts of
the Sophia-G (GNB) and Sophia-H (Hutchinson) estimators, as pure functions
over any array-API namespace (numpy, array_api_strict, torch and jax.numpy
through array-api-compat; Keras, and so TensorFlow, through ``sophia_tf``'s
namespace on ``keras.ops``).

Importing this package imports no deep-learning framework. Framework
packages (``sophia_torch``, ``sophia_jax``, ``sophia_tf``) add autodiff,
randomness, in-place writes and state containers on top.
"""

from . import portable
from ._diagnostics import (
    SIGN_MOMENTUM_PATIENCE,
    SIGN_MOMENTUM_SHARE,
    SIGN_MOMENTUM_WARMUP,
    AfterFold,
    after_fold,
    clip_fraction,
    gamma_for_unclipped_share,
    missing_refresh,
    missing_refresh_message,
    sign_momentum_message,
    sign_momentum_regime,
    unclipped_count,
    unclipped_share,
)
from ._estimators import (
    IGNORE_INDEX,
    estimate_rows,
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
    MAX_INTERVAL,
    PROBES,
    Hyperparameters,
    validate_hyperparameters,
)
from ._namespace import (
    NAMESPACE_FUNCTIONS,
    check_eps,
    check_same_shape,
    compute_dtype,
    namespace_of,
)
from ._update import (
    HessianFold,
    SophiaState,
    apply_step,
    bias_corrected,
    denominator,
    fold_hessian,
    hessian_decay,
    hessian_ema,
    init_state,
    momentum_update,
    preconditioned_step,
    refresh_due,
    sophia_update,
)

__version__ = "0.2.0.dev0"

__all__ = [
    "ALIASES",
    "DEFAULTS",
    "IGNORE_INDEX",
    "MAX_INTERVAL",
    "NAMESPACE_FUNCTIONS",
    "PROBES",
    "SIGN_MOMENTUM_PATIENCE",
    "SIGN_MOMENTUM_SHARE",
    "SIGN_MOMENTUM_WARMUP",
    "AfterFold",
    "HessianFold",
    "Hyperparameters",
    "SophiaState",
    "after_fold",
    "apply_step",
    "bias_corrected",
    "check_eps",
    "check_same_shape",
    "clip_fraction",
    "compute_dtype",
    "denominator",
    "estimate_rows",
    "fold_hessian",
    "gamma_for_unclipped_share",
    "gnb_estimate",
    "hessian_decay",
    "hessian_ema",
    "hutchinson_estimate",
    "init_state",
    "masked_mean_cross_entropy",
    "missing_refresh",
    "missing_refresh_message",
    "momentum_update",
    "namespace_of",
    "num_positions",
    "portable",
    "preconditioned_step",
    "probe_from_noise",
    "refresh_due",
    "sample_labels",
    "sign_momentum_message",
    "sign_momentum_regime",
    "sophia_update",
    "unclipped_count",
    "unclipped_share",
    "validate_hyperparameters",
]
