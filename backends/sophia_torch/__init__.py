"""Sophia for PyTorch: ``torch.optim`` optimizers over :mod:`sophia_core`.

- :class:`Sophia`: the project's optimizer (core names, ``betas`` for
  ``(b1, b2)``); ``refresh_hessian(model, inputs)`` in the training loop
  folds a Sophia-G estimate from part of the batch when one is due,
  ``update_hessian(hhats)`` folds given estimates;
- :class:`SophiaG`: drop-in for the authors' ``SophiaG`` (``sophia-opt``):
  their signature, ``step(bs=...)``, ``update_hessian()`` folding
  ``p.grad**2``, their state keys and checkpoints;
- :class:`SophiaH`: :class:`Sophia` with the Hutchinson estimator
  (``refresh_hessian(loss)``);
- :func:`gnb_hessian`, :func:`hutchinson_hessian`: the estimators, with
  torch autodiff and a ``torch.Generator``; :func:`refresh_due`;
- :mod:`sophia_torch.hf`: ``SophiaTrainer``, a ``transformers.Trainer`` that
  runs the refresh inside ``train()`` (imported only on request).

The math is written once in :mod:`sophia_core`; see docs/frameworks/torch.md.
"""

from ._estimators import gnb_hessian, hutchinson_hessian, refresh_due
from ._multi_tensor import CHUNK, COMPILED_CHUNK
from ._optimizer import Sophia, SophiaG, SophiaH

__all__ = [
    "CHUNK",
    "COMPILED_CHUNK",
    "Sophia",
    "SophiaG",
    "SophiaH",
    "gnb_hessian",
    "hutchinson_hessian",
    "refresh_due",
]
