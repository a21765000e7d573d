"""The conformance suite on the Keras optimizer, on each Keras backend.

``python -m conformance --backends tensorflow`` drives ``sophia_tf`` on the
Keras backend of its process, so it runs once per backend in a subprocess
(``KERAS_BACKEND``; XLA's multiply-add contraction off, as the conformance
session runs it; JAX with x64 for the float64 rows). Short runs (60 steps)
of the scenarios that cover a schedule, the authors' refresh phase, bias
correction, subnormals, non-finite estimates, h's bias correction and the
gamma target; the full 1,000-step report is the nox ``conformance`` session.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest

from sophia_core.backends import required_backends

SCENARIOS = ("cosine_schedule,k10_authors_phase,bias_correction,tiny_gradients,nonfinite_hhat,"
             "hessian_bias_correction,target_share_all_options")
PARTS = "trajectories,errors,estimators,nonfinite"


@pytest.mark.parametrize("backend", ["tensorflow", "jax", "torch"])
def test_keras_optimizer_conforms(backend, tmp_path):
    if importlib.util.find_spec(backend) is None:
        if "tensorflow" in required_backends():
            pytest.fail(f"the tensorflow session installs {backend} for this test")
        pytest.skip(f"{backend} is not installed")
    out = tmp_path / "report.json"
    env = dict(os.environ, KERAS_BACKEND=backend, JAX_ENABLE_X64="1",
               XLA_FLAGS="--xla_cpu_max_isa=AVX", PYTHONPATH=os.pathsep.join(sys.path))
    proc = subprocess.run(
        [sys.executable, "-m", "conformance", "--backends", "tensorflow", "--steps", "60",
         "--scenarios", SCENARIOS, "--parts", PARTS, "--json", str(out)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert out.exists(), f"no report:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    report = json.loads(out.read_text())
    failures = [f"{part}: {row}" for part, rows in report.items() if isinstance(rows, list)
                for row in rows if isinstance(row, dict) and not row.get("passed", True)]
    assert proc.returncode == 0 and not failures, "\n".join(failures) or proc.stdout[-3000:]
    rows = report["trajectories"]
    assert {r["dtype"] for r in rows} >= {"float64", "float32", "bfloat16"}
    assert all(r["bitwise"] for r in rows if r["mode"] == "bitwise")
    assert all(r["reason"] for r in rows if r["mode"] == "tolerance")
    assert {r["check"] for r in report["estimators"]} >= {"GNB hhat", "Hutchinson hhat"}
