"""Bad input gets a clear error naming what is wrong."""

from __future__ import annotations

import math
import pathlib
import re
import subprocess
import sys

import numpy as np
import pytest

import sophia_core as sc
from sophia_core.backends import BACKENDS

INVALID = [
    ("lr", -1e-3),
    ("lr", math.nan),
    ("b1", -0.1),
    ("b1", 1.0),
    ("b2", 1.5),
    ("gamma", -0.04),
    ("weight_decay", -0.1),
    ("eps", 0.0),
    ("eps", -1e-12),
    ("clip_threshold", 0.0),
    ("hessian_interval", 0),
    ("hessian_interval", 2.5),
    ("bias_correction", "yes"),
    ("maximize", 1),
]


@pytest.mark.parametrize(("name", "value"), INVALID, ids=[f"{n}={v}" for n, v in INVALID])
def test_invalid_hyperparameter_raises_value_error_naming_it(name, value):
    with pytest.raises(ValueError, match=rf"^{re.escape(name)}\b"):
        sc.Hyperparameters(**{name: value})
    with pytest.raises(ValueError, match=rf"^{re.escape(name)}\b"):
        sc.validate_hyperparameters(**{name: value})


def test_message_names_host_spellings_and_range():
    with pytest.raises(ValueError) as info:
        sc.Hyperparameters(b1=1.0)
    message = str(info.value)
    assert "betas[0]" in message and "beta_1" in message and "[0, 1)" in message
    with pytest.raises(ValueError, match=r"gamma \(rho\) must be in \[0, inf\), got -1"):
        sc.Hyperparameters(gamma=-1)


def test_defaults_are_the_reference_codes():
    hp = sc.Hyperparameters()
    assert (hp.lr, hp.b1, hp.b2, hp.gamma, hp.weight_decay, hp.eps) == (
        1e-4, 0.965, 0.99, 0.04, 0.1, 1e-12)
    assert (hp.clip_threshold, hp.hessian_interval, hp.bias_correction, hp.maximize) == (
        1.0, 10, False, False)


def test_unknown_hyperparameter_is_a_type_error():
    with pytest.raises(TypeError, match="rhoo"):
        sc.validate_hyperparameters(rhoo=0.1)


def test_non_floating_arrays_raise_type_error(xp):
    ints = xp.asarray(np.arange(3))
    floats = xp.asarray(np.ones(3))
    state = sc.SophiaState(floats, floats)
    kwargs = sc.Hyperparameters().update_kwargs()
    with pytest.raises(TypeError, match="param"):
        sc.sophia_update(ints, floats, state, step=1, **kwargs)
    with pytest.raises(TypeError, match="grad"):
        sc.sophia_update(floats, ints, state, step=1, **kwargs)
    with pytest.raises(TypeError, match="param"):
        sc.init_state(ints)
    with pytest.raises(TypeError, match="hhat"):
        sc.hessian_ema(floats, ints, b2=0.99)
    bools = xp.asarray(np.ones(3, dtype=bool))
    with pytest.raises(TypeError, match="grad"):
        sc.sophia_update(floats, bools, state, step=1, **kwargs)


def test_mismatched_shapes_raise_value_error_naming_both(xp):
    param = xp.asarray(np.ones((2, 3)))
    kwargs = sc.Hyperparameters().update_kwargs()
    good = sc.SophiaState(param, param)
    with pytest.raises(ValueError, match=r"param has shape \(2, 3\) but grad has shape \(3, 2\)"):
        sc.sophia_update(param, xp.asarray(np.ones((3, 2))), good, step=1, **kwargs)
    bad = sc.SophiaState(xp.asarray(np.ones((6,))), param)
    with pytest.raises(ValueError, match=r"param has shape \(2, 3\) but m has shape \(6,\)"):
        sc.sophia_update(param, param, bad, step=1, **kwargs)
    with pytest.raises(ValueError, match=r"h has shape \(2, 3\) but hhat has shape \(2,\)"):
        sc.hessian_ema(param, xp.asarray(np.ones((2,))), b2=0.99)


def test_eps_must_be_normal_in_the_compute_dtype(xp):
    kwargs = sc.Hyperparameters().update_kwargs()
    kwargs["eps"] = 1e-40  # a float32 subnormal: max(gamma*h, eps) could be 0
    param = xp.asarray(np.ones(3, dtype=np.float32))
    with pytest.raises(ValueError, match=r"^eps \(epsilon\) must be a normal float32"):
        sc.sophia_update(param, param, sc.init_state(param), step=1, **kwargs)
    param = xp.asarray(np.ones(3, dtype=np.float64))  # fine in float64
    sc.sophia_update(param, param, sc.init_state(param), step=1, **kwargs)


def test_importing_the_core_imports_no_framework():
    frameworks = sorted({b.module for b in BACKENDS if b.adapter is not None} | {"jaxlib", "keras"})
    code = (
        "import sys, sophia_core, sophia_core.backends\n"
        f"loaded = [m for m in {frameworks!r} if m in sys.modules]\n"
        "assert not loaded, loaded\n"
        "print('ok')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_namespace_functions_list_is_what_the_core_calls():
    """A namespace shim must provide NAMESPACE_FUNCTIONS: keep the list exact."""
    source = "".join(p.read_text() for p in pathlib.Path(sc.__file__).parent.glob("*.py"))
    called = set(re.findall(r"\bxp\.([A-Za-z_][A-Za-z0-9_]*)", source))
    assert called == set(sc.NAMESPACE_FUNCTIONS)
