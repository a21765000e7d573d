"""Sophia for PyTorch: ``torch.optim`` optimizers over :mod:`sophia_core`.

- :class:`Sophia`: the project's optimizer (core names, ``betas`` for
  ``(b1, b2)``), ``update_hessian(hhats)`` folds estimates into ``h``;
- :class:`SophiaG`: drop-in for the authors' ``SophiaG`` (``sophia-opt``):
  ``step(bs=...)``, ``update_hessian()`` folding ``p.grad**2``;
- :class:`SophiaH`: :class:`Sophia` with ``update_hessian(loss=...)`` running
  the Hutchinson estimator;
- :func:`gnb_hessian`, :func:`hutchinson_hessian`: the estimators, with
  torch autodiff and a ``torch.Generator``; :func:`refresh_due`.

The math is written once in :mod:`sophia_core`; see docs/frameworks/torch.md.
"""

from ._estimators import gnb_hessian, hutchinson_hessian, refresh_due
from ._optimizer import CHUNK, Sophia, SophiaG, SophiaH

__all__ = [
    "CHUNK",
    "Sophia",
    "SophiaG",
    "SophiaH",
    "gnb_hessian",
    "hutchinson_hessian",
    "refresh_due",
]
