"""Checks run in a fresh interpreter: XLA flags must be set before jax starts.

``--xla_force_host_platform_device_count=4`` gives four CPU devices (the
sharding and data-parallel checks); ``--xla_cpu_max_isa=AVX`` stops XLA from
contracting multiply-adds into FMAs, so jitted code can be compared bitwise
with numpy and with ``optax.contrib.sophia``. See ``jax_subprocess_checks.py``.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest

HERE = pathlib.Path(__file__).parent
ROOT = HERE.parent.parent


def _run(*args, x64=None):
    env = dict(os.environ)
    if x64 is not None:
        env["JAX_ENABLE_X64"] = "1" if x64 else "0"
    env["XLA_FLAGS"] = " ".join(
        [env.get("XLA_FLAGS", ""), "--xla_force_host_platform_device_count=4",
         "--xla_cpu_max_isa=AVX"]).strip()
    paths = [str(ROOT), str(ROOT / "backends"), str(ROOT / "tests"), env.get("PYTHONPATH", "")]
    env["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
    proc = subprocess.run([sys.executable, str(HERE / "jax_subprocess_checks.py"), *args],
                          env=env, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def results():
    return _run()


@pytest.mark.parametrize("name", [
    "four_devices",
    "jit_is_bitwise_with_numpy",
    "optax_parity",
    "sharded_equals_unsharded_and_state_follows_params",
    "sharded_hhat_stream_is_bitwise",
    "data_parallel_gnb_averages_ghat_before_squaring",
    "shard_map_training_step_with_check_vma",
])
def test_subprocess_check(results, name):
    assert results[name] == "ok", results[name]


def test_int32_counters_raise_before_they_wrap():
    """Without x64 (a fresh interpreter with JAX_ENABLE_X64=0)."""
    result = _run("--int32", x64=False)["int32_counter_limit"]
    assert result == "ok", result
