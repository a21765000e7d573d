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
#: A few scenarios that cover the schedule, both refresh phases, h <= 0,
#: m = 0, the declared non-bitwise cases and every dtype; 60 steps each.
QUICK = ("defaults,bias_correction,cosine_schedule,k10_authors_phase,negative_hhat,"
         "zero_momentum,tiny_gradients")


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
def test_trajectories_errors_nonfinite(backend, tmp_path):
    require(backend)
    report = _run(backend, tmp_path, "--steps", "60", "--scenarios", QUICK,
                  "--parts", "trajectories,errors,nonfinite")
    rows = report["trajectories"]
    assert {r["dtype"] for r in rows} >= {"float64", "float32"}
    # Every run declared bitwise is bitwise; the others name their reason.
    assert all(r["bitwise"] for r in rows if r["mode"] == "bitwise")
    assert all(r["reason"] for r in rows if r["mode"] == "tolerance")


@pytest.mark.parametrize("backend", [b for b in certified_backends()
                                     if b not in ("numpy", "array_api_strict")])
def test_estimators_and_portable_state(backend, tmp_path):
    require(backend)
    report = _run(backend, tmp_path, "--parts", "estimators,portable")
    assert {r["to"] for r in report["portable"]} == {"numpy", backend}
