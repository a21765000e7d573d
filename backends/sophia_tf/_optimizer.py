"""Sophia as a Keras 3 optimizer: ``SophiaG`` and ``SophiaH``.

The math is :func:`sophia_core.sophia_update` and :func:`sophia_core.hessian_ema`
(see their docstrings); this module maps Keras's argument names onto the
core's, keeps ``m`` and ``h`` as optimizer variables, writes the results back,
and folds Hessian estimates into ``h`` when asked.

The update runs on whatever backend Keras runs on: TensorFlow through
``sophia_tf``'s namespace shim, JAX through ``jax.numpy``, torch through
``array_api_compat.torch``.
"""

from __future__ import annotations

from typing import Any

import keras
from keras import ops

import sophia_core
from sophia_core import DEFAULTS, Hyperparameters, SophiaState

__all__ = ["Sophia", "SophiaG", "SophiaH", "KERAS_NAMES", "backend_namespace"]

#: The core's hyperparameter names as Keras spells them (the one mapping).
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
}

_NARROW = ("float16", "bfloat16")


def _dense(gradient: Any) -> Any:
    """The gradient as a dense tensor (TF gives embeddings ``IndexedSlices``)."""
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        return tf.convert_to_tensor(gradient)
    return ops.convert_to_tensor(gradient)


def _numpy(value: Any) -> Any:
    tensor = ops.convert_to_tensor(value)
    if keras.backend.backend() == "tensorflow":
        return tensor.numpy()  # keras's np.array(tensor) warns under numpy 2
    return ops.convert_to_numpy(tensor)


def backend_namespace() -> Any:
    """The array namespace the core runs on under the current Keras backend."""
    name = keras.backend.backend()
    if name == "tensorflow":
        from ._namespace import tf_namespace

        return tf_namespace
    if name == "jax":
        import jax.numpy as jnp

        return jnp
    if name == "torch":
        import array_api_compat.torch as xp

        return xp
    if name == "numpy":
        import numpy as np

        return np
    raise NotImplementedError(f"sophia_tf does not support the Keras backend {name!r}")


