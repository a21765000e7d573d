"""Cross-framework conformance: every backend, the same inputs, the same trajectory.

``python -m conformance`` runs every backend of the registry
(``sophia_core.backends``) through its public optimizer API on the scenario
table (``conformance.scenarios``), compares each trajectory with the numpy
reference (``conformance.compare``) and prints a table. See
``docs/conformance.md``.

Importing this package imports no framework. :func:`configure_environment`
must run before jax or tensorflow is imported (``python -m conformance`` and
the tests do it): it stops XLA's multiply-add contraction on CPU, which
would otherwise make JAX and TensorFlow differ from the other backends in
the last bit, and turns off oneDNN's reordered kernels in TensorFlow.
"""

from __future__ import annotations

import os
import sys

__all__ = ["FMA_GUARD", "configure_environment", "fma_guarded"]

#: The XLA flag that keeps XLA's CPU code generator from emitting FMA.
FMA_GUARD = "--xla_cpu_max_isa=AVX"


def configure_environment(*, fma_guard: bool = True) -> None:
    """Set the environment the bitwise comparison needs (before jax/tf import).

    Raises RuntimeError if jax or tensorflow was already imported with other
    settings, since the flags are read once, at import.
    """
    if fma_guard:
        flags = os.environ.get("XLA_FLAGS", "")
        if FMA_GUARD not in flags.split():
            late = [m for m in ("jax", "tensorflow") if m in sys.modules]
            if late:
                raise RuntimeError(
                    f"{', '.join(late)} imported before conformance.configure_environment(); "
                    f"set XLA_FLAGS={FMA_GUARD} before importing it"
                )
            os.environ["XLA_FLAGS"] = f"{flags} {FMA_GUARD}".strip()
    os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def fma_guarded() -> bool:
    """Whether XLA runs without multiply-add contraction on CPU in this process."""
    return FMA_GUARD in os.environ.get("XLA_FLAGS", "").split()
