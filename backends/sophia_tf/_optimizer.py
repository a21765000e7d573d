"""``SophiaG`` and ``SophiaH``: Keras 3 optimizers, on every Keras backend.

The math is :func:`sophia_core.sophia_update` and :func:`sophia_core.fold_hessian`,
run on :data:`sophia_tf.keras_namespace`; this module maps names, keeps the
state in optimizer variables and warns once when Sophia is not really running.
"""

from __future__ import annotations

import numbers
import warnings
from typing import Any

import keras
from keras import ops

import sophia_core
from sophia_core import DEFAULTS, SophiaState, portable

from ._autodiff import dense, host_call_if
from ._namespace import keras_namespace as xp

__all__ = ["KERAS_NAMES", "REFRESH_FIX", "Sophia", "SophiaG", "SophiaH"]

_OPTIONS = ("gamma", "clip_threshold", "hessian_interval", "refresh_at_start",
            "bias_correction", "maximize", "hessian_bias_correction", "target_unclipped_share",
            "hessian_batch_fraction", "require_refresh", "warn_sign_momentum")
#: The core's hyperparameter names as Keras spells them (the one mapping).
KERAS_NAMES: dict[str, str] = {"lr": "learning_rate", "b1": "beta_1", "b2": "beta_2",
                               "eps": "epsilon", "weight_decay": "weight_decay",
                               **{name: name for name in _OPTIONS}}
_CORE_NAMES = {keras_name: core for core, keras_name in KERAS_NAMES.items()}
_SETTINGS = [name for name in _CORE_NAMES if name not in ("learning_rate", "weight_decay")]
#: The remedy the missing-refresh warning names.
REFRESH_FIX = ("Refresh h inside fit with one line: build the model as sophia_tf.Sequential "
               "or sophia_tf.Model, or add the mixin sophia_tf.SophiaTrainStep to its class; "
               "in a custom loop call optimizer.update_hessian(...) when "
               "optimizer.hessian_refresh_due().")
#: What a fold counts: the portable state's name -> the optimizer's attribute.
_COUNTERS = {"hessian_refreshes": "hessian_refreshes", "gamma": "current_gamma",
             "rejected_hessian_coordinates": "rejected_hessian_coordinates",
             "sign_momentum_streak": "sign_momentum_streak", "unclipped_share": "unclipped_share"}


def _numpy(value: Any) -> Any:
    with warnings.catch_warnings():  # keras's np.array(tensor) warns under numpy 2
        warnings.simplefilter("ignore", DeprecationWarning)
        return ops.convert_to_numpy(value)


