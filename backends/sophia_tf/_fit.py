"""Sophia's Hessian refresh inside ``model.fit``, on TensorFlow, JAX and torch.

``SophiaTrainStep`` is a mixin for ``keras.Model``; ``sophia_tf.Sequential``
and ``sophia_tf.Model`` are ``keras.Sequential`` and ``keras.Model`` with it.
Before each training step it asks the optimizer whether a refresh is due
(SPEC section 2) and, if so, estimates the Hessian on the first
``hessian_batch_fraction`` of the batch's rows and folds it into ``h``; then
Keras takes its own step. The estimate's forward pass runs in a
``keras.StatelessScope``: it changes no layer state (BatchNorm statistics,
dropout seeds, metrics). Its noise is seeded by ``(model.sophia_seed,
optimizer.iterations)``, so a resumed run draws the same labels or probes;
``sophia_seed`` and ``sophia_ignore_index`` are saved with the model.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import keras
from keras import ops

import sophia_core

from . import _distribute
from ._autodiff import traced
from ._estimators import gnb_local, hutchinson_hessian
from ._namespace import keras_namespace as xp
from ._optimizer import Sophia

__all__ = ["Model", "Sequential", "SophiaTrainStep", "refresh_hessian"]

def _sophia(optimizer: Any) -> Sophia | None:
    """The Sophia optimizer, also inside a ``LossScaleOptimizer``; else None."""
    optimizer = getattr(optimizer, "inner_optimizer", optimizer)
    return optimizer if isinstance(optimizer, Sophia) else None


def _single(structure: Any, what: str) -> Any:
    leaves = keras.tree.flatten(structure)
    if len(leaves) != 1:
        raise ValueError(f"Sophia-G's refresh in fit needs a model with one {what}, "
                         f"got {len(leaves)}; refresh it in a custom loop instead")
    return leaves[0]


def _loss_settings(model: Any) -> tuple[bool, int | None]:
    """``(from_logits, ignore_class)`` of the compiled loss, for Sophia-G.

    Keras's categorical cross-entropies say whether the model outputs
    probabilities; Keras's other losses are not what the GNB estimator
    assumes (SophiaH is); a custom loss is taken to be a cross-entropy of
    logits.
    """
    loss = _single(model.loss, "loss")
    loss = keras.losses.get(loss) if isinstance(loss, str) else loss
    if isinstance(loss, (keras.losses.SparseCategoricalCrossentropy,
                         keras.losses.CategoricalCrossentropy)):
        config = loss.get_config()
        from_logits, ignore_class = config["from_logits"], config.get("ignore_class")
    elif loss in (keras.losses.sparse_categorical_crossentropy,
                  keras.losses.categorical_crossentropy):
        from_logits, ignore_class = False, None
    elif getattr(loss, "__module__", "").startswith("keras."):
        raise ValueError(f"SophiaG estimates the Hessian of a categorical cross-entropy, but "
                         f"the model is compiled with {loss}: use SophiaH")
    else:
        return True, None
    last = model.layers[-1] if model.layers else None
    if from_logits and (isinstance(last, keras.layers.Softmax)
                        or getattr(last, "activation", None) is keras.activations.softmax):
        raise ValueError("the loss has from_logits=True but the model ends in a softmax: its "
                         "outputs are probabilities. Drop the softmax (recommended) or set "
                         "from_logits=False")
    return from_logits, ignore_class


def _labels_mask(y: Any, logits: Any, ignore_index: int) -> Any:
    """Which positions count: integer labels shaped like ``logits[..., 0]``."""
    if y is None:
        return None
    y = _single(y, "target")
    if "int" not in keras.backend.standardize_dtype(y.dtype) or \
            len(y.shape) != len(logits.shape) - 1:
        return None
    return y != ops.cast(ignore_index, y.dtype)


def _first_rows(structure: Any, rows: Any) -> Any:
    return keras.tree.map_structure(lambda t: None if t is None else t[:rows], structure)


def _rows(x: Any, fraction: float) -> Any:
    """How many rows the estimate uses: :func:`sophia_core.estimate_rows`.

    A batch size known only at run time (TensorFlow graphs) gives the same
    number as a tensor.
    """
    batch = ops.shape(keras.tree.flatten(x)[0])[0]
    if isinstance(batch, int):
        return sophia_core.estimate_rows(batch, fraction)
    return ops.maximum(1, ops.cast(ops.ceil(fraction * ops.cast(batch, "float64")), "int32"))


def _stateless(model: Any, values: list[Any], compute: Any) -> Any:
    """``compute()`` with the trainable variables at ``values``, no state change kept."""
    mapping = [*zip(model.trainable_variables, values, strict=True),
               *((v, v.value) for v in model.non_trainable_variables)]
    with keras.StatelessScope(state_mapping=mapping, collect_losses=True):
        return compute()


class _Estimate(NamedTuple):
    """An estimate split where replicas communicate (TensorFlow ``MirroredStrategy``)."""

    local: Callable[[], list[Any]]  # this replica's part, no communication
    finish: Callable[[list[Any]], list[Any]]  # the reduction over replicas, then hhat
    zeros: Callable[[], list[Any]]  # what ``local`` returns when no refresh is due


def _estimate(model: Any, optimizer: Sophia, data: Any) -> tuple[list[Any], _Estimate]:
    """The trainable variables and the estimate of their Hessian on ``data``."""
    x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
    rows = _rows(x, optimizer.hessian_batch_fraction)
    x, y, sample_weight = (_first_rows(t, rows) for t in (x, y, sample_weight))
    variables = list(model.trainable_variables)
    values = [v.value for v in variables]
    seed = (model.sophia_seed, optimizer.iterations)
    if optimizer.estimator == "gnb":
        from_logits, ignore_class = _loss_settings(model)
        ignore_index = model.sophia_ignore_index if ignore_class is None else ignore_class

        def logits_fn(values):
            outputs = _stateless(model, values, lambda: model(x, training=True))
            return _single(outputs, "output")

        def local():
            grads, positions = gnb_local(
                logits_fn, values, seed=seed, ignore_index=ignore_index,
                from_logits=from_logits, mask=lambda z: _labels_mask(y, z, ignore_index))
            return [*grads, ops.cast(positions, "int32")]

        def finish(parts):
            grads, positions = _distribute.global_mean(parts[:-1], parts[-1])
            return [sophia_core.gnb_estimate(g, positions, xp=xp) for g in grads]

        def zeros():
            return [*(ops.zeros_like(v) for v in values), ops.zeros((), "int32")]
    else:
        def loss_fn(values):
            return _stateless(model, values, lambda: model.compute_loss(
                x, y, model(x, training=True), sample_weight))

        def local():
            return hutchinson_hessian(loss_fn, values, seed=seed,
                                      n_probes=optimizer.n_probes, probe=optimizer.probe)

        def finish(parts):
            # Keras divides each replica's loss by the replica count: the
            # sum over replicas is the global estimate.
            return _distribute.replica_sum(parts)

        def zeros():
            return [ops.zeros(v.shape, sophia_core.compute_dtype(v.dtype, xp=xp))
                    for v in values]
    return variables, _Estimate(local, finish, zeros)


def refresh_hessian(model: Any, data: Any, *, optimizer: Sophia | None = None) -> Any:
    """Refresh Sophia's ``h`` on batch ``data`` if a refresh is due; returns ``due``.

    What :class:`SophiaTrainStep` calls before each step; usable in a custom
    ``train_step`` too (on JAX inside a ``keras.StatelessScope`` that maps
    the model's and the optimizer's variables to the state's values).
    ``data`` is ``x``, ``(x, y)`` or ``(x, y, sample_weight)``.
    """
    optimizer = optimizer or _sophia(model.optimizer)
    if not model.built:  # a subclassed model before its first call (TensorFlow's fit):
        model(keras.utils.unpack_x_y_sample_weight(data)[0])  # builds its layers
    if not optimizer.built:
        optimizer.build(model.trainable_variables)
    due = optimizer.hessian_refresh_due()
    variables, estimate = _estimate(model, optimizer, data)
    if not traced(due):  # eager: a Python branch
        if bool(due):
            optimizer.update_hessian(estimate.finish(estimate.local()), variables=variables)
        return due
    current = [v.value for v in optimizer.hessian_state()]
    if _distribute.distributed():
        # Communication cannot sit inside a condition: the local part runs
        # under it, the reduction and the (masked) fold run every step.
        hhats = estimate.finish(ops.cond(due, estimate.local, estimate.zeros))
        folded = optimizer.folded_hessian_state(hhats, variables=variables, where=due)
        optimizer.assign_hessian_state([ops.where(due, new, old)
                                        for new, old in zip(folded, current, strict=True)])
    elif keras.backend.backend() == "jax":
        # A JAX branch cannot write variables: fold inside it, write after.
        optimizer.assign_hessian_state(ops.cond(
            due, lambda: optimizer.folded_hessian_state(
                estimate.finish(estimate.local()), variables=variables),
            lambda: current))
    else:
        ops.cond(due, lambda: optimizer.update_hessian(
            estimate.finish(estimate.local()), variables=variables), lambda: None)
    return due


class SophiaTrainStep:
    """Mixin for ``keras.Model`` that refreshes Sophia's Hessian inside ``fit``.

    Put it first among the bases, or use :class:`sophia_tf.Sequential` /
    :class:`sophia_tf.Model` (the mixin on ``keras.Sequential`` /
    ``keras.Model``)::

        class LanguageModel(sophia_tf.SophiaTrainStep, keras.Model):
            ...

    Works on the TensorFlow, JAX and torch Keras backends, with
    ``jit_compile`` on or off, mixed precision (through the
    ``LossScaleOptimizer``), gradient accumulation (one refresh per
    accumulation window) and, on TensorFlow, ``MirroredStrategy``. With an
    optimizer other than :class:`sophia_tf.Sophia` it changes nothing.

    ``sophia_seed`` seeds the estimator's noise; ``sophia_ignore_index`` is
    the label value Sophia-G leaves out (the compiled loss's ``ignore_class``
    takes precedence). Both are saved in the model's config.
    """

    sophia_seed: int = 0
    sophia_ignore_index: int = sophia_core.IGNORE_INDEX

    def train_step(self, *args):
        sophia = _sophia(getattr(self, "optimizer", None))
        if keras.backend.backend() == "jax":  # train_step(state, data), stateless
            state, data = args
            if sophia is not None:
                state = _refreshed_state(self, state, data, sophia)
            return super().train_step(state, data)
        (data,) = args
        if sophia is not None:
            refresh_hessian(self, data, optimizer=sophia)
        return super().train_step(data)

    def get_config(self):
        config = super().get_config()
        config["sophia"] = {"seed": self.sophia_seed, "ignore_index": self.sophia_ignore_index}
        return config

    @classmethod
    def from_config(cls, config, custom_objects=None):
        config = dict(config)
        settings = config.pop("sophia", {})
        model = super().from_config(config, custom_objects=custom_objects)
        model.sophia_seed = settings.get("seed", cls.sophia_seed)
        model.sophia_ignore_index = settings.get("ignore_index", cls.sophia_ignore_index)
        return model


def _refreshed_state(model, state, data, sophia):
    """JAX: the training state after a refresh (variables live in ``state``)."""
    trainable, non_trainable, optimizer_values, metrics = state
    optimizer_variables = model.optimizer.variables
    mapping = [*zip(model.trainable_variables, trainable, strict=True),
               *zip(model.non_trainable_variables, non_trainable, strict=True),
               *zip(optimizer_variables, optimizer_values, strict=True)]
    with keras.StatelessScope(state_mapping=mapping) as scope:
        refresh_hessian(model, data, optimizer=sophia)
    optimizer_values = [scope.get_current_value(v) for v in optimizer_variables]
    return trainable, non_trainable, optimizer_values, metrics


@keras.saving.register_keras_serializable(package="sophia_tf")
class Sequential(SophiaTrainStep, keras.Sequential):
    """``keras.Sequential`` whose ``fit`` refreshes Sophia's Hessian (:class:`SophiaTrainStep`)."""


@keras.saving.register_keras_serializable(package="sophia_tf")
class Model(SophiaTrainStep, keras.Model):
    """``keras.Model`` whose ``fit`` refreshes Sophia's Hessian (:class:`SophiaTrainStep`).

    Subclass it as ``keras.Model``, or call it as ``keras.Model(inputs,
    outputs)`` for a functional model.
    """

    def __new__(cls, *args, **kwargs):
        functional = len(args) == 2 or {"inputs", "outputs"} <= set(kwargs) or (
            len(args) == 1 and "outputs" in kwargs)
        if cls is Model and functional:
            # Keras turns a class used functionally into a Functional subclass
            # (it rewrites the class's bases): that must not happen to Model.
            return FunctionalModel(*args, **kwargs)
        return super().__new__(cls, *args, **kwargs)


@keras.saving.register_keras_serializable(package="sophia_tf")
class FunctionalModel(SophiaTrainStep, keras.Model):
    """What ``sophia_tf.Model(inputs, outputs)`` makes."""
