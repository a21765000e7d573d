"""The equal-budget study (``nox -s study``) and its GPU version, as smoke runs.

The analysis functions are checked on made-up curves; the scripts run end to
end in a subprocess on the tiny model (``--quick`` / ``--tiny``), as a user
would run them, and their JSON is checked for what the docs page reports.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import pathlib
import subprocess
import sys

import pytest
from backend_support import require_adapter

ROOT = pathlib.Path(__file__).resolve().parents[2]
BENCHMARKS = ROOT / "docs" / "benchmarks"
PNG = b"\x89PNG\r\n\x1a\n"


def _study():
    """docs/benchmarks/study.py as a module (registered: it defines dataclasses)."""
    name = "_sophia_study"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, BENCHMARKS / "study.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def _environment() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([*sys.path, env.get("PYTHONPATH", "")])
    env.pop("JAX_ENABLE_X64", None)
    return env


def _run(*args: str) -> subprocess.CompletedProcess:
    completed = subprocess.run([sys.executable, *args], capture_output=True, text=True,
                               env=_environment(), timeout=600, check=False, cwd=ROOT)
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    return completed


def test_steps_to_reach_interpolates_between_evaluations() -> None:
    steps_to_reach = _study().steps_to_reach
    curve = [(10, 4.0), (20, 3.0), (30, 2.0)]
    assert steps_to_reach(curve, 2.5) == pytest.approx(25.0)
    assert steps_to_reach(curve, 3.0) == 20.0
    assert steps_to_reach(curve, 5.0) == 10.0  # already below at the first evaluation
    assert steps_to_reach(curve, 1.9) is None


def _run_record(optimizer: str, lr: float, final: float, steps: int = 40) -> dict:
    return {"group": "sweep", "optimizer": optimizer, "lr": lr, "changes": [],
            "validation": [(steps // 2, final + 1.0), (steps, final)], "steps": steps,
            "unclipped_share": [(steps, 0.1)] if optimizer == "sophia-g" else [],
            "refresh_s": 0.0, "wall_s": 1.0, "refreshes": 0}


def test_summary_brackets_and_steps_to_reach() -> None:
    study = _study()
    runs = [_run_record("adamw", lr, loss) for lr, loss in ((1e-3, 3.0), (2e-3, 2.0),
                                                            (4e-3, 2.5))]
    runs += [_run_record("sophia-g", lr, loss) for lr, loss in ((1e-4, 3.5), (2e-4, 3.0))]
    summary = study.summarize(runs)
    assert summary["best"]["adamw"]["lr"] == 2e-3 and summary["best"]["adamw"]["bracketed"]
    # Sophia-G's best is the highest lr tried: not bracketed, and the tables say so.
    assert summary["best"]["sophia-g"]["lr"] == 2e-4
    assert not summary["best"]["sophia-g"]["bracketed"]
    assert "not bracketed" in study.tables(runs, summary)
    reach = summary["steps_to_reach"]
    # AdamW (3.0 at step 20, 2.0 at 40) reaches Sophia-G's final 3.0 at step 20;
    # Sophia-G never reaches AdamW's 2.0.
    assert reach["adamw_to_sophia_best"] == 20.0 and reach["sophia_to_adamw_best"] is None
    assert reach["sophia_steps_over_adamw"] == pytest.approx(40 / 20)
    assert summary["lr_ratio_adamw_over_sophia"] == pytest.approx(10.0)


def test_quick_study_end_to_end(tmp_path: pathlib.Path) -> None:
    require_adapter("torch")
    pytest.importorskip("matplotlib")
    pytest.importorskip("tqdm")
    done = _run(str(BENCHMARKS / "study.py"), "--quick", "--no-progress", "--jobs", "2",
                "--out", str(tmp_path))
    assert "### Learning-rate sweeps (equal budgets)" in done.stdout
    assert "headline:" in done.stdout and "load average" in done.stdout
    assert (tmp_path / "study.png").read_bytes()[:8] == PNG
    report = json.loads((tmp_path / "study.json").read_text())
    sweep = [r for r in report["runs"] if r["group"] == "sweep"]
    counts = {name: sum(r["optimizer"] == name for r in sweep) for name in ("adamw", "sophia-g")}
    assert counts["adamw"] == counts["sophia-g"] >= 3  # equal budgets
    # The second Sophia-G sweep, at a high gamma, starts at Sophia-G's best lr.
    high = [r for r in report["runs"] if r["group"] == "sweep high gamma"]
    assert len(high) >= 3 and all(r["sophia_gamma"] > 1 for r in high)
    assert min(r["lr"] for r in high) == report["summary"]["best"]["sophia-g"]["lr"]
    best = report["summary"]["best"]
    arms = [r for r in report["runs"] if not r["group"].startswith("sweep")]
    assert arms and all(r["lr"] == best["sophia-g"]["lr"] for r in arms)
    assert any(dict(map(tuple, r["changes"])).get("sophia_gamma") == 1e-12 for r in arms)
    for r in report["runs"]:
        assert all(math.isfinite(v) for _, v in r["validation"]), r["label"]
        if r["optimizer"] == "sophia-g":
            assert r["unclipped_share"] and all(0 <= s <= 1 for _, s in r["unclipped_share"])
            assert r["refresh_share_curve"] and all(0 <= s < 1
                                                    for _, s in r["refresh_share_curve"])
    assert set(report["summary"]["steps_to_reach"]) >= {"adamw_to_sophia_best",
                                                        "sophia_to_adamw_best"}

    # --reuse takes identical runs from the earlier results instead of training again.
    again = tmp_path / "again"
    _run(str(BENCHMARKS / "study.py"), "--quick", "--no-progress", "--no-arms", "--jobs", "1",
         "--out", str(again), "--reuse", str(tmp_path / "study.json"))
    rerun = json.loads((again / "study.json").read_text())
    assert all(r["reused"] for r in rerun["runs"])
    curves = lambda runs: {(r["optimizer"], r["lr"]): r["validation"] for r in runs}  # noqa: E731
    assert curves(rerun["runs"]) == curves(sweep)


@pytest.mark.parametrize("framework", ["torch", "jax"])
def test_gpu_study_dry_run_on_cpu(framework: str, tmp_path: pathlib.Path) -> None:
    require_adapter(framework)
    pytest.importorskip("matplotlib")
    pytest.importorskip("tqdm")
    done = _run(str(BENCHMARKS / "study_gpu.py"), "--tiny", "--frameworks", framework,
                "--max-mb", "1", "--out", str(tmp_path))
    assert "| framework | optimizer | lr |" in done.stdout
    report = json.loads((tmp_path / "study_gpu.json").read_text())
    assert report["runs"] and {r["framework"] for r in report["runs"]} == {framework}
    assert {r["optimizer"] for r in report["runs"]} == {"adamw", "sophia-g"}
    assert not report["skipped"]
    if framework == "torch":
        assert (tmp_path / "study_gpu.png").read_bytes()[:8] == PNG