@keras.saving.register_keras_serializable(package="sophia_tf")
class Sophia(keras.optimizers.Optimizer):
    """Sophia (Liu et al., 2024): clipped, Hessian-preconditioned momentum.

    The update and its math are documented once, in
    :func:`sophia_core.sophia_update`. Keras spellings map to the core's names
    as in :data:`KERAS_NAMES`: ``beta_1`` is ``b1``, ``beta_2`` is ``b2``,
    ``epsilon`` is ``eps``. Defaults are the reference code's.

    ``weight_decay`` is Sophia's decoupled weight decay, applied inside the
    update on the pre-update parameter (``None`` means 0); Keras's own
    weight-decay pass is switched off, so it is never applied twice.
    ``exclude_from_weight_decay`` works as for every Keras optimizer.

    ``h`` changes only in :meth:`update_hessian`: call it when
    :meth:`hessian_refresh_due` says so (or let :class:`sophia_tf.SophiaTrainStep`
    do it inside ``fit``). Until the first refresh ``h`` is 0 and the step is
    a sign-momentum step of size ``learning_rate``.
    """

    #: Which estimator refreshes ``h`` in ``fit`` ("gnb" or "hutchinson").
    estimator = "gnb"

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
        clipnorm=None,
        clipvalue=None,
        global_clipnorm=None,
        use_ema=False,
        ema_momentum=0.99,
        ema_overwrite_frequency=None,
        loss_scale_factor=None,
        gradient_accumulation_steps=None,
        name=None,
        **kwargs,
    ):
        weight_decay = 0.0 if weight_decay is None else weight_decay
        # One validation, the core's (a schedule learning rate is the host's).
        given = locals()
        hyperparameters = Hyperparameters(
            **{core: given[keras_name] for core, keras_name in KERAS_NAMES.items()}
        )
        super().__init__(
            learning_rate=learning_rate,
            name=name,
            weight_decay=weight_decay,
            clipnorm=clipnorm,
            clipvalue=clipvalue,
            global_clipnorm=global_clipnorm,
            use_ema=use_ema,
            ema_momentum=ema_momentum,
            ema_overwrite_frequency=ema_overwrite_frequency,
            loss_scale_factor=loss_scale_factor,
            gradient_accumulation_steps=gradient_accumulation_steps,
            **kwargs,
        )
        # beta_1, gamma, ... are properties over this (validated on change).
        self._hyperparameters = hyperparameters

    # -- state ---------------------------------------------------------------

    def build(self, var_list):
        """Create ``m`` and ``h`` for every variable (float32 for narrow ones)."""
        if self.built:
            return
        super().build(var_list)
        self._sophia_m = []
        self._sophia_h = []
        self._sophia_decays = []
        for variable in var_list:
            for slot, store in (("momentum", self._sophia_m), ("hessian", self._sophia_h)):
                if keras.backend.standardize_dtype(variable.dtype) in _NARROW:
                    prefix = getattr(variable, "path", variable.name).replace("/", "_")
                    store.append(self.add_variable(
                        shape=variable.shape, dtype="float32", name=f"{prefix}_{slot}",
                    ))
                else:
                    store.append(self.add_variable_from_reference(variable, slot))
            self._sophia_decays.append(self._use_weight_decay(variable))

    def sophia_slots(self, variable) -> tuple[Any, Any]:
        """``(m, h)``: the momentum and Hessian-EMA variables of ``variable``."""
        index = self._get_variable_index(variable)
        return self._sophia_m[index], self._sophia_h[index]

    def _apply_weight_decay(self, variables):
        """Off: Sophia's decoupled weight decay is inside the core update."""

    # -- the step ------------------------------------------------------------

    def update_step(self, gradient, variable, learning_rate):
        """One Sophia step for ``variable``: :func:`sophia_core.sophia_update`."""
        xp = backend_namespace()
        index = self._get_variable_index(variable)
        m, h = self._sophia_m[index], self._sophia_h[index]
        param = ops.convert_to_tensor(variable)
        dtype = sophia_core.compute_dtype(param.dtype, xp=xp)
        hp = self._hyperparameters
        new_param, state = sophia_core.sophia_update(
            param,
            _dense(gradient),
            SophiaState(m=ops.convert_to_tensor(m), h=ops.convert_to_tensor(h)),
            step=self.iterations + 1,
            lr=xp.astype(ops.convert_to_tensor(learning_rate), dtype),
            b1=hp.b1,
            gamma=hp.gamma,
            weight_decay=self.weight_decay if self._sophia_decays[index] else 0.0,
            eps=hp.eps,
            clip_threshold=hp.clip_threshold,
            bias_correction=hp.bias_correction,
            maximize=hp.maximize,
            xp=xp,
        )
        self.assign(variable, new_param)
        self.assign(m, state.m)

    # -- the Hessian ---------------------------------------------------------

    def hessian_refresh_due(self):
        """Whether ``h`` is due a refresh now (a bool tensor; SPEC section 2).

        With ``gradient_accumulation_steps``, only on the first micro-batch
        of an accumulation window (``iterations`` counts real steps).
        """
        due = sophia_core.refresh_due(
            ops.convert_to_tensor(self.iterations),
            hessian_interval=self.hessian_interval,
            refresh_at_start=self.refresh_at_start,
        )
        if self.gradient_accumulation_steps:
            micro = ops.convert_to_tensor(self._iterations)
            due = due & ((micro % self.gradient_accumulation_steps) == 0)
        return due

    def update_hessian(self, hhats=None, *, sampled_grads=None, positions=None):
        """Fold Hessian estimates into ``h``: ``h <- b2*h + (1-b2)*hhat``.

        ``hhats`` is a list parallel to the variables the optimizer was built
        with (``None`` entries leave that ``h`` alone). Alternatively, in the
        reference code's convention, pass ``sampled_grads`` (the gradients of
        the mean loss at sampled labels) and ``positions`` (N, the number of
        label positions in that mean): ``hhat = N * g * g``
        (:func:`sophia_core.gnb_estimate`). Folds unconditionally: the
        caller decides when (see :meth:`hessian_refresh_due`).
        """
        if not self.built:
            raise ValueError("build the optimizer (or take a step) before update_hessian")
        xp = backend_namespace()
        if (hhats is None) == (sampled_grads is None):
            raise ValueError("pass exactly one of hhats or sampled_grads")
        if sampled_grads is not None:
            if positions is None:
                raise ValueError("sampled_grads needs positions (N)")
            hhats = [
                None if g is None else sophia_core.gnb_estimate(
                    ops.convert_to_tensor(g), positions, xp=xp)
                for g in sampled_grads
            ]
        self._fold_hessian(hhats)

    def _fold_hessian(self, hhats, where=None):
        """``h <- hessian_ema(h, hhat)`` for each non-None hhat; where ``where``."""
        xp = backend_namespace()
        hhats = list(hhats)
        if len(hhats) != len(self._sophia_h):
            raise ValueError(
                f"got {len(hhats)} Hessian estimates for {len(self._sophia_h)} variables"
            )
        pairs = [(h, ops.convert_to_tensor(hhat))
                 for h, hhat in zip(self._sophia_h, hhats, strict=True) if hhat is not None]
        for h, hhat in pairs:  # every estimate is checked before any h is written
            sophia_core.check_same_shape("h", h, "hhat", hhat)
        b2 = self._hyperparameters.b2

        def fold(h, hhat):
            new = sophia_core.hessian_ema(h, hhat, b2=b2, xp=xp)
            return new if where is None else xp.where(where, new, h)

        if keras.backend.backend() == "tensorflow":
            from ._distribute import assign_everywhere

            assign_everywhere(self, pairs, fold)
        else:
            for h, hhat in pairs:
                self.assign(h, fold(ops.convert_to_tensor(h), hhat))

    # -- config --------------------------------------------------------------

    def get_config(self):
        config = super().get_config()
        config.update(
            beta_1=self.beta_1,
            beta_2=self.beta_2,
            gamma=self.gamma,
            epsilon=self.epsilon,
            clip_threshold=self.clip_threshold,
            hessian_interval=self.hessian_interval,
            refresh_at_start=self.refresh_at_start,
            bias_correction=self.bias_correction,
            maximize=self.maximize,
        )
        return config

    # -- portable state (sophia_core.portable) -------------------------------

    def export_state(self, path) -> None:
        """Write step, ``m`` and ``h`` to a portable file (no pickle)."""
        from sophia_core import portable

        hp = {core: getattr(self, keras_name) for core, keras_name in KERAS_NAMES.items()
              if core != "lr"}
        hp["weight_decay"] = self._hyperparameters.weight_decay
        hp["lr"] = float(_numpy(self._get_current_learning_rate()))
        portable.save_state(
            path,
            step=int(_numpy(self.iterations)),
            ms=[_numpy(m) for m in self._sophia_m],
            hs=[_numpy(h) for h in self._sophia_h],
            hyperparameters=hp,
        )

    def import_state(self, path) -> None:
        """Restore step, ``m`` and ``h`` written by :meth:`export_state`.

        The optimizer must be built on variables of the same shapes, in the
        same order. Hyperparameters stay this optimizer's own.
        """
        from sophia_core import portable

        if not self.built:
            raise ValueError("build the optimizer before import_state")
        state = portable.load_state(path)
        if len(state.ms) != len(self._sophia_m) or len(state.hs) != len(self._sophia_h):
            raise ValueError(
                f"the file holds {len(state.ms)} parameters, the optimizer {len(self._sophia_m)}"
            )
        for store, arrays in ((self._sophia_m, state.ms), (self._sophia_h, state.hs)):
            for variable, array in zip(store, arrays, strict=True):
                if tuple(array.shape) != tuple(variable.shape):
                    raise ValueError(
                        f"shape mismatch: {variable.path} has shape {tuple(variable.shape)} "
                        f"but the file has {tuple(array.shape)}"
                    )
                variable.assign(array.astype(keras.backend.standardize_dtype(variable.dtype)))
        self._iterations.assign(int(state.step))


