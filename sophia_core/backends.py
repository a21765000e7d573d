"""The one list of backends: tests, conformance and nox all read it.

This module imports nothing beyond the standard library, so ``noxfile.py``
can load it by path before anything is installed.

A *namespace* backend is an array library whose array-API namespace the core
runs on. An *adapter* backend is a framework with a package in ``backends/``.
A framework can be both (torch, jax); TensorFlow is an adapter only (it has
no array-API namespace; ``sophia_tf`` runs the core on ``keras.ops``).
"""

from __future__ import annotations

import dataclasses
import os

__all__ = ["Backend", "BACKENDS", "REQUIRED_ENV", "by_name", "required_backends"]

#: Environment variable naming the backends a test run must have. A backend
#: named here that fails to import is a test failure, not a skip. nox sets it.
REQUIRED_ENV = "SOPHIA_REQUIRED_BACKENDS"


@dataclasses.dataclass(frozen=True)
class Backend:
    """One backend: how to import it and how nox installs it."""

    name: str
    #: Module whose import proves the framework is present.
    module: str
    #: pip requirements that install the framework (torch is pinned: see README).
    requirements: tuple[str, ...]
    #: Module name of the array-API namespace the core tests run on, or None.
    namespace: str | None = None
    #: Our adapter package in ``backends/``, or None.
    adapter: str | None = None
    #: Extra of the ``sophia-xp`` distribution that installs it, or None.
    extra: str | None = None
    #: Extra pip requirements of this backend's tests (same pip command as
    #: the framework, so torch-dependent packages resolve to the pinned torch).
    test_requirements: tuple[str, ...] = ()
    #: Environment a nox session of this backend sets.
    env: tuple[tuple[str, str], ...] = ()


BACKENDS: tuple[Backend, ...] = (
    Backend(
        name="numpy",
        module="numpy",
        requirements=("numpy",),
        namespace="numpy",
    ),
    Backend(
        name="array_api_strict",
        module="array_api_strict",
        requirements=("array-api-strict",),
        namespace="array_api_strict",
    ),
    Backend(
        name="torch",
        module="torch",
        # 2.13.0 is the tested version and the CPU build on the project's
        # machines; an open range would fetch a multi-GB CUDA build.
        requirements=("torch==2.13.0",),
        namespace="torch",
        adapter="sophia_torch",
        extra="torch",
        # transformers + accelerate: the Trainer integration (sophia_torch.hf);
        # safetensors: the tests that save a trained model.
        test_requirements=("sophia-opt==0.2.2", "pytorch-optimizer", "transformers",
                           "accelerate>=1.1", "safetensors"),
    ),
    Backend(
        name="jax",
        module="jax",
        requirements=("jax", "optax"),
        namespace="jax.numpy",
        adapter="sophia_jax",
        extra="jax",
        test_requirements=("flax",),
        # No FMA contraction by XLA on CPU: jitted code is then bitwise
        # comparable with numpy (docs/conformance.md).
        env=(("JAX_ENABLE_X64", "1"), ("XLA_FLAGS", "--xla_cpu_max_isa=AVX")),
    ),
    Backend(
        name="tensorflow",
        module="tensorflow",
        requirements=("tensorflow-cpu", "keras>=3"),
        adapter="sophia_tf",
        extra="tensorflow",
        # sophia_tf runs on Keras's JAX and torch backends too: the session
        # installs both, and tests/adapter_tensorflow runs its backend-neutral
        # tests and the conformance suite on each (in subprocesses).
        test_requirements=("jax", "torch==2.13.0"),
    ),
)


def by_name(name: str) -> Backend:
    """Return the backend called ``name``."""
    for backend in BACKENDS:
        if backend.name == name:
            return backend
    known = ", ".join(b.name for b in BACKENDS)
    raise KeyError(f"unknown backend {name!r}; known: {known}")


def required_backends() -> frozenset[str]:
    """Names listed in ``$SOPHIA_REQUIRED_BACKENDS`` (comma-separated)."""
    raw = os.environ.get(REQUIRED_ENV, "")
    names = frozenset(n.strip() for n in raw.split(",") if n.strip())
    for name in names:
        by_name(name)  # a typo is an error, not a silently empty set
    return names
