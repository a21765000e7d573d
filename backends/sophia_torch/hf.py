"""Sophia-G inside Hugging Face ``transformers.Trainer``.

:class:`SophiaTrainer` is a ``transformers.Trainer`` that (1) creates a
:class:`sophia_torch.Sophia` unless given an optimizer, with the Trainer's
own parameter groups (no weight decay for biases and norms) and learning
rate, and (2) runs Sophia-G's Hessian refresh inside ``Trainer.train()``:
before a training step's forward, when a refresh is due,
:meth:`sophia_torch.Sophia.refresh_hessian` estimates on a fraction of that
micro-batch's sequences, with its ``labels`` masking ignored positions. With
gradient accumulation it refreshes once per optimizer step (on the first
micro-batch). Any ``Sophia``-family optimizer passed through
``optimizers=(opt, scheduler)`` or ``optimizer_cls_and_kwargs`` is refreshed
the same way. Requires ``transformers`` (not imported by ``sophia_torch``).
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import Trainer

from ._optimizer import Sophia, SophiaH

__all__ = ["SophiaTrainer"]


def sophia_of(optimizer: Any) -> Sophia | None:
    """The Sophia optimizer inside ``optimizer`` (Accelerate wraps it), if any."""
    seen = 0
    while optimizer is not None and not isinstance(optimizer, Sophia) and seen < 8:
        optimizer = getattr(optimizer, "optimizer", None)
        seen += 1
    return optimizer if isinstance(optimizer, Sophia) else None


class SophiaTrainer(Trainer):
    """``transformers.Trainer`` with Sophia-G's refresh in its training step.

    Args:
        sophia_kwargs: keyword arguments of the :class:`sophia_torch.Sophia`
            it creates when no optimizer is given (``lr`` defaults to
            ``args.learning_rate``; ``weight_decay`` per group comes from
            ``args.weight_decay`` as for every Trainer optimizer).
        shift_labels: the model shifts ``labels`` inside (causal language
            models: logits at t predict ``labels[t+1]``); False when labels
            are aligned with the logits (masked LMs, token classification).
        labels_key: the input that holds the labels.
        *args, **kwargs: those of ``transformers.Trainer``.

    Example::

        trainer = SophiaTrainer(model=model, args=training_args, train_dataset=data,
                                sophia_kwargs=dict(gamma=0.04, hessian_interval=10))
        trainer.train()
    """

    def __init__(self, *args: Any, sophia_kwargs: dict[str, Any] | None = None,
                 shift_labels: bool = True, labels_key: str = "labels", **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.sophia_kwargs = dict(sophia_kwargs or {})
        self.shift_labels = shift_labels
        self.labels_key = labels_key

    def create_optimizer(self, *args: Any, **kwargs: Any) -> torch.optim.Optimizer:
        if self.optimizer is None and self.optimizer_cls_and_kwargs is None:
            self.optimizer_cls_and_kwargs = (
                Sophia, {"lr": self.args.learning_rate, **self.sophia_kwargs})
        return super().create_optimizer(*args, **kwargs)

    def training_step(self, model: torch.nn.Module, inputs: dict[str, Any],
                      num_items_in_batch: Any = None) -> torch.Tensor:
        sophia = sophia_of(self.optimizer)
        if sophia is not None and not isinstance(sophia, SophiaH) \
                and sophia.hessian_refresh_due():
            prepared = self._prepare_inputs(inputs)
            targets = prepared.get(self.labels_key)
            model_inputs = {k: v for k, v in prepared.items() if k != self.labels_key}
            model.train()
            with self.compute_loss_context_manager():
                sophia.refresh_hessian(model, targets=targets, shift_targets=self.shift_labels,
                                       **model_inputs)
        return super().training_step(model, inputs, num_items_in_batch)