def _keras_property(core_name: str) -> property:
    """A Keras-spelled attribute stored in the validated core hyperparameters."""

    def get(self):
        return getattr(self._hyperparameters, core_name)

    def set(self, value):
        self._hyperparameters = self._hyperparameters.replace(**{core_name: value})

    return property(get, set, doc=f"The core's ``{core_name}``.")


# learning_rate and weight_decay stay Keras's own attributes.
for _core, _keras in KERAS_NAMES.items():
    if _core not in ("lr", "weight_decay"):
        setattr(Sophia, _keras, _keras_property(_core))


@keras.saving.register_keras_serializable(package="sophia_tf")
class SophiaG(Sophia):
    """Sophia-G: ``h`` refreshed by the Gauss-Newton-Bartlett estimator.

    In ``fit``, :class:`sophia_tf.SophiaTrainStep` refreshes ``h`` with
    :func:`sophia_tf.gnb_hessian` (the model must output logits). In a custom
    loop, pass that function's result to :meth:`update_hessian`.
    """

    estimator = "gnb"


@keras.saving.register_keras_serializable(package="sophia_tf")
class SophiaH(Sophia):
    """Sophia-H: ``h`` refreshed by Hutchinson's estimator (any loss).

    ``n_probes`` probes of distribution ``probe`` ("gaussian" or
    "rademacher") per refresh; :func:`sophia_tf.hutchinson_hessian` computes
    the estimate, :class:`sophia_tf.SophiaTrainStep` calls it inside ``fit``.
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
