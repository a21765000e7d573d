"""Sophia's Hessian refresh inside ``model.fit``, on TensorFlow, JAX and torch.

Before Keras's own step, if a refresh is due, the Hessian is estimated on the
first ``hessian_batch_fraction`` of the batch's rows, in a ``keras.StatelessScope``
(no layer state changes), with noise seeded by ``(model.sophia_seed,
optimizer.iterations)``, and folded into ``h``.
"""

from __future__ import annotations

from typing import Any

import keras
from keras import ops

import sophia_core

from ._autodiff import traced
from ._estimators import global_mean, gnb_local, hutchinson_hessian, replica_sum, replicas
from ._namespace import keras_namespace as xp
from ._optimizer import Sophia

__all__ = ["Model", "Sequential", "SophiaTrainStep", "refresh_hessian"]


def _sophia(optimizer: Any) -> Sophia | None:
    """The Sophia optimizer, also inside a ``LossScaleOptimizer``; else None."""
    optimizer = getattr(optimizer, "inner_optimizer", optimizer)
    return optimizer if isinstance(optimizer, Sophia) else None


def _single(structure: Any, what: str) -> Any:
    """The one array in ``structure``."""
    leaves = keras.tree.flatten(structure)
    if len(leaves) != 1:
        raise ValueError(f"Sophia-G's refresh in fit needs a model with one {what}, got "
                         f"{len(leaves)}: refresh it in a custom train step instead")
    return leaves[0]


def _loss_settings(model: Any) -> tuple[bool, int | None]:
    """``(from_logits, ignore_class)`` of the compiled loss, for Sophia-G: no loss or a
    custom one means logits; a Keras loss other than a categorical cross-entropy
    is an error, and so is ``from_logits=True`` on a model ending in a softmax."""
    if model.loss is None:  # not compiled: a custom loop's own loss
        return True, None
    loss = _single(model.loss, "loss")
    loss = keras.losses.get(loss) if isinstance(loss, str) else loss
    if isinstance(loss, (keras.losses.SparseCategoricalCrossentropy,
                         keras.losses.CategoricalCrossentropy)):
        from_logits, ignore_class = loss.get_config()["from_logits"], loss.get_config().get(
            "ignore_class")
    elif loss in (keras.losses.sparse_categorical_crossentropy,
                  keras.losses.categorical_crossentropy):
        from_logits, ignore_class = False, None
    elif getattr(loss, "__module__", "").startswith("keras."):
        raise ValueError(f"SophiaG estimates the Hessian of a categorical cross-entropy; the "
                         f"model is compiled with {loss}: use SophiaH")
    else:
        return True, None
    last = model.layers[-1] if model.layers else None
    if from_logits and (isinstance(last, keras.layers.Softmax)
                        or getattr(last, "activation", None) is keras.activations.softmax):
        raise ValueError("the loss has from_logits=True but the model ends in a softmax, so "
                         "its outputs are probabilities: drop the softmax or set "
                         "from_logits=False")
    return from_logits, ignore_class


def _labels_mask(y: Any, logits: Any, ignore_index: int) -> Any:
    """Which positions count: integer labels shaped like ``logits[..., 0]``, else all."""
    y = None if y is None else ops.convert_to_tensor(_single(y, "target"))
    if y is None or "int" not in keras.backend.standardize_dtype(y.dtype) or \
            len(y.shape) != len(logits.shape) - 1:
        return None
    return ops.not_equal(y, ops.cast(ignore_index, y.dtype))


def _first_rows(data: Any, fraction: float) -> Any:
    """The first :func:`sophia_core.estimate_rows` rows of every array in ``data``
    (a tensor count for a batch size known only at run time)."""
    batch = ops.shape(keras.tree.flatten(data)[0])[0]
    rows = sophia_core.estimate_rows(batch, fraction, xp=None if isinstance(batch, int) else xp)
    return keras.tree.map_structure(lambda t: None if t is None else t[:rows], data)


def _stateless(model: Any, values: list[Any], compute: Any) -> Any:
    """``compute()`` with the trainable variables at ``values``; no state change kept."""
    mapping = [*zip(model.trainable_variables, values, strict=True),
               *((v, v.value) for v in model.non_trainable_variables)]
    with keras.StatelessScope(state_mapping=mapping, collect_losses=True):
        return compute()


def _estimate(model: Any, optimizer: Sophia, data: Any):
    """``(values, local, finish)``: ``local()`` is this replica's part of the estimate,
    ``finish(parts)`` reduces it over replicas and returns one hhat per value."""
    x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(
        _first_rows(data, optimizer.hessian_batch_fraction))
    values = [v.value for v in model.trainable_variables]
    seed = (getattr(model, "sophia_seed", SophiaTrainStep.sophia_seed), optimizer.iterations)
    if optimizer.estimator == "hutchinson":
        def loss_fn(values):
            return _stateless(model, values, lambda: model.compute_loss(
                x, y, model(x, training=True), sample_weight))

        # Keras divides each replica's loss by the replica count: the sum of
        # the replicas' estimates is the global one.
        return values, lambda: hutchinson_hessian(
            loss_fn, values, seed=seed, n_probes=optimizer.n_probes,
            probe=optimizer.probe), replica_sum
    from_logits, ignore_class = _loss_settings(model)
    ignore_index = getattr(model, "sophia_ignore_index", sophia_core.IGNORE_INDEX) \
        if ignore_class is None else ignore_class

    def local():
        grads, positions = gnb_local(
            lambda v: _single(_stateless(model, v, lambda: model(x, training=True)), "output"),
            values, seed=seed, ignore_index=ignore_index, from_logits=from_logits,
            mask=lambda z: _labels_mask(y, z, ignore_index))
        return [*grads, ops.cast(positions, "int32")]

    def finish(parts):
        grads, positions = global_mean(parts[:-1], parts[-1])
        return [sophia_core.gnb_estimate(g, positions, xp=xp) for g in grads]

    return values, local, finish


