"""The suite's own machinery, on numpy only: streams, bf16 rounding, the comparison."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from conformance.compare import compare, spacing
from conformance.drivers import Trajectory, driver_for
from conformance.drivers._numpy import ReferenceDriver
from conformance.errors import ERROR_CASES
from conformance.scenarios import (
    SCENARIOS,
    by_name,
    make_streams,
    round_to_bfloat16,
)
from sophia_core import ALIASES
from sophia_core.backends import BACKENDS

STEPS = 120


def _streams(name="k10_authors_phase", dtype="float32", steps=STEPS, **changes):
    scenario = dataclasses.replace(by_name(name), steps=steps, **changes)
    return make_streams(scenario, dtype)


def _copy(t: Trajectory) -> Trajectory:
    return Trajectory([p.copy() for p in t.params], [m.copy() for m in t.ms],
                      [h.copy() for h in t.hs], t.steps.copy(),
                      {k: v.copy() for k, v in t.counters.items()})


def test_scenario_table_covers_the_issue():
    shapes = {s for sc in SCENARIOS for s in sc.shapes}
    assert {(), (7,), (3, 5), (0, 4)} <= shapes
    assert {"float64", "float32", "bfloat16"} <= {d for sc in SCENARIOS for d in sc.dtypes}
    hyper = [sc.hyper() for sc in SCENARIOS]
    assert any(h.maximize for h in hyper)
    assert any(h.bias_correction for h in hyper)
    assert any(h.weight_decay == 0 for h in hyper) and any(h.weight_decay > 0.1 for h in hyper)
    assert {h.hessian_interval for h in hyper} >= {1, 10}
    assert {h.refresh_at_start for h in hyper} == {True, False}
    assert any(h.clip_threshold != 1 for h in hyper)
    assert any(sc.schedule for sc in SCENARIOS)
    assert any(sc.negative_hhat for sc in SCENARIOS)
    assert all(sc.steps == 1000 for sc in SCENARIOS)
    assert len({sc.name for sc in SCENARIOS}) == len(SCENARIOS)


def test_streams_are_deterministic_and_seeded():
    a, b = _streams(), _streams()
    for x, y in zip(a.grads + a.hhats + a.params, b.grads + b.hhats + b.params, strict=True):
        assert x.tobytes() == y.tobytes()
    c = make_streams(dataclasses.replace(by_name("k10_authors_phase"), steps=STEPS),
                     "float32", seed=1)
    assert a.grads[1].tobytes() != c.grads[1].tobytes()


def test_refresh_phases():
    assert list(_streams("k10_authors_phase").refresh_steps[:3]) == [10, 20, 30]
    assert list(_streams("defaults").refresh_steps[:3]) == [0, 10, 20]
    assert len(_streams("k1").refresh_steps) == STEPS


def test_round_to_bfloat16_matches_ml_dtypes():
    ml_dtypes = pytest.importorskip("ml_dtypes")
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.standard_normal(10000).astype(np.float32) * 10.0 ** rng.integers(
        -30, 30, 10000), np.float32([0.0, -0.0, np.inf, -np.inf, 1.00390625, 1.01171875])])
    x = x.astype(np.float32)
    expected = x.astype(ml_dtypes.bfloat16).astype(np.float32)
    np.testing.assert_array_equal(round_to_bfloat16(x), expected)
    assert round_to_bfloat16(np.float32(1.0)).shape == ()


def test_numpy_protocol_path_matches_the_flat_reference():
    streams = _streams("defaults", "bfloat16")
    golden = ReferenceDriver().run(streams)
    row = compare(golden, driver_for("numpy").run(streams), streams, backend="numpy",
                  device="cpu", mode="bitwise")
    assert row.passed and row.bitwise


def test_one_ulp_is_not_bitwise_but_inside_the_budget():
    streams = _streams("defaults")
    golden = ReferenceDriver().run(streams)
    got = _copy(golden)
    got.params[1][5:] = np.nextafter(got.params[1][5:], np.float32(np.inf))
    assert not compare(golden, got, streams, backend="x", device="cpu", mode="bitwise").passed
    row = compare(golden, got, streams, backend="x", device="cpu", mode="tolerance")
    assert row.passed and not row.bitwise and 0 < row.max_ulp <= 1


def test_drift_beyond_the_budget_fails():
    streams = _streams("defaults")
    golden = ReferenceDriver().run(streams)
    got = _copy(golden)
    scale = np.abs(golden.params[2]).max()
    # A deviation growing linearly (a biased rounding): 1 ulp more every step.
    got.params[2] += (np.arange(1, STEPS + 1) * spacing(scale, "float32") * 40)[:, None, None]
    row = compare(golden, got, streams, backend="x", device="cpu", mode="tolerance")
    assert not row.passed and "theta[2]" in " ".join(row.problems)


def test_sign_flip_at_m_near_zero_is_counted_not_hidden():
    # Before the first refresh (authors' phase) h = 0 and d = eps: u = c*sign(m).
    streams = _streams("k10_authors_phase", zero_grad_steps=0)
    golden = ReferenceDriver().run(streams)
    lr = streams.scenario.hyper().lr
    got = _copy(golden)
    # A coordinate whose m is rounding noise: flip it and let theta take the jump.
    m = golden.ms[1]
    t = 3
    got.ms[1][t, 0] = -m[t, 0]
    row = compare(golden, got, streams, backend="x", device="cpu", mode="tolerance")
    assert not row.passed  # |m| is far from rounding noise: an unexplained flip
    tiny = _copy(golden)
    tiny.ms[1][t, 0] = 1e-30
    golden.ms[1][t, 0] = -1e-30
    tiny.params[1][t:, 0] = golden.params[1][t:, 0] + 2 * lr
    row = compare(golden, tiny, streams, backend="x", device="cpu", mode="tolerance")
    assert row.passed, row.problems
    assert row.sign_flips == 1 and row.sign_sensitive >= 1


def test_error_cases_name_the_parameter_in_every_spelling():
    hyper = [c for c in ERROR_CASES if c.kind == "hyperparameter"]
    assert {c.names[0] for c in hyper} >= {"lr", "b1", "b2", "gamma", "eps", "hessian_interval"}
    for case in hyper:
        assert set(ALIASES.get(case.names[0], ())) <= set(case.names)


def test_every_framework_adapter_has_a_driver():
    from conformance.drivers import has_driver

    assert all(has_driver(b.name) for b in BACKENDS if b.adapter is not None)


def test_the_suite_imports_no_framework_until_a_driver_is_asked_for():
    import subprocess
    import sys

    code = (
        "import sys, conformance, conformance.scenarios, conformance.compare, conformance.run, "
        "conformance.errors, conformance.portable, conformance.nonfinite, "
        "conformance.estimators; "
        "bad = [m for m in ('torch', 'jax', 'tensorflow') if m in sys.modules]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
