"""Test sessions. ``nox`` runs the default list; ``nox -l`` lists them all.

The backends come from ``sophia_core/backends.py`` (loaded by path, since
nothing is installed yet): one session per framework, each installing its
framework and requiring it, so a missing framework fails instead of skipping.
"""

from __future__ import annotations

import importlib.util
import pathlib
import sys

import nox

ROOT = pathlib.Path(__file__).parent
_spec = importlib.util.spec_from_file_location(
    "_sophia_backends", ROOT / "sophia_core" / "backends.py"
)
registry = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = registry  # dataclasses look the module up
_spec.loader.exec_module(registry)

# pip, not uv: uv ignores the local torch build and fetches a CUDA one.
nox.options.default_venv_backend = "virtualenv"
nox.options.error_on_missing_interpreters = True

TEST_REQUIREMENTS = ("pytest", "hypothesis", "array-api-strict>=2.1")
#: What the language-model demo needs beyond a framework extra.
DEMO_REQUIREMENTS = ("tqdm", "matplotlib")
DEMO = "docs/examples/lm_demo/run.py"
CORE_NAMESPACES = ("numpy", "array_api_strict")
FRAMEWORKS = tuple(b for b in registry.BACKENDS if b.adapter is not None)

nox.options.sessions = ["lint", "core", *(b.name for b in FRAMEWORKS), "conformance", "docs"]


def _required(*names: str) -> dict[str, str]:
    return {registry.REQUIRED_ENV: ",".join(names)}


@nox.session
def lint(session: nox.Session) -> None:
    """ruff over the whole tree."""
    session.install("ruff")
    session.run("ruff", "check", ".")


@nox.session
def core(session: nox.Session) -> None:
    """The core's tests with no deep-learning framework installed at all."""
    session.install(".", *TEST_REQUIREMENTS)
    session.run("pytest", "tests/core", *session.posargs, env=_required(*CORE_NAMESPACES))


def _framework_session(backend) -> None:
    def run(session: nox.Session) -> None:
        # One pip command, so torch-dependent test packages see the pin.
        session.install(
            f".[{backend.extra}]", *backend.requirements, *TEST_REQUIREMENTS,
            *backend.test_requirements, *DEMO_REQUIREMENTS,
        )
        # tests/adapter_<name>, not tests/<name>: pytest puts tests/ on sys.path,
        # where a folder named like a framework would shadow it when absent.
        paths = [
            p for p in ("tests/core", f"tests/adapter_{backend.name}", "tests/demo")
            if (ROOT / p).is_dir()
        ]
        env = {**_required(*CORE_NAMESPACES, backend.name), **dict(backend.env)}
        session.run("pytest", *paths, *session.posargs, env=env)

    run.__doc__ = (
        f"Core tests on the {backend.name} namespace, the {backend.adapter} adapter "
        "and the tiny language-model demo."
    )
    nox.session(name=backend.name)(run)


for _backend in FRAMEWORKS:
    _framework_session(_backend)


def _option(args: list[str], flag: str, default: str) -> str:
    """The value of ``--flag VALUE`` or ``--flag=VALUE`` in ``args``."""
    for i, arg in enumerate(args):
        if arg == flag and i + 1 < len(args):
            return args[i + 1]
        if arg.startswith(flag + "="):
            return arg.split("=", 1)[1]
    return default


@nox.session
def conformance(session: nox.Session) -> None:
    """Every backend on the same inputs: ``python -m conformance`` (CPU) and its tests.

    One pip command installs every framework (torch pinned by the registry)
    and the test requirements. ``XLA_FLAGS`` keeps XLA from contracting
    multiply-adds on CPU (set before jax/tensorflow start, in every process).
    Extra arguments go to ``python -m conformance`` (e.g. ``--backends torch``).
    """
    session.install(
        ".[all]",
        *(r for b in FRAMEWORKS for r in b.requirements),
        *TEST_REQUIREMENTS,
        *(r for b in FRAMEWORKS for r in b.test_requirements),
    )
    names = [b.name for b in registry.BACKENDS]
    env = {**_required(*names), "XLA_FLAGS": "--xla_cpu_max_isa=AVX"}
    session.run("pytest", "tests/conformance_suite", env=env)
    session.run("python", "-m", "conformance", *session.posargs, env=env)


@nox.session
def demo(session: nox.Session) -> None:
    """The main job: a byte-level GPT trained with Sophia-G and with AdamW.

    ``nox -s demo`` trains on PyTorch; ``nox -s demo -- --backend jax`` (or
    ``tensorflow``) on another framework; all arguments go to the demo
    (``-- --help`` lists them). Installs only the chosen framework.
    """
    backend = registry.by_name(_option(session.posargs, "--backend", "torch"))
    if backend.extra is None:
        session.error(f"--backend must be one of torch, jax, tensorflow, got {backend.name!r}")
    session.install(f".[{backend.extra}]", *DEMO_REQUIREMENTS)
    session.run("python", DEMO, *session.posargs)


@nox.session
def study(session: nox.Session) -> None:
    """The equal-budget study: Sophia-G against AdamW on the demo's model (~20 min).

    Learning-rate sweeps of equal size that bracket each optimum, steps to
    reach the other's best loss, the unclipped share and refresh share over
    time, option arms; a PNG and a JSON in ``study_results/`` (``--out`` to
    change). Not part of CI. ``-- --quick`` for a smoke run; ``-- --help``.
    """
    backend = registry.by_name(_option(session.posargs, "--backend", "torch"))
    if backend.extra is None:
        session.error(f"--backend must be one of torch, jax, tensorflow, got {backend.name!r}")
    session.install(f".[{backend.extra}]", *DEMO_REQUIREMENTS)
    session.run("python", "docs/benchmarks/study.py", *session.posargs)


@nox.session
def digits(session: nox.Session) -> None:
    """A small numpy-only example: softmax regression on scikit-learn's digits."""
    session.install(".", "scikit-learn")
    session.run("python", "docs/examples/digits_numpy.py", *session.posargs)


@nox.session
def bench(session: nox.Session) -> None:
    """Speed ratios of every adapter, Hessian-refresh overhead and convergence (~15 min).

    Not part of CI: numbers depend on the machine. ``-- --quick`` for a smoke run.
    """
    session.install(
        ".[all]", *DEMO_REQUIREMENTS, "sophia-opt==0.2.2", "pytorch-optimizer", "flax",
    )
    session.run("python", "docs/benchmarks/run_all.py", *session.posargs)


@nox.session
def docs(session: nox.Session) -> None:
    """Build the documentation site with mkdocs-material; warnings are errors."""
    # ruff: mkdocstrings formats signatures with it.
    session.install("mkdocs", "mkdocs-material", "mkdocstrings[python]", "ruff")
    session.run("mkdocs", "build", "--strict", *session.posargs,
                env={"NO_MKDOCS_2_WARNING": "1"})