@keras.saving.register_keras_serializable(package="sophia_tf")
class Sophia(keras.optimizers.Optimizer):
    """Sophia (Liu et al., 2024): clipped, Hessian-preconditioned momentum.

    Arguments map to the core's names as in :data:`KERAS_NAMES`, default to
    ``sophia_core.DEFAULTS`` and are checked by
    :func:`sophia_core.validate_hyperparameters`, also in ``from_config`` and
    on assignment (``optimizer.gamma = 0.05``). ``learning_rate`` may be a
    float, a ``LearningRateSchedule`` or a callable; ``weight_decay`` is
    Sophia's decoupled decay (``None`` means 0; Keras's own pass is off;
    ``exclude_from_weight_decay`` works). ``h`` changes only when an estimate
    is folded in: in ``fit`` with :class:`sophia_tf.SophiaTrainStep`, or by
    :meth:`update_hessian`. After ``build``, optimizer variables report
    ``hessian_refreshes``, ``rejected_hessian_coordinates`` (non-finite
    estimate coordinates kept out of ``h``), ``current_gamma`` (``gamma``, or
    the one ``target_unclipped_share`` set last), ``unclipped_share`` (at the
    last refresh) and ``sign_momentum_streak``.
    """

    #: Which estimator refreshes ``h`` in ``fit`` ("gnb" or "hutchinson").
    estimator = "gnb"

    def __init__(self, learning_rate=DEFAULTS["lr"], beta_1=DEFAULTS["b1"],
                 beta_2=DEFAULTS["b2"], gamma=DEFAULTS["gamma"],
                 weight_decay=DEFAULTS["weight_decay"], epsilon=DEFAULTS["eps"],
                 clip_threshold=DEFAULTS["clip_threshold"],
                 hessian_interval=DEFAULTS["hessian_interval"],
                 refresh_at_start=DEFAULTS["refresh_at_start"],
                 bias_correction=DEFAULTS["bias_correction"], maximize=DEFAULTS["maximize"],
                 hessian_bias_correction=DEFAULTS["hessian_bias_correction"],
                 target_unclipped_share=DEFAULTS["target_unclipped_share"],
                 hessian_batch_fraction=DEFAULTS["hessian_batch_fraction"],
                 require_refresh=DEFAULTS["require_refresh"],
                 warn_sign_momentum=DEFAULTS["warn_sign_momentum"], name=None, **kwargs):
        settings = dict(
            beta_1=beta_1, beta_2=beta_2, epsilon=epsilon, gamma=gamma,
            clip_threshold=clip_threshold, hessian_interval=hessian_interval,
            refresh_at_start=refresh_at_start, bias_correction=bias_correction,
            maximize=maximize, hessian_bias_correction=hessian_bias_correction,
            target_unclipped_share=target_unclipped_share,
            hessian_batch_fraction=hessian_batch_fraction, require_refresh=require_refresh,
            warn_sign_momentum=warn_sign_momentum)
        weight_decay = 0.0 if weight_decay is None else weight_decay
        sophia_core.validate_hyperparameters(  # all of them, before Keras sees any
            dynamic=("lr",), lr=learning_rate, weight_decay=weight_decay,
            **{_CORE_NAMES[k]: v for k, v in settings.items()})
        if isinstance(learning_rate, numbers.Real):
            learning_rate = float(learning_rate)  # Keras takes Python floats only
        super().__init__(learning_rate=learning_rate, weight_decay=weight_decay, name=name,
                         **kwargs)
        vars(self).update(settings)  # validated; later assignments go through __setattr__
        self._warned: set[str] = set()  # the warnings given (once per optimizer)
        self._host_checks_dropped = False  # a check compiled where no host call fits

    def __setattr__(self, name, value):
        if name in _SETTINGS:
            sophia_core.validate_hyperparameters(**{_CORE_NAMES[name]: value})
        super().__setattr__(name, value)

    def build(self, var_list):
        """``m`` and ``h`` per variable (float32 for narrow ones), and the counters."""
        if self.built:
            return
        super().build(var_list)
        dtypes = ["float32" if d in ("float16", "bfloat16") else d
                  for d in (keras.backend.standardize_dtype(v.dtype) for v in var_list)]
        for dtype in set(dtypes):
            sophia_core.check_eps(self.epsilon, xp.float64 if dtype == "float64" else xp.float32,
                                  xp=xp, gamma=self.gamma)

        def slot(name, shape=(), dtype="int", **options):  # the first replica's value wins
            return self.add_variable(shape=shape, dtype=dtype, name=name,
                                     aggregation="only_first_replica", **options)

        self._momentums, self._hessians = (
            [slot(f"{v.path.replace('/', '_')}_{kind}", v.shape, d)
             for v, d in zip(var_list, dtypes, strict=True)] for kind in ("momentum", "hessian"))
        self._names = [v.path.replace("/", ".") for v in var_list]
        self.hessian_refreshes = slot("hessian_refreshes")
        self.rejected_hessian_coordinates = slot("rejected_hessian_coordinates")
        self.current_gamma = slot(
            "current_gamma", dtype="float64" if "float64" in dtypes else "float32",
            initializer=lambda shape, dtype: ops.convert_to_tensor(self.gamma, dtype))
        self.sign_momentum_streak = slot("sign_momentum_streak")
        self.unclipped_share = slot("unclipped_share", dtype="float32")
        with warnings.catch_warnings():  # JAX without x64 has no float64
            warnings.simplefilter("ignore")
            self._exact = keras.backend.standardize_dtype(ops.zeros((), "float64").dtype)

    def sophia_slots(self, variable) -> tuple[Any, Any]:
        """``(m, h)``: the momentum and Hessian-EMA variables of ``variable``."""
        index = self._get_variable_index(variable)
        return self._momentums[index], self._hessians[index]

    def _apply_weight_decay(self, variables):
        """Off: Sophia's decoupled weight decay is inside the core update."""

    def _exact_count(self, count):
        """A count the core raises ``b1`` or ``b2`` to: float64, rounded once as numpy."""
        return ops.cast(count, self._exact)

    def update_step(self, gradient, variable, learning_rate):
        m, h = self.sophia_slots(variable)
        param = ops.convert_to_tensor(variable)  # a Keras or, on TensorFlow, a tf variable
        gamma = self.gamma if self.target_unclipped_share is None else ops.cast(
            self.current_gamma, h.dtype)
        new_param, state = sophia_core.sophia_update(
            param, dense(gradient, variable), SophiaState(m=m.value, h=h.value),
            step=self._exact_count(self.iterations + 1),
            lr=ops.cast(learning_rate, sophia_core.compute_dtype(param.dtype, xp=xp)),
            b1=self.beta_1, gamma=gamma, eps=self.epsilon, clip_threshold=self.clip_threshold,
            weight_decay=self.weight_decay if self._use_weight_decay(variable) else 0.0,
            bias_correction=self.bias_correction, maximize=self.maximize, xp=xp)
        self.assign(variable, new_param)
        self.assign(m, state.m)

    def apply(self, grads, trainable_variables=None):
        super().apply(grads, trainable_variables)
        self._check_refreshes()

    def finalize_variable_values(self, var_list):
        """End of ``fit``: also the warnings an XLA cluster (no host calls) could not give."""
        super().finalize_variable_values(var_list)
        if self._host_checks_dropped:
            self._check_refreshes()
            if self.warn_sign_momentum:
                host_call_if(self.sign_momentum_streak.value >= sophia_core.SIGN_MOMENTUM_PATIENCE,
                             self._warn_sign_momentum, self.unclipped_share.value)

    def hessian_refresh_due(self):
        """Whether ``h`` is due a refresh now (a bool tensor; SPEC section 2); with
        ``gradient_accumulation_steps``, on the first micro-batch of a window."""
        due = sophia_core.refresh_due(ops.convert_to_tensor(self.iterations),
                                      hessian_interval=self.hessian_interval,
                                      refresh_at_start=self.refresh_at_start)
        if self.gradient_accumulation_steps:  # Keras's _iterations counts micro-steps
            due = due & (self._iterations.value % self.gradient_accumulation_steps == 0)
        return due

    def update_hessian(self, hhats, *, variables=None):
        """Fold estimates into ``h`` now: ``hhats`` parallel to ``variables`` (default:
        those the optimizer was built with), ``None`` keeping that ``h``."""
        if not self.built:
            raise ValueError("build the optimizer (or take a step) before update_hessian")
        self.assign_hessian_state(self.folded_hessian_state(hhats, variables=variables))

    def hessian_state(self) -> list[Any]:
        """The variables a fold writes: every ``h``, then the counters."""
        return [*self._hessians, *(getattr(self, a) for a in _COUNTERS.values())]

    def assign_hessian_state(self, values) -> None:
        """Write :meth:`folded_hessian_state`'s values into :meth:`hessian_state`."""
        for variable, value in zip(self.hessian_state(), values, strict=True):
            self.assign(variable, value)

    def folded_hessian_state(self, hhats, *, variables=None, where=None) -> list[Any]:
        """The values of :meth:`hessian_state` after folding ``hhats``, nothing written.

        (The form a JAX train step needs.) After the fold: gamma from
        ``target_unclipped_share`` (if set), the unclipped share, the
        sign-momentum detector; ``where`` (a bool tensor) says whether the
        result will be used (its warning waits for it).
        """
        hhats, count = list(hhats), len(self._hessians if variables is None else variables)
        if len(hhats) != count:
            raise ValueError(f"got {len(hhats)} Hessian estimates for {count} variables")
        if variables is not None:
            by_index = {self._get_variable_index(v): e
                        for v, e in zip(variables, hhats, strict=True)}
            hhats = [by_index.get(i) for i in range(len(self._hessians))]
        for h, hhat in zip(self._hessians, hhats, strict=True):
            if hhat is not None:  # every estimate is checked before anything is computed
                sophia_core.check_same_shape("h", h, "hhat", hhat)
        new = {key: getattr(self, a).value for key, a in _COUNTERS.items()}
        new["hessian_refreshes"] = new["hessian_refreshes"] + 1  # not +=: tf.Variable
        hs = []
        for h, hhat in zip(self._hessians, hhats, strict=True):
            fold = None if hhat is None else sophia_core.fold_hessian(
                h.value, ops.convert_to_tensor(hhat), b2=self.beta_2, xp=xp,
                refresh=self._exact_count(new["hessian_refreshes"]),
                bias_correction=self.hessian_bias_correction)
            hs.append(h.value if fold is None else fold.h)
            if fold is not None:
                rejected = new["rejected_hessian_coordinates"]
                new["rejected_hessian_coordinates"] = rejected + ops.cast(fold.rejected,
                                                                          rejected.dtype)
        target = self.target_unclipped_share
        after = sophia_core.after_fold(
            [m.value for m in self._momentums], hs, target=target,
            gamma=self.gamma if target is None else new["gamma"],
            streak=new["sign_momentum_streak"], refreshes=new["hessian_refreshes"],
            eps=self.epsilon, clip_threshold=self.clip_threshold, b1=self.beta_1,
            step=self._exact_count(ops.maximum(self.iterations, 1)),
            bias_correction=self.bias_correction, xp=xp)
        new["gamma"] = ops.cast(after.gamma, new["gamma"].dtype)
        new["sign_momentum_streak"] = after.streak
        new["unclipped_share"] = ops.cast(after.share, "float32")
        if self.warn_sign_momentum and "sign_momentum" not in self._warned:
            self._host_checks_dropped |= not host_call_if(
                after.warn if where is None else after.warn & where, self._warn_sign_momentum,
                after.share)
        return [*hs, *new.values()]

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
        """Warn once when more than k steps passed without any Hessian estimate."""
        if not self.built or not self.require_refresh or "missing_refresh" in self._warned:
            return
        steps = ops.convert_to_tensor(self.iterations)
        missing = sophia_core.missing_refresh(
            steps, self.hessian_refreshes.value, hessian_interval=self.hessian_interval,
            refresh_at_start=self.refresh_at_start)
        self._host_checks_dropped |= not host_call_if(missing, self._warn_missing_refresh, steps)

    def get_config(self):
        return {**super().get_config(), **{name: getattr(self, name) for name in _SETTINGS}}

    def export_state(self, path) -> None:
        """Write step, ``m``, ``h`` and the counters (``sophia_core.portable``, no
        pickle), named by variable path ("/" becomes ".")."""
        if not self.built:
            raise ValueError("build the optimizer before export_state")
        hyperparameters = {core: getattr(self, name) for name, core in _CORE_NAMES.items()
                           if name != "learning_rate"}
        hyperparameters["lr"] = float(_numpy(self.learning_rate))  # a schedule's current one
        portable.save_state(
            path, step=int(_numpy(self.iterations)), ms=[_numpy(m) for m in self._momentums],
            hs=[_numpy(h) for h in self._hessians], hyperparameters=hyperparameters,
            names=self._names,
            counters={key: _numpy(getattr(self, a)).item() for key, a in _COUNTERS.items()})

    def import_state(self, path) -> None:
        """Restore what :meth:`export_state` wrote (hyperparameters stay this optimizer's).

        By name, or by position for positional names ("0", "1", ...: version 1).
        With ``gradient_accumulation_steps`` the step starts a new window.
        """
        if not self.built:
            raise ValueError("build the optimizer before import_state")
        shapes = [tuple(h.shape) for h in self._hessians]
        try:
            state = portable.load_state(path, expect=dict(zip(self._names, shapes, strict=True)))
        except ValueError:
            if portable.load_state(path).names != [str(i) for i in range(len(shapes))]:
                raise
            state = portable.load_state(path, expect_shapes=shapes)
        for store, arrays in ((self._momentums, state.ms), (self._hessians, state.hs)):
            for variable, array in zip(store, arrays, strict=True):
                variable.assign(ops.cast(array, variable.dtype))
        for key, value in state.counters.items():
            if key in _COUNTERS:
                counter = getattr(self, _COUNTERS[key])
                counter.assign(ops.cast(value, counter.dtype))
        # Keras counts micro-steps; ``iterations`` is that count // accumulation steps.
        self._iterations.assign(int(state.step) * (self.gradient_accumulation_steps or 1))


@keras.saving.register_keras_serializable(package="sophia_tf")
class SophiaG(Sophia):
    """Sophia-G: ``h`` refreshed by the Gauss-Newton-Bartlett estimator,
    :func:`sophia_tf.gnb_hessian` (in ``fit``: on the model's logits, or on
    its probabilities when the compiled loss says ``from_logits=False``)."""

    estimator = "gnb"


@keras.saving.register_keras_serializable(package="sophia_tf")
class SophiaH(Sophia):
    """Sophia-H: ``h`` refreshed by Hutchinson's estimator on any loss,
    :func:`sophia_tf.hutchinson_hessian` with ``n_probes`` probes of
    distribution ``probe`` ("gaussian" or "rademacher")."""

    estimator = "hutchinson"

    def __init__(self, *args, n_probes=1, probe="gaussian", **kwargs):
        sophia_core.validate_hyperparameters(n_probes=n_probes, probe=probe)
        super().__init__(*args, **kwargs)
        self.n_probes, self.probe = n_probes, probe

    def get_config(self):
        return {**super().get_config(), "n_probes": self.n_probes, "probe": self.probe}
