"""The language-model demo end to end, tiny, on each framework of the session.

Runs ``docs/examples/lm_demo/run.py --tiny`` in a subprocess (a fresh
interpreter, as a user would) and checks that both optimizers' losses fall,
the table is printed and the PNG is written.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import subprocess
import sys

import pytest
from backend_support import require_adapter

ROOT = pathlib.Path(__file__).resolve().parents[2]
DEMO = ROOT / "docs" / "examples" / "lm_demo"
ADAPTERS = {"torch": "sophia_torch", "jax": "sophia_jax", "tensorflow": "sophia_tf"}


def _environment() -> dict[str, str]:
    """The test's own import path, so an uninstalled checkout works too."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([*sys.path, env.get("PYTHONPATH", "")])
    env.pop("JAX_ENABLE_X64", None)  # the jax session sets it; the demo runs as users do
    return env


@pytest.mark.parametrize("backend", sorted(ADAPTERS))
def test_tiny_demo_trains_and_plots(backend: str, tmp_path: pathlib.Path) -> None:
    require_adapter(backend)
    pytest.importorskip("matplotlib", reason="the demo's plot needs matplotlib")
    pytest.importorskip("tqdm", reason="the demo's progress bars need tqdm")
    png, record = tmp_path / "curves.png", tmp_path / "runs.json"
    completed = subprocess.run(
        [sys.executable, str(DEMO / "run.py"), "--backend", backend, "--tiny", "--no-progress",
         "--out", str(png), "--json", str(record)],
        capture_output=True, text=True, env=_environment(), timeout=600, check=False,
    )
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    assert "| sophia-g |" in completed.stdout and "| adamw |" in completed.stdout
    # One line says what the result means and points to the study.
    (why,) = [line for line in completed.stdout.splitlines() if line.startswith("why: ")]
    assert "nox -s study" in why and "docs/study.md" in why
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    runs = {run["optimizer"]: run for run in json.loads(record.read_text())["runs"]}
    assert set(runs) == {"sophia-g", "adamw"}
    for name, run in runs.items():
        losses = run["train_loss"]
        assert all(math.isfinite(x) for x in losses), name
        # Uniform guessing over 256 bytes costs ln 256 = 5.55 nats.
        assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.5, (name, losses)
        assert run["validation"][-1][1] < math.log(256) - 1.0, (name, run["validation"])
    sophia = runs["sophia-g"]
    assert sophia["refreshes"] == 3  # 30 steps, k = 10, refresh before steps 1, 11, 21
    assert 0 <= sophia["refresh_s"] < sophia["wall_s"]
    assert sophia["unclipped_share"] and all(0.0 <= f <= 1.0 for _, f in sophia["unclipped_share"])


def _lm_demo():
    sys.path.insert(0, str(DEMO.parent))
    try:
        import lm_demo.common
        import lm_demo.data
    finally:
        sys.path.remove(str(DEMO.parent))
    return lm_demo


def test_default_threads_leave_busy_cores_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    common = _lm_demo().common
    monkeypatch.setattr(common, "visible_cpus", lambda: 4)
    monkeypatch.setattr(os, "getloadavg", lambda: (0.2, 0.0, 0.0))
    assert common.default_threads() == 4
    monkeypatch.setattr(os, "getloadavg", lambda: (2.6, 0.0, 0.0))
    assert common.default_threads() == 1
    monkeypatch.setattr(os, "getloadavg", lambda: (9.0, 0.0, 0.0))
    assert common.default_threads() == 1


def test_explanation_reads_the_recorded_study(tmp_path: pathlib.Path) -> None:
    common = _lm_demo().common
    runs = [common.RunResult("torch", "sophia-g", 1e-4, validation=[(10, 2.6)]),
            common.RunResult("torch", "adamw", 1e-3, validation=[(10, 2.1)])]
    study = tmp_path / "study.json"
    study.write_text(json.dumps({"summary": {
        "best": {"sophia-g": {"unclipped_share_end": 0.25}},
        "steps_to_reach": {"sophia_steps_over_adamw": 2.75},
        "lr_ratio_adamw_over_sophia": 12.0}}))
    line = common.explain(runs, study=study)
    assert line.startswith("why: AdamW ends lower here (AdamW 2.10, Sophia-G 2.60)")
    assert "AdamW's / 12" in line and "0.25" in line and "2.8x AdamW's steps" in line
    assert "0.25 in the study" in line
    runs[0].unclipped_share.append((10, 0.13))  # the run's own share, when it has one
    assert "unclipped share 0.13 at the end of this run" in common.explain(runs, study=study)
    missing = common.explain(runs, study=tmp_path / "absent.json")
    assert "nox -s study" in missing and "docs/study.md" in missing


def test_corpus_is_deterministic_and_split_by_file() -> None:
    sys.path.insert(0, str(DEMO.parent))
    try:
        from lm_demo.data import VALIDATION_EVERY, Batches, load_corpus
    finally:
        sys.path.remove(str(DEMO.parent))
    first, second = load_corpus(), load_corpus()
    assert first.digest == second.digest and len(first.files) >= VALIDATION_EVERY
    assert first.validation.size > 0 and first.train.size > 10 * first.validation.size / 2
    batches = Batches(first, batch_size=4, context=16, seed=3, validation_windows=8)
    x, y = batches.train(7)
    x2, y2 = batches.train(7)
    assert (x == x2).all() and (y == y2).all()
    assert (x[:, 1:] == y[:, :-1]).all() and x.shape == (4, 16)
    assert sum(cx.shape[0] for cx, _ in batches.validation(3)) == 8
