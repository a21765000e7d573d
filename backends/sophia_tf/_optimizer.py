"""Sophia as a Keras 3 optimizer: ``SophiaG`` and ``SophiaH``.

The math is :func:`sophia_core.sophia_update` and
:func:`sophia_core.fold_hessian` (see their docstrings), run on
:data:`sophia_tf.keras_namespace` on every Keras backend. This module maps
Keras's argument names onto the core's, keeps the state as optimizer
variables (saved with the optimizer), writes results back, and warns when
Sophia is not really running (no Hessian estimate, or every step clipped).
"""

from __future__ import annotations

import numbers
import warnings
from typing import Any

import keras
from keras import ops

import sophia_core
from sophia_core import DEFAULTS, SophiaState

from ._autodiff import dense, host_call_if
from ._namespace import keras_namespace as xp

__all__ = ["KERAS_NAMES", "Sophia", "SophiaG", "SophiaH"]

#: The core's hyperparameter names as Keras spells them (the one mapping).
#: Options added in core v2 keep the core's name.
KERAS_NAMES: dict[str, str] = {
    "lr": "learning_rate",
    "b1": "beta_1",
    "b2": "beta_2",
    "gamma": "gamma",
    "weight_decay": "weight_decay",
    "eps": "epsilon",
    "clip_threshold": "clip_threshold",
    "hessian_interval": "hessian_interval",
    "refresh_at_start": "refresh_at_start",
    "bias_correction": "bias_correction",
    "maximize": "maximize",
    "hessian_bias_correction": "hessian_bias_correction",
    "target_unclipped_share": "target_unclipped_share",
    "hessian_batch_fraction": "hessian_batch_fraction",
    "require_refresh": "require_refresh",
    "warn_sign_momentum": "warn_sign_momentum",
}
_CORE_NAMES = {keras_name: core for core, keras_name in KERAS_NAMES.items()}

#: The remedy the missing-refresh warning names.
REFRESH_FIX = (
    "Refresh h inside fit with one line: build the model as sophia_tf.Sequential / "
    "sophia_tf.Model, or add the mixin (class MyModel(sophia_tf.SophiaTrainStep, "
    "keras.Model)); in a custom loop call optimizer.update_hessian(...) when "
    "optimizer.hessian_refresh_due()."
)

_NARROW = ("float16", "bfloat16")


class _Setting:
    """A Keras-spelled hyperparameter, validated by the core on every assignment."""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name, self.core_name = name, _CORE_NAMES[name]

    def __get__(self, optimizer: Any, owner: type | None = None) -> Any:
        return self if optimizer is None else vars(optimizer).get(self.name)

    def __set__(self, optimizer: Any, value: Any) -> None:
        sophia_core.validate_hyperparameters(**{self.core_name: value})
        vars(optimizer)[self.name] = value


def _numpy(value: Any) -> Any:
    with warnings.catch_warnings():  # keras's np.array(tensor) warns under numpy 2
        warnings.simplefilter("ignore", DeprecationWarning)
        return ops.convert_to_numpy(value)


