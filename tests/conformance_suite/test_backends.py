"""The conformance suite per backend (a short version of ``python -m conformance``).

One subprocess per backend of the registry that has a driver: XLA reads
``XLA_FLAGS`` once, at import, so the suite must start its own interpreter
(this pytest process may already hold jax without the flag). The full
1,000-step report is the nox ``conformance`` session.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest
from backend_support import require

from conformance.run import certified_backends

ROOT = pathlib.Path(__file__).resolve().parents[2]
#: Scenarios that cover a schedule, the authors' refresh phase (h = 0, sign
#: steps), bias correction and subnormals (the declared non-bitwise cases),
#: the non-finite policy, h's bias correction and the gamma target, in every
#: dtype the backend has; 60 steps each.
QUICK = ("cosine_schedule,k10_authors_phase,bias_correction,tiny_gradients,nonfinite_hhat,"
         "hessian_bias_correction,target_share_all_options")


def _run(backend: str, tmp_path: pathlib.Path, *args: str) -> dict:
    out = tmp_path / "report.json"
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(ROOT), str(ROOT / "backends"), *filter(None, [env.get("PYTHONPATH")])])
    proc = subprocess.run(
        [sys.executable, "-m", "conformance", "--backends", backend, "--json", str(out), *args],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )
    assert out.exists(), f"no report:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    report = json.loads(out.read_text())
    failures = [
        f"{part}: {row}" for part, rows in report.items() if isinstance(rows, list)
        for row in rows if isinstance(row, dict) and not row.get("passed", True)
    ]
    assert proc.returncode == 0 and not failures, "\n".join(failures) or proc.stdout[-3000:]
    return report


@pytest.mark.parametrize("backend", certified_backends())
def test_backend_conforms(backend, tmp_path):
    """Trajectories, error cases, estimators, portable state and non-finite checks."""
    require(backend)
    report = _run(backend, tmp_path, "--steps", "60", "--scenarios", QUICK)
    rows = report["trajectories"]
    assert "float32" in {r["dtype"] for r in rows}
    # Every run declared bitwise is bitwise; the others name their reason.
    assert all(r["bitwise"] for r in rows if r["mode"] == "bitwise")
    assert all(r["reason"] for r in rows if r["mode"] == "tolerance")
    assert {r["case"] for r in report["errors"]} >= {"integer parameters", "eps=0.0",
                                                      "lr='1e-3'", "eps=None"}
    # The counters every optimizer keeps are compared, not just the arrays.
    assert not any("does not report" in p for r in rows for p in r["problems"])
    if backend not in ("numpy", "array_api_strict"):
        assert {r["to"] for r in report["portable"]} == {"numpy", backend}
        assert {r["check"] for r in report["estimators"] if r["backend"] == backend} >= {
            "GNB hhat", "Hutchinson hhat"}
