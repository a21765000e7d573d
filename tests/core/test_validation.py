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

#: Values of the right type outside their range: ValueError.
OUT_OF_RANGE = [
    ("lr", -1e-3),
    ("lr", math.nan),
    ("lr", math.inf),
    ("b1", -0.1),
    ("b1", 1.0),
    ("b2", 1.0),
    ("b2", 1.5),
    ("b2", -1e-9),
    ("gamma", -0.04),
    ("gamma", math.inf),
    ("weight_decay", -0.1),
    ("weight_decay", math.nan),
    ("eps", 0.0),
    ("eps", -1e-12),
    ("eps", math.inf),
    ("clip_threshold", 0.0),
    ("clip_threshold", math.inf),
    ("hessian_interval", 0),
    ("hessian_interval", 2**31),
    ("n_probes", 0),
    ("n_probes", 2**31),
    ("target_unclipped_share", 0.0),
    ("target_unclipped_share", 1.0),
    ("hessian_batch_fraction", 0.0),
    ("hessian_batch_fraction", 1.5),
    ("probe", "uniform"),
]

REALS = ("lr", "b1", "b2", "gamma", "weight_decay", "eps", "clip_threshold",
         "hessian_batch_fraction")
INTEGERS = ("hessian_interval", "n_probes", "ignore_index")
FLAGS = ("refresh_at_start", "bias_correction", "maximize", "hessian_bias_correction",
         "require_refresh", "warn_sign_momentum")
#: Values of the wrong type: TypeError. What a YAML file, a typo or a
#: careless cast hands an optimizer.
WRONG_TYPE = (
    [(name, value) for name in REALS
     for value in ("1e-3", None, True, 1j, [0.1], np.bool_(True), np.array([0.1, 0.2]))]
    + [(name, value) for name in INTEGERS for value in (2.5, "10", None, True, 10.0)]
    + [(name, value) for name in FLAGS for value in (1, 0, "yes", None, 1.0)]
    + [("target_unclipped_share", "0.3"), ("target_unclipped_share", True), ("probe", None)]
)


@pytest.mark.parametrize(("name", "value"), OUT_OF_RANGE,
                         ids=[f"{n}={v}" for n, v in OUT_OF_RANGE])
def test_out_of_range_value_is_a_value_error_naming_it(name, value):
    with pytest.raises(ValueError, match=rf"^{re.escape(name)}\b"):
        sc.validate_hyperparameters(**{name: value})
    if name in sc.Hyperparameters.__dataclass_fields__:
        with pytest.raises(ValueError, match=rf"^{re.escape(name)}\b"):
            sc.Hyperparameters(**{name: value})


@pytest.mark.parametrize(("name", "value"), WRONG_TYPE,
                         ids=[f"{n}={v!r}" for n, v in WRONG_TYPE])
def test_wrong_type_is_a_type_error_naming_it(name, value):
    with pytest.raises(TypeError, match=rf"^{re.escape(name)}\b") as info:
        sc.validate_hyperparameters(**{name: value})
    assert type(value).__name__ in str(info.value)  # the message says what it got
    if name in sc.Hyperparameters.__dataclass_fields__ and name != "lr":
        with pytest.raises(TypeError, match=rf"^{re.escape(name)}\b"):
            sc.Hyperparameters(**{name: value})


def test_numpy_scalars_are_numbers_and_flags():
    sc.validate_hyperparameters(lr=np.float32(1e-3), b1=np.float64(0.9),
                                hessian_interval=np.int64(10), maximize=np.bool_(False))


def test_none_switches_off_the_gamma_target():
    sc.validate_hyperparameters(target_unclipped_share=None)
    assert sc.Hyperparameters().target_unclipped_share is None


class _Lazy:
    """An array-like whose value cannot be read (like a traced value)."""

    shape, dtype = (), "float32"

    def __float__(self):
        raise RuntimeError("not concrete")


@pytest.mark.parametrize("value", [np.float32(1e-3) + np.zeros((1, 1), np.float32),
                                   np.asarray(1e-3), np.ones((1,), np.float64)])
def test_dynamic_names_accept_one_element_arrays(value):
    sc.validate_hyperparameters(dynamic=("lr",), lr=value)
    with pytest.raises(TypeError, match="^lr"):
        sc.validate_hyperparameters(lr=value)  # not for a host that does not list it


def test_dynamic_names_accept_schedules_and_unreadable_values():
    sc.validate_hyperparameters(dynamic=("lr",), lr=lambda count: 1e-3)
    sc.validate_hyperparameters(dynamic=("lr", "gamma"), lr=_Lazy(), gamma=_Lazy())


@pytest.mark.parametrize(("value", "error"), [
    (np.asarray(-1e-3), ValueError),               # concrete: range-checked
    (np.asarray([1e-3, 2e-3]), TypeError),         # two elements
    (np.asarray(True), TypeError),                 # bool dtype
    (np.asarray(1e-3 + 0j), TypeError),            # complex dtype
    ("1e-3", TypeError),
    (True, TypeError),
])
def test_dynamic_names_still_reject_bad_host_forms(value, error):
    with pytest.raises(error, match="^lr"):
        sc.validate_hyperparameters(dynamic=("lr",), lr=value)


def test_dynamic_lists_real_hyperparameters_only():
    with pytest.raises(TypeError, match="dynamic"):
        sc.validate_hyperparameters(dynamic=("hessian_interval",), hessian_interval=10)


def test_message_names_host_spellings_and_range():
    with pytest.raises(ValueError) as info:
        sc.Hyperparameters(b1=1.0)
    message = str(info.value)
    assert "betas[0]" in message and "beta_1" in message and "[0, 1)" in message
    with pytest.raises(ValueError, match=r"gamma \(rho\) must be in \[0, inf\), got -1"):
        sc.Hyperparameters(gamma=-1)
    with pytest.raises(TypeError, match=r"^lr \(learning_rate\) must be a real number.*"
                                        r"got str '1e-3'"):
        sc.Hyperparameters(lr="1e-3")


def test_defaults_are_the_reference_codes():
    hp = sc.Hyperparameters()
    assert (hp.lr, hp.b1, hp.b2, hp.gamma, hp.weight_decay, hp.eps) == (
        1e-4, 0.965, 0.99, 0.04, 0.1, 1e-12)
    assert (hp.clip_threshold, hp.hessian_interval, hp.bias_correction, hp.maximize) == (
        1.0, 10, False, False)
    assert (hp.hessian_bias_correction, hp.target_unclipped_share) == (False, None)
    sc.validate_hyperparameters(**sc.DEFAULTS)  # every default is valid


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