def _float64_available() -> bool:
    """Whether this backend has float64 (JAX has it only with x64 enabled)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return keras.backend.standardize_dtype(ops.zeros((), "float64").dtype) == "float64"


@keras.saving.register_keras_serializable(package="sophia_tf")
class Sophia(keras.optimizers.Optimizer):
    """Sophia (Liu et al., 2024): clipped, Hessian-preconditioned momentum.

    The update and its math are documented once, in
    :func:`sophia_core.sophia_update`; the Hessian fold in
    :func:`sophia_core.fold_hessian`. Keras spellings map to the core's
    names as in :data:`KERAS_NAMES` (``beta_1`` is ``b1``, ``beta_2`` is
    ``b2``, ``epsilon`` is ``eps``); every value is checked by
    :func:`sophia_core.validate_hyperparameters`, at construction, in
    ``from_config`` and on assignment (``optimizer.gamma = 0.05``).
    ``learning_rate`` may be a float, a ``LearningRateSchedule`` or a callable.

    ``weight_decay`` is Sophia's decoupled weight decay, applied inside the
    update on the pre-update parameter (``None`` means 0); Keras's own
    weight-decay pass is off, so it is never applied twice.
    ``exclude_from_weight_decay`` works as for every Keras optimizer.

    ``h`` changes only when a Hessian estimate is folded in: inside ``fit``
    with :class:`sophia_tf.SophiaTrainStep` (the refresh uses
    ``hessian_batch_fraction`` of each due batch), or by
    :meth:`update_hessian` in a custom loop. Options (``sophia_core.DEFAULTS``):
    ``hessian_bias_correction``, ``target_unclipped_share`` (gamma re-set at
    each refresh; the gamma in use is :attr:`current_gamma`),
    ``require_refresh`` (warn once when more than ``hessian_interval`` steps
    pass without any estimate), ``warn_sign_momentum`` (warn once when the
    :attr:`unclipped_share` stays below 10 %).
    """

    #: Which estimator refreshes ``h`` in ``fit`` ("gnb" or "hutchinson").
    estimator = "gnb"

    beta_1 = _Setting()
    beta_2 = _Setting()
    gamma = _Setting()
    epsilon = _Setting()
    clip_threshold = _Setting()
    hessian_interval = _Setting()
    refresh_at_start = _Setting()
    bias_correction = _Setting()
    maximize = _Setting()
    hessian_bias_correction = _Setting()
    target_unclipped_share = _Setting()
    hessian_batch_fraction = _Setting()
    require_refresh = _Setting()
    warn_sign_momentum = _Setting()

    def __init__(
        self,
        learning_rate=DEFAULTS["lr"],
        beta_1=DEFAULTS["b1"],
        beta_2=DEFAULTS["b2"],
        gamma=DEFAULTS["gamma"],
        weight_decay=DEFAULTS["weight_decay"],
        epsilon=DEFAULTS["eps"],
        clip_threshold=DEFAULTS["clip_threshold"],
        hessian_interval=DEFAULTS["hessian_interval"],
        refresh_at_start=DEFAULTS["refresh_at_start"],
        bias_correction=DEFAULTS["bias_correction"],
        maximize=DEFAULTS["maximize"],
        hessian_bias_correction=DEFAULTS["hessian_bias_correction"],
        target_unclipped_share=DEFAULTS["target_unclipped_share"],
        hessian_batch_fraction=DEFAULTS["hessian_batch_fraction"],
        require_refresh=DEFAULTS["require_refresh"],
        warn_sign_momentum=DEFAULTS["warn_sign_momentum"],
        name=None,
        **kwargs,
    ):
        weight_decay = 0.0 if weight_decay is None else weight_decay
        sophia_core.validate_hyperparameters(  # all at once, before Keras sees any
            dynamic=("lr",), lr=learning_rate, b1=beta_1, b2=beta_2, gamma=gamma,
            weight_decay=weight_decay, eps=epsilon, clip_threshold=clip_threshold,
            hessian_interval=hessian_interval, refresh_at_start=refresh_at_start,
            bias_correction=bias_correction, maximize=maximize,
            hessian_bias_correction=hessian_bias_correction,
            target_unclipped_share=target_unclipped_share,
            hessian_batch_fraction=hessian_batch_fraction, require_refresh=require_refresh,
            warn_sign_momentum=warn_sign_momentum)
        if isinstance(learning_rate, numbers.Real):
            learning_rate = float(learning_rate)  # Keras takes Python floats only
        super().__init__(learning_rate=learning_rate, weight_decay=weight_decay, name=name,
                         **kwargs)
        # Later assignments are validated too (see _Setting).
        self.beta_1 = beta_1
        self.beta_2 = beta_2
        self.gamma = gamma
        self.epsilon = epsilon
        self.clip_threshold = clip_threshold
        self.hessian_interval = hessian_interval
        self.refresh_at_start = refresh_at_start
        self.bias_correction = bias_correction
        self.maximize = maximize
        self.hessian_bias_correction = hessian_bias_correction
        self.target_unclipped_share = target_unclipped_share
        self.hessian_batch_fraction = hessian_batch_fraction
        self.require_refresh = require_refresh
        self.warn_sign_momentum = warn_sign_momentum
        self._warned: set[str] = set()  # warnings given (once per optimizer)
        self._host_checks_dropped = False  # a check compiled where no host call fits

    # -- state ---------------------------------------------------------------

    def build(self, var_list):
        """Create ``m`` and ``h`` per variable (float32 for narrow ones) and the counters."""
        if self.built:
            return
        super().build(var_list)
        self._momentums, self._hessians, self._names = [], [], []
        for variable in var_list:
            dtype = keras.backend.standardize_dtype(variable.dtype)
            if dtype in _NARROW:
                dtype = "float32"
            sophia_core.check_eps(self.epsilon, xp.float64 if dtype == "float64" else xp.float32,
                                  xp=xp, gamma=self.gamma)
            prefix = variable.path.replace("/", "_")
            for slot, store in (("momentum", self._momentums), ("hessian", self._hessians)):
                # Replicated variables written from any replica take the
                # first replica's value (all replicas fold the same estimate).
                store.append(self.add_variable(shape=variable.shape, dtype=dtype,
                                               name=f"{prefix}_{slot}",
                                               aggregation="only_first_replica"))
            self._names.append(variable.path.replace("/", "."))
        wide = "float64" if any(h.dtype == "float64" for h in self._hessians) else "float32"

        def scalar(name, dtype, initializer="zeros"):
            return self.add_variable(shape=(), dtype=dtype, name=name, initializer=initializer,
                                     aggregation="only_first_replica")

        self._hessian_refreshes = scalar("hessian_refreshes", "int")
        self._rejected = scalar("rejected_hessian_coordinates", "int")
        self._gamma = scalar("current_gamma", wide,
                             lambda shape, dtype: ops.convert_to_tensor(self.gamma, dtype))
        self._streak = scalar("sign_momentum_streak", "int")
        self._share = scalar("unclipped_share", "float32")
        self._exact = "float64" if _float64_available() else "float32"

    def sophia_slots(self, variable) -> tuple[Any, Any]:
        """``(m, h)``: the momentum and Hessian-EMA variables of ``variable``."""
        index = self._get_variable_index(variable)
        return self._momentums[index], self._hessians[index]

    @property
    def hessian_refreshes(self):
        """How many Hessian estimates were folded into ``h`` (an int variable)."""
        return self._hessian_refreshes

    @property
    def rejected_hessian_coordinates(self):
        """Estimate coordinates kept out of ``h`` because they were not finite."""
        return self._rejected

    @property
    def current_gamma(self):
        """The gamma in use: ``gamma``, or the last one set by ``target_unclipped_share``."""
        return self._gamma

    @property
    def unclipped_share(self):
        """The share of unclipped coordinates at the last refresh (float32 variable)."""
        return self._share

    def _apply_weight_decay(self, variables):
        """Off: Sophia's decoupled weight decay is inside the core update."""

    def _gamma_for(self, h):
        if self.target_unclipped_share is None:
            return self.gamma
        return ops.cast(self._gamma, h.dtype)

    def _step(self, completed):
        """A step count the core can raise ``b1`` or ``b2`` to exactly (float64 if any)."""
        return ops.cast(completed, self._exact)

    # -- the step ------------------------------------------------------------

    def update_step(self, gradient, variable, learning_rate):
        """One Sophia step for ``variable``: :func:`sophia_core.sophia_update`."""
        m, h = self.sophia_slots(variable)
        param = ops.convert_to_tensor(variable)  # a Keras or, on TensorFlow, a tf variable
        dtype = sophia_core.compute_dtype(param.dtype, xp=xp)
        new_param, state = sophia_core.sophia_update(
            param,
            dense(gradient, variable),
            SophiaState(m=m.value, h=h.value),
            step=self._step(self.iterations + 1),
            lr=ops.cast(learning_rate, dtype),
            b1=self.beta_1,
            gamma=self._gamma_for(h),
            weight_decay=self.weight_decay if self._use_weight_decay(variable) else 0.0,
            eps=self.epsilon,
            clip_threshold=self.clip_threshold,
            bias_correction=self.bias_correction,
            maximize=self.maximize,
            xp=xp,
        )
        self.assign(variable, new_param)
        self.assign(m, state.m)

    def apply(self, grads, trainable_variables=None):
        super().apply(grads, trainable_variables)
        self._check_refreshes()

    def finalize_variable_values(self, var_list):
        """End of ``fit``: also the warnings compiled code could not give.

        (TensorFlow's XLA clusters have no host calls: with ``jit_compile``
        the checks of :meth:`apply` and of the fold are made here instead.)
        """
        super().finalize_variable_values(var_list)
        if not self._host_checks_dropped:
            return
        self._check_refreshes()
        if self.warn_sign_momentum:
            host_call_if(self._streak.value >= sophia_core.SIGN_MOMENTUM_PATIENCE,
                         self._warn_sign_momentum, self._share.value)

    # -- the Hessian ---------------------------------------------------------

    def hessian_refresh_due(self):
        """Whether ``h`` is due a refresh now (a bool tensor; SPEC section 2).

        With ``gradient_accumulation_steps``, only on the first micro-batch
        of an accumulation window (``iterations`` counts real steps).
        """
        due = sophia_core.refresh_due(ops.convert_to_tensor(self.iterations),
                                      hessian_interval=self.hessian_interval,
                                      refresh_at_start=self.refresh_at_start)
        if self.gradient_accumulation_steps:
            micro = self._iterations.value  # Keras's micro-step count
            due = due & ((micro % self.gradient_accumulation_steps) == 0)
        return due

    def update_hessian(self, hhats=None, *, variables=None, sampled_grads=None,
                       positions=None):
        """Fold Hessian estimates into ``h`` now (:func:`sophia_core.fold_hessian`).

        ``hhats`` is a list parallel to ``variables`` (default: the variables
        the optimizer was built with; ``None`` entries and variables not
        listed keep their ``h``). Alternatively, in the
        reference code's convention, pass ``sampled_grads`` (the gradients of
        the mean loss at sampled labels) and ``positions`` (N, the number of
        label positions in that mean): ``hhat = N * g * g``
        (:func:`sophia_core.gnb_estimate`). Folds unconditionally: the
        caller decides when (see :meth:`hessian_refresh_due`). Non-finite
        estimate coordinates keep their old ``h`` and are counted in
        :attr:`rejected_hessian_coordinates`.
        """
        if not self.built:
            raise ValueError("build the optimizer (or take a step) before update_hessian")
        if (hhats is None) == (sampled_grads is None):
            raise ValueError("pass exactly one of hhats or sampled_grads")
        if sampled_grads is not None:
            if positions is None:
                raise ValueError("sampled_grads needs positions (N)")
            hhats = [None if g is None else sophia_core.gnb_estimate(
                ops.convert_to_tensor(g), positions, xp=xp) for g in sampled_grads]
        self.assign_hessian_state(self.folded_hessian_state(hhats, variables=variables))

    def hessian_state(self) -> list[Any]:
        """The variables a fold writes: every ``h``, then the counters."""
        return [*self._hessians, self._hessian_refreshes, self._rejected, self._gamma,
                self._streak, self._share]

    def assign_hessian_state(self, values) -> None:
        """Write values (from :meth:`folded_hessian_state`) into :meth:`hessian_state`."""
        for variable, value in zip(self.hessian_state(), values, strict=True):
            self.assign(variable, value)

    def folded_hessian_state(self, hhats, *, variables=None, where=None) -> list[Any]:
        """The values of :meth:`hessian_state` after folding ``hhats``; nothing is written.

        ``hhats`` and ``variables`` as in :meth:`update_hessian`. Every
        estimate is checked before anything is computed. After the fold, in
        this order: gamma from ``target_unclipped_share`` (if set), the
        :attr:`unclipped_share` with the gamma in use, and the sign-momentum
        detector (:func:`sophia_core.sign_momentum_regime`), which warns once
        per optimizer. ``where`` (a bool tensor) says whether the result
        will be used (a masked fold warns only then).
        """
        hhats = list(hhats)
        expected = len(self._hessians) if variables is None else len(variables)
        if len(hhats) != expected:
            raise ValueError(f"got {len(hhats)} Hessian estimates for {expected} variables")
        if variables is not None:
            aligned = [None] * len(self._hessians)
            for variable, hhat in zip(variables, hhats, strict=True):
                aligned[self._get_variable_index(variable)] = hhat
            hhats = aligned
        hhats = [None if e is None else ops.convert_to_tensor(e) for e in hhats]
        for h, hhat in zip(self._hessians, hhats, strict=True):
            if hhat is not None:
                sophia_core.check_same_shape("h", h, "hhat", hhat)
        refreshes = self._hessian_refreshes.value + 1
        rejected = self._rejected.value
        hs = []
        for h, hhat in zip(self._hessians, hhats, strict=True):
            h = h.value
            if hhat is None:
                hs.append(h)
                continue
            fold = sophia_core.fold_hessian(h, hhat, b2=self.beta_2, refresh=self._step(refreshes),
                                            bias_correction=self.hessian_bias_correction, xp=xp)
            hs.append(fold.h)
            rejected = rejected + ops.cast(fold.rejected, rejected.dtype)
        ms = [m.value for m in self._momentums]
        completed = self._step(ops.maximum(self.iterations, 1))
        moments = dict(b1=self.beta_1, step=completed, bias_correction=self.bias_correction,
                       xp=xp)
        gamma = ops.convert_to_tensor(self.gamma, self._gamma.dtype)
        if self.target_unclipped_share is not None:
            gamma = self._gamma.value
            gamma = sophia_core.gamma_for_unclipped_share(
                ms, hs, target=self.target_unclipped_share, gamma=gamma,
                clip_threshold=self.clip_threshold, **moments)
        share = sophia_core.unclipped_share(
            ms, hs, gamma=self.gamma if self.target_unclipped_share is None else gamma,
            eps=self.epsilon, clip_threshold=self.clip_threshold, **moments)
        streak, warn = sophia_core.sign_momentum_regime(
            self._streak.value, share, refreshes=refreshes, xp=xp)
        if self.warn_sign_momentum and "sign_momentum" not in self._warned:
            self._host_checks_dropped |= not host_call_if(
                warn if where is None else warn & where, self._warn_sign_momentum, share)
        return [*hs, refreshes, rejected, gamma, streak, ops.cast(share, "float32")]

    # -- warnings (host side, once per optimizer) ----------------------------

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(message, UserWarning, stacklevel=3)

    def _warn_sign_momentum(self, share) -> None:
        self._warn_once("sign_momentum", sophia_core.sign_momentum_message(float(share)))

    def _warn_missing_refresh(self, steps) -> None:
        self._warn_once("missing_refresh",
                        sophia_core.missing_refresh_message(int(steps), REFRESH_FIX))

    def _check_refreshes(self) -> None:
        """Warn (once) when more than k steps passed without any Hessian estimate."""
        if not self.built or not self.require_refresh or "missing_refresh" in self._warned:
            return
        steps = ops.convert_to_tensor(self.iterations)
        missing = sophia_core.missing_refresh(
            steps, self._hessian_refreshes.value,
            hessian_interval=self.hessian_interval, refresh_at_start=self.refresh_at_start)
        self._host_checks_dropped |= not host_call_if(missing, self._warn_missing_refresh, steps)

    # -- config --------------------------------------------------------------

    def get_config(self):
        config = super().get_config()
        config.update({name: getattr(self, name) for name in _CORE_NAMES
                       if name not in ("learning_rate", "weight_decay")})
        return config

    # -- portable state (sophia_core.portable) -------------------------------

    def export_state(self, path) -> None:
        """Write step, ``m``, ``h`` and the counters to a portable file (no pickle).

        Tensors are named by their variable's ``path`` ("/" becomes ".").
        """
        from sophia_core import portable

        if not self.built:
            raise ValueError("build the optimizer before export_state")
        hyperparameters = {core: getattr(self, name) for name, core in _CORE_NAMES.items()
                           if name != "learning_rate"}
        hyperparameters["lr"] = float(_numpy(self._get_current_learning_rate()))
        portable.save_state(
            path,
            step=int(_numpy(self.iterations)),
            ms=[_numpy(m) for m in self._momentums],
            hs=[_numpy(h) for h in self._hessians],
            hyperparameters=hyperparameters,
            names=self._names,
            counters=self._counters(),
        )

    def _counters(self) -> dict[str, float]:
        values = {"hessian_refreshes": self._hessian_refreshes,
                  "rejected_hessian_coordinates": self._rejected,
                  "sign_momentum_streak": self._streak}
        counters = {k: int(_numpy(v)) for k, v in values.items()}
        counters["gamma"] = float(_numpy(self._gamma))
        counters["unclipped_share"] = float(_numpy(self._share))
        return counters

    def import_state(self, path) -> None:
        """Restore step, ``m``, ``h`` and the counters written by :meth:`export_state`.

        Tensors are matched by name (the variables' paths), or by position
        for files with positional names (version 1, or saved without names).
        Hyperparameters stay this optimizer's own.
        With ``gradient_accumulation_steps`` the restored step starts a new
        accumulation window (accumulated gradients are not part of the file).
        """
        from sophia_core import portable

        if not self.built:
            raise ValueError("build the optimizer before import_state")
        shapes = [tuple(h.shape) for h in self._hessians]
        try:
            state = portable.load_state(path, expect=dict(zip(self._names, shapes, strict=True)))
        except ValueError:
            # A file with positional names ("0", "1", ...: version 1, or written
            # without names) is read by position, as version 1 was.
            if portable.load_state(path).names != [str(i) for i in range(len(shapes))]:
                raise
            state = portable.load_state(path, expect_shapes=shapes)
        for store, arrays in ((self._momentums, state.ms), (self._hessians, state.hs)):
            for variable, array in zip(store, arrays, strict=True):
                variable.assign(ops.cast(array, variable.dtype))
        counters = state.counters or {}
        for variable, key in ((self._hessian_refreshes, "hessian_refreshes"),
                              (self._rejected, "rejected_hessian_coordinates"),
                              (self._streak, "sign_momentum_streak"),
                              (self._gamma, "gamma"), (self._share, "unclipped_share")):
            if key in counters:
                variable.assign(ops.cast(counters[key], variable.dtype))
        # Keras counts micro-steps; ``iterations`` is that count // accumulation steps.
        self._iterations.assign(int(state.step) * (self.gradient_accumulation_steps or 1))


