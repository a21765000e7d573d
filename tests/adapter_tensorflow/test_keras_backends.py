"""The backend-neutral test modules, run again on Keras's JAX and torch backends.

Keras picks its backend once per process, so each backend runs in a pytest
subprocess with ``SOPHIA_KERAS_BACKEND`` set (see conftest.py). JAX runs
twice: with x64 (the float64 and bitwise cases; XLA's multiply-add
contraction off, as the conformance suite runs it) and as users run it by
default (float32, int32 counters). The ``tensorflow`` nox session installs
jax and torch for this: there a missing one is a failure, not a skip.
"""

from __future__ import annotations

import importlib.util
import os
import pathlib
import subprocess
import sys

import pytest

from sophia_core.backends import required_backends

HERE = pathlib.Path(__file__).parent
BITWISE = ["test_keras_namespace.py", "test_keras_core_suite.py", "test_keras_optimizer.py",
           "test_keras_estimators.py"]
TRAINING = ["test_keras_fit.py", "test_keras_portable.py", "test_keras_sparse.py",
            "test_keras_docs.py", "test_tf_fresh_noise.py"]
RUNS = {
    "jax-x64": ("jax", {"JAX_ENABLE_X64": "1"}, BITWISE),
    "jax": ("jax", {"JAX_ENABLE_X64": "0"}, TRAINING),
    "torch": ("torch", {}, BITWISE + TRAINING),
}


@pytest.mark.parametrize("run", list(RUNS))
def test_backend_neutral_modules_pass(run, tmp_path):
    backend, env, modules = RUNS[run]
    if importlib.util.find_spec(backend) is None:
        if "tensorflow" in required_backends():
            pytest.fail(f"the tensorflow session installs {backend} for these tests")
        pytest.skip(f"{backend} is not installed")
    env = dict(os.environ, **env, SOPHIA_KERAS_BACKEND=backend,
               XLA_FLAGS="--xla_cpu_max_isa=AVX", PYTHONPATH=os.pathsep.join(sys.path))
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
         *(str(HERE / m) for m in modules)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1500)
    summary = result.stdout.strip().splitlines()[-1] if result.stdout.strip() else ""
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
    assert " passed" in summary and "failed" not in summary and "error" not in summary
