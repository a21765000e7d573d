"""The benchmark runner reads the adapters' printed tables (no timing here)."""

from __future__ import annotations

import importlib.util
import pathlib

RUNNER = pathlib.Path(__file__).resolve().parents[2] / "docs" / "benchmarks" / "run_all.py"


def _runner():
    spec = importlib.util.spec_from_file_location("run_all", RUNNER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_ratio_rows_reads_each_header_style() -> None:
    output = """jax 0.10
Part 1: update
case                                          median ms   ratio
optax.adamw                                        10.0    1.00x
sophia_jax.sophia (apply)                           7.1    0.71x

gpt2: 148 tensors
optimizer                    ms/step  vs AdamW  vs authors  state
sophia_torch.Sophia             90.0     0.900       0.450   2.00
"""
    rows = _runner().ratio_rows(output)
    assert [r["name"] for r in rows] == ["optax.adamw", "sophia_jax.sophia (apply)",
                                         "sophia_torch.Sophia"]
    assert rows[1] == {"table": "Part 1: update", "name": "sophia_jax.sophia (apply)",
                       "ratios": {"ratio": "0.71"}}
    assert rows[2]["ratios"] == {"vs AdamW": "0.900", "vs authors": "0.450"}


def test_ratio_rows_ignores_text_without_a_ratio_header() -> None:
    assert _runner().ratio_rows("loss 3.2\nsteps 10 20\n") == []
