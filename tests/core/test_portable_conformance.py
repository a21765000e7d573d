"""The conformance package around portable state: where it lives, what its portable part catches.

numpy only (the ``core`` session has no framework): the portable part is run
on the numpy driver with a deliberately broken importer, and must fail or
refuse where a real backend with that bug would.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import os
import pathlib
import subprocess
import sys
import tomllib

import pytest

from conformance import portable as portable_part
from conformance.drivers import _numpy
from sophia_core import portable

ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_conformance_is_not_installed_as_a_top_level_module():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    include = config["tool"]["setuptools"]["packages"]["find"]["include"]
    for module in ("conformance", "conformance.drivers"):
        assert not any(fnmatch.fnmatchcase(module, pattern) for pattern in include), include
    assert "." in config["tool"]["pytest"]["ini_options"]["pythonpath"]


def test_python_m_conformance_runs_from_the_repository_root():
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-m", "conformance", "--list"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "certified backends:" in proc.stdout and "cosine_schedule" in proc.stdout


def _change_scenario(monkeypatch, **changes):
    original = portable_part.by_name
    monkeypatch.setattr(portable_part, "by_name",
                        lambda name: dataclasses.replace(original(name), **changes))


def _results(rows: list[dict]) -> dict[tuple[str, str], tuple[bool, str]]:
    return {(r["dtype"], r["file order"]): (r["passed"], r["detail"]) for r in rows}


def test_the_portable_part_passes_by_name_and_in_reverse_order():
    results = _results(portable_part.run_part([]))
    assert set(results) == {("float32", "same"), ("float32", "reversed"), ("bfloat16", "same")}
    assert all(passed for passed, _ in results.values()), results
    assert results[("float32", "reversed")][1] == "loaded by name"


def _import_by_position(self, path):
    """A version-1 importer: tensors taken in file order."""
    loaded = portable.load_state(path, expect_shapes=[p.shape for p in self.params])
    compute = _numpy.state_dtype(self.dtype)
    self.states = [s._replace(m=self._asarray(m, compute), h=self._asarray(h, compute))
                   for s, m, h in zip(self.states, loaded.ms, loaded.hs, strict=True)]
    self.completed = loaded.step
    self.refreshes = int(loaded.counters["hessian_refreshes"])
    self.rejected = int(loaded.counters["rejected_hessian_coordinates"])


def test_a_positional_importer_refuses_the_reversed_file(monkeypatch):
    monkeypatch.setattr(_numpy.NumpyDriver, "import_state", _import_by_position)
    results = _results(portable_part.run_part([]))
    passed, detail = results[("float32", "reversed")]
    assert passed and detail.startswith("refused: tensor 0 ('2'): expected shape ()")
    assert results[("float32", "same")][0]


def test_a_positional_importer_with_equal_shapes_fails_the_reversed_row(monkeypatch):
    """Same shapes everywhere: file order silently swaps state, and the row sees it."""
    monkeypatch.setattr(_numpy.NumpyDriver, "import_state", _import_by_position)
    _change_scenario(monkeypatch, shapes=((4,), (4,)))
    results = _results(portable_part.run_part([]))
    passed, detail = results[("float32", "reversed")]
    assert not passed and "not bitwise identical" in detail, detail


@pytest.mark.parametrize("counter", ["hessian_refreshes", "rejected_hessian_coordinates"])
def test_an_importer_that_drops_a_counter_fails(monkeypatch, counter):
    original = _numpy.NumpyDriver.import_state
    attribute = {"hessian_refreshes": "refreshes",
                 "rejected_hessian_coordinates": "rejected"}[counter]

    def forgetful(self, path):
        original(self, path)
        setattr(self, attribute, 0)

    monkeypatch.setattr(_numpy.NumpyDriver, "import_state", forgetful)
    if counter == "rejected_hessian_coordinates":  # rejections need non-finite estimates
        _change_scenario(monkeypatch, nonfinite_hhat=0.1)
    results = _results(portable_part.run_part([]))
    assert not any(passed for passed, _ in results.values())
    assert all(f"{counter} differs from step" in detail for _, detail in results.values())


def test_an_exporter_with_other_names_fails(monkeypatch):
    original = portable.save_state

    def renamed(path, **kwargs):
        kwargs["names"] = [f"p{i}" for i in range(len(kwargs["ms"]))]
        original(path, **kwargs)

    monkeypatch.setattr(_numpy.portable, "save_state", renamed)
    results = _results(portable_part.run_part([]))
    assert not any(passed for passed, _ in results.values())
    assert all("the exporter names its tensors ['p0', 'p1', 'p2']" in detail
               for _, detail in results.values())