@keras.saving.register_keras_serializable(package="sophia_tf")
class SophiaG(Sophia):
    """Sophia-G: ``h`` refreshed by the Gauss-Newton-Bartlett estimator.

    In ``fit`` with :class:`sophia_tf.SophiaTrainStep`, ``h`` is refreshed by
    :func:`sophia_tf.gnb_hessian` on the model's outputs: logits, or
    probabilities when the compiled loss says ``from_logits=False``. In a
    custom loop, pass that function's result to :meth:`update_hessian`.
    """

    estimator = "gnb"


@keras.saving.register_keras_serializable(package="sophia_tf")
class SophiaH(Sophia):
    """Sophia-H: ``h`` refreshed by Hutchinson's estimator (any loss).

    ``n_probes`` probes of distribution ``probe`` ("gaussian" or
    "rademacher") per refresh; :func:`sophia_tf.hutchinson_hessian` computes
    the estimate, :class:`sophia_tf.SophiaTrainStep` calls it inside ``fit``
    on the compiled loss.
    """

    estimator = "hutchinson"

    def __init__(self, *args, n_probes=1, probe="gaussian", **kwargs):
        sophia_core.validate_hyperparameters(n_probes=n_probes, probe=probe)
        super().__init__(*args, **kwargs)
        self.n_probes = n_probes
        self.probe = probe

    def get_config(self):
        config = super().get_config()
        config.update(n_probes=self.n_probes, probe=self.probe)
        return config