def refresh_hessian(model: Any, data: Any, *, optimizer: Sophia | None = None) -> Any:
    """Refresh Sophia's ``h`` on ``data`` (``x``, ``(x, y)`` or ``(x, y, w)``) if due.

    What :class:`SophiaTrainStep` calls before each step; call it in a custom
    ``train_step`` too (on JAX inside a ``keras.StatelessScope`` mapping the
    model's and the optimizer's variables to the state's values). Returns ``due``.
    """
    optimizer = optimizer or _sophia(model.optimizer)
    if not model.built:  # a subclassed model before its first call (TensorFlow's fit)
        model(keras.utils.unpack_x_y_sample_weight(data)[0])
    if not optimizer.built:
        optimizer.build(model.trainable_variables)
    due, variables = optimizer.hessian_refresh_due(), model.trainable_variables
    values, local, finish = _estimate(model, optimizer, data)
    current = [v.value for v in optimizer.hessian_state()]
    if not traced(due):  # eager: a Python branch
        if bool(due):
            optimizer.update_hessian(finish(local()), variables=variables)
    elif replicas() is not None:  # TensorFlow MirroredStrategy
        # Communication cannot sit inside a condition: the local part runs
        # under it; the reduction and the fold, masked, run every step.
        zeros = [*(ops.zeros_like(v) for v in values), ops.zeros((), "int32")] \
            if optimizer.estimator == "gnb" else \
            [ops.zeros_like(v, sophia_core.compute_dtype(v.dtype, xp=xp)) for v in values]
        folded = optimizer.folded_hessian_state(finish(ops.cond(due, local, lambda: zeros)),
                                                variables=variables, where=due)
        optimizer.assign_hessian_state([ops.where(due, new, old)
                                        for new, old in zip(folded, current, strict=True)])
    elif keras.backend.backend() == "jax":  # a JAX branch cannot write: fold in it, write after
        optimizer.assign_hessian_state(ops.cond(due, lambda: optimizer.folded_hessian_state(
            finish(local()), variables=variables), lambda: current))
    else:
        ops.cond(due, lambda: optimizer.update_hessian(finish(local()), variables=variables),
                 lambda: None)
    return due


class SophiaTrainStep:
    """Mixin for ``keras.Model``: ``fit`` refreshes Sophia's Hessian on schedule.

    First among the bases: ``class LM(sophia_tf.SophiaTrainStep, keras.Model)``.
    With another optimizer it changes nothing. ``sophia_seed`` seeds the
    estimator's noise; ``sophia_ignore_index`` is the label Sophia-G leaves
    out (the loss's ``ignore_class`` comes first); both are saved in the config.
    """

    sophia_seed: int = 0
    sophia_ignore_index: int = sophia_core.IGNORE_INDEX

    def train_step(self, *args):
        sophia = _sophia(getattr(self, "optimizer", None))
        if keras.backend.backend() != "jax":
            if sophia is not None:
                refresh_hessian(self, args[0], optimizer=sophia)
            return super().train_step(*args)
        (trainable, non_trainable, optimizer_values, metrics), data = args  # stateless
        if sophia is not None:
            optimizer_variables = self.optimizer.variables
            mapping = [*zip(self.trainable_variables, trainable, strict=True),
                       *zip(self.non_trainable_variables, non_trainable, strict=True),
                       *zip(optimizer_variables, optimizer_values, strict=True)]
            with keras.StatelessScope(state_mapping=mapping) as scope:
                refresh_hessian(self, data, optimizer=sophia)
            optimizer_values = [scope.get_current_value(v) for v in optimizer_variables]
        return super().train_step((trainable, non_trainable, optimizer_values, metrics), data)

    def get_config(self):
        return {**super().get_config(),
                "sophia": {"seed": self.sophia_seed, "ignore_index": self.sophia_ignore_index}}

    @classmethod
    def from_config(cls, config, custom_objects=None):
        config = dict(config)
        settings = config.pop("sophia", {})
        model = super().from_config(config, custom_objects=custom_objects)
        model.sophia_seed = settings.get("seed", cls.sophia_seed)
        model.sophia_ignore_index = settings.get("ignore_index", cls.sophia_ignore_index)
        return model


@keras.saving.register_keras_serializable(package="sophia_tf")
class Sequential(SophiaTrainStep, keras.Sequential):
    """``keras.Sequential`` whose ``fit`` refreshes Sophia's Hessian (:class:`SophiaTrainStep`)."""


@keras.saving.register_keras_serializable(package="sophia_tf")
class Model(SophiaTrainStep, keras.Model):
    """``keras.Model`` whose ``fit`` refreshes Sophia's Hessian (:class:`SophiaTrainStep`).

    Subclass it as ``keras.Model``, or call it as ``Model(inputs, outputs)``.
    """

    def __new__(cls, *args, **kwargs):
        functional = len(args) == 2 or "outputs" in kwargs
        if cls is Model and functional:
            # Keras makes a class called functionally a Functional subclass
            # (it rewrites the class's bases): that must not happen to Model.
            return FunctionalModel(*args, **kwargs)
        return super().__new__(cls, *args, **kwargs)


@keras.saving.register_keras_serializable(package="sophia_tf")
class FunctionalModel(SophiaTrainStep, keras.Model):
    """What ``sophia_tf.Model(inputs, outputs)`` makes."""
