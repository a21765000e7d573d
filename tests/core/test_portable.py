"""The framework-neutral state file: round trips and clear refusals."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from sophia_core import portable

HYPERPARAMETERS = {"lr": 1e-3, "b1": 0.9, "b2": 0.99, "gamma": 0.04, "weight_decay": 0.1,
                   "eps": 1e-12, "clip_threshold": 1.0, "hessian_interval": 10,
                   "refresh_at_start": True, "bias_correction": False, "maximize": False}


def _state(dtype=np.float32):
    rng = np.random.default_rng(0)
    shapes = [(), (3,), (2, 4), (0, 5)]
    ms = [rng.standard_normal(s).astype(dtype) for s in shapes]
    hs = [rng.random(s).astype(dtype) for s in shapes]
    return ms, hs


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_round_trip_is_exact(tmp_path, dtype):
    ms, hs = _state(dtype)
    path = tmp_path / "state.npz"
    portable.save_state(path, step=17, ms=ms, hs=hs, hyperparameters=HYPERPARAMETERS)
    state = portable.load_state(path, expect_shapes=[m.shape for m in ms],
                                expect_dtypes=[dtype] * len(ms))
    assert state.step == 17
    assert state.hyperparameters == HYPERPARAMETERS
    for a, b in zip(ms + hs, state.ms + state.hs, strict=True):
        assert b.dtype == a.dtype and b.shape == a.shape
        np.testing.assert_array_equal(a, b)


def test_path_is_used_exactly_and_no_temp_file_is_left(tmp_path):
    ms, hs = _state()
    path = tmp_path / "checkpoint.sophia"
    portable.save_state(str(path), step=0, ms=ms, hs=hs, hyperparameters={})
    assert sorted(os.listdir(tmp_path)) == ["checkpoint.sophia"]
    assert portable.load_state(path).step == 0


@pytest.mark.parametrize("step", [np.int64(5), np.asarray(5), np.float32(5.0), 5.0])
def test_step_accepts_scalars_with_integer_value(tmp_path, step):
    ms, hs = _state()
    portable.save_state(tmp_path / "s", step=step, ms=ms, hs=hs, hyperparameters={})
    assert portable.load_state(tmp_path / "s").step == 5


@pytest.mark.parametrize("step", [-1, 2.5, True, np.zeros(2), "3"])
def test_bad_step_is_refused(tmp_path, step):
    ms, hs = _state()
    with pytest.raises(ValueError, match="step"):
        portable.save_state(tmp_path / "s", step=step, ms=ms, hs=hs, hyperparameters={})


def test_save_refuses_mismatched_pairs_and_bad_dtypes(tmp_path):
    ms, hs = _state()
    with pytest.raises(ValueError, match="2 momentum tensors but 1 Hessian"):
        portable.save_state(tmp_path / "s", step=0, ms=ms[:2], hs=hs[:1], hyperparameters={})
    with pytest.raises(ValueError, match=r"tensor 1: m has shape \(3,\).*h has shape \(4,\)"):
        portable.save_state(tmp_path / "s", step=0, ms=[ms[0], np.zeros(3, np.float32)],
                            hs=[hs[0], np.zeros(4, np.float32)], hyperparameters={})
    with pytest.raises(ValueError, match=r"ms\[0\] has dtype int64"):
        portable.save_state(tmp_path / "s", step=0, ms=[np.zeros(2, np.int64)],
                            hs=[np.zeros(2, np.int64)], hyperparameters={})
    with pytest.raises(ValueError, match="dtype float32.*dtype float64"):
        portable.save_state(tmp_path / "s", step=0, ms=[np.zeros(2, np.float32)],
                            hs=[np.zeros(2)], hyperparameters={})
    assert not os.listdir(tmp_path)


def test_hyperparameters_must_be_portable_and_valid(tmp_path):
    ms, hs = _state()
    with pytest.raises(ValueError, match="'lr' has a value of type function"):
        portable.save_state(tmp_path / "s", step=0, ms=ms, hs=hs,
                            hyperparameters={"lr": lambda t: 1e-3})
    with pytest.raises(ValueError, match=r"eps \(epsilon\) must be in"):
        portable.save_state(tmp_path / "s", step=0, ms=ms, hs=hs, hyperparameters={"eps": 0.0})
    # Host-specific extras are carried along untouched.
    portable.save_state(tmp_path / "s", step=0, ms=ms, hs=hs,
                        hyperparameters={"lr": None, "schedule": "cosine"})
    assert portable.load_state(tmp_path / "s").hyperparameters == {"lr": None,
                                                                   "schedule": "cosine"}


def test_expectations_name_the_tensor(tmp_path):
    ms, hs = _state()
    path = tmp_path / "s.npz"
    portable.save_state(path, step=1, ms=ms, hs=hs, hyperparameters={})
    shapes = [m.shape for m in ms]
    with pytest.raises(ValueError, match="holds state for 4 tensors, expected 3"):
        portable.load_state(path, expect_shapes=shapes[:3])
    bad = list(shapes)
    bad[2] = (4, 2)
    with pytest.raises(ValueError, match=r"tensor 2: expected shape \(4, 2\), got \(2, 4\)"):
        portable.load_state(path, expect_shapes=bad)
    with pytest.raises(ValueError, match="tensor 0: expected dtype float64, got float32"):
        portable.load_state(path, expect_dtypes=["float64"] * 4)


def _write_raw(path, **arrays):
    with open(path, "wb") as f:
        np.savez(f, **arrays)


def _header(**overrides):
    header = {
        "__format__": np.asarray(portable.FORMAT),
        "__version__": np.asarray(portable.VERSION, dtype=np.int64),
        "step": np.asarray(3, dtype=np.int64),
        "num_tensors": np.asarray(1, dtype=np.int64),
        "hyperparameters": np.asarray(json.dumps({})),
        "m/0": np.zeros(2, np.float32),
        "h/0": np.zeros(2, np.float32),
    }
    header.update(overrides)
    return {k: v for k, v in header.items() if v is not None}


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"__format__": None}, "missing key '__format__'"),
        ({"h/0": None}, "missing key 'h/0'"),
        ({"num_tensors": np.asarray(2)}, "missing key 'h/1'"),
        ({"m/7": np.zeros(1)}, r"unexpected keys \['m/7'\]"),
        ({"__format__": np.asarray("something-else")}, "__format__ is 'something-else'"),
        ({"__version__": np.asarray(99)}, "format version 99 is not supported"),
        ({"step": np.asarray(-2)}, "step must be >= 0"),
        ({"step": np.asarray([1, 2])}, "entry 'step' must be a scalar"),
        ({"hyperparameters": np.asarray("{not json")}, "not valid JSON"),
        ({"hyperparameters": np.asarray('{"b1": 1.5}')}, r"b1 \(betas\[0\], beta_1\) must be"),
        ({"h/0": np.zeros(3, np.float32)}, r"tensor 0: m has shape \(2,\).*h has shape \(3,\)"),
        ({"m/0": np.zeros(2, np.int32), "h/0": np.zeros(2, np.int32)},
         "tensor 0: m has unsupported dtype int32"),
        ({"m/0": np.array([None, 1], dtype=object)}, "pickle"),
    ],
)
def test_malformed_files_name_the_problem(tmp_path, overrides, message):
    path = tmp_path / "bad.npz"
    _write_raw(path, **_header(**overrides))  # savez pickles object arrays
    with pytest.raises(ValueError, match=message):
        portable.load_state(path)


@pytest.mark.parametrize("content", [b"", b"not a zip file", None])
def test_non_archives_are_refused(tmp_path, content):
    path = tmp_path / "bad.npz"
    if content is None:
        np.save(path, np.zeros(3))  # .npy, not .npz
        path = tmp_path / "bad.npz.npy"
    else:
        path.write_bytes(content)
    with pytest.raises(ValueError, match="load_state"):
        portable.load_state(path)


def test_truncated_archive_is_refused(tmp_path):
    ms, hs = _state()
    path = tmp_path / "s.npz"
    portable.save_state(path, step=1, ms=ms, hs=hs, hyperparameters={})
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="load_state"):
        portable.load_state(path)


def test_damaged_member_is_refused(tmp_path):
    path = tmp_path / "s.npz"
    portable.save_state(path, step=1, ms=[np.arange(64.0)], hs=[np.ones(64)],
                        hyperparameters={})
    data = bytearray(path.read_bytes())
    start = data.find(b"m/0.npy") + 200  # inside the stored array data
    data[start:start + 8] = b"\xff" * 8
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="load_state"):
        portable.load_state(path)


def test_importing_portable_imports_no_framework():
    code = (
        "import sys; from sophia_core import portable; "
        "bad = [m for m in ('torch', 'jax', 'tensorflow') if m in sys.modules]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
