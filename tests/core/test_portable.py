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
    """A version-1 file (the old writer's layout), with overrides."""
    header = {
        "__format__": np.asarray(portable.FORMAT),
        "__version__": np.asarray(1, dtype=np.int64),
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
def test_malformed_v1_files_name_the_problem(tmp_path, overrides, message):
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


# -- format version 2: names, matching by name, counters ------------------------------


def test_v2_round_trip_keeps_names_counters_and_version(tmp_path):
    ms, hs = _state()
    names = ["embed.weight", "layers.0.kernel", "layers.0.bias", "head"]
    counters = {"hessian_refreshes": 12, "rejected_hessian_coordinates": 0,
                "gamma": 0.04000000000000001, "sign_momentum_streak": 2}
    path = tmp_path / "s.npz"
    portable.save_state(path, step=2**40, ms=ms, hs=hs, hyperparameters=HYPERPARAMETERS,
                        names=names, counters=counters)
    state = portable.load_state(path)
    assert state.version == portable.VERSION == 2
    assert state.names == names and state.step == 2**40
    assert state.counters == counters
    assert type(state.counters["hessian_refreshes"]) is int
    for a, b in zip(ms + hs, state.ms + state.hs, strict=True):
        np.testing.assert_array_equal(a, b)


def test_default_names_are_the_positions(tmp_path):
    ms, hs = _state()
    portable.save_state(tmp_path / "s", step=0, ms=ms, hs=hs, hyperparameters={})
    state = portable.load_state(tmp_path / "s")
    assert state.names == ["0", "1", "2", "3"] and state.counters == {}


def test_torch_order_q_k_loads_into_jax_sorted_order_k_q_by_name(tmp_path):
    """The measured swap: same shapes, different orders. By name it cannot happen."""
    q_m, k_m = np.full((2, 2), 1.0, np.float32), np.full((2, 2), 2.0, np.float32)
    path = tmp_path / "torch.npz"
    portable.save_state(path, step=7, ms=[q_m, k_m], hs=[q_m * 10, k_m * 10],
                        hyperparameters={}, names=["attn.q", "attn.k"])
    jax_order = {"attn.k": (2, 2), "attn.q": (2, 2)}  # sorted dict keys
    state = portable.load_state(path, expect=jax_order)
    assert state.names == ["attn.k", "attn.q"]
    np.testing.assert_array_equal(state.ms[0], k_m)
    np.testing.assert_array_equal(state.hs[1], q_m * 10)
    # Positional matching is file order: only right when both sides agree on it.
    positional = portable.load_state(path, expect_shapes=[(2, 2), (2, 2)])
    np.testing.assert_array_equal(positional.ms[0], q_m)


def test_names_that_do_not_match_are_listed(tmp_path):
    ms, hs = _state()
    path = tmp_path / "s.npz"
    portable.save_state(path, step=0, ms=ms, hs=hs, hyperparameters={},
                        names=["a", "b", "c", "d"])
    expect = {"a": (), "b": (3,), "x": (2, 4), "y": (0, 5)}
    message = (r"parameter names do not match \(missing from the file: \['x', 'y'\]; "
               r"in the file but not expected: \['c', 'd'\]\)")
    with pytest.raises(ValueError, match=message):
        portable.load_state(path, expect=expect)
    with pytest.raises(ValueError, match=r"missing from the file: \['e'\]\)"):
        portable.load_state(path, expect={"a": (), "b": (3,), "c": (2, 4), "d": (0, 5),
                                          "e": (1,)})
    many = {f"p{i}": (1,) for i in range(25)}
    with pytest.raises(ValueError, match=r"'p9' and 15 more\]"):
        portable.load_state(path, expect=many)


def test_expectations_by_name_name_the_tensor(tmp_path):
    ms, hs = _state()
    path = tmp_path / "s.npz"
    portable.save_state(path, step=0, ms=ms, hs=hs, hyperparameters={},
                        names=["a", "b", "c", "d"])
    shapes = {"d": (0, 5), "c": (2, 4), "b": (3,), "a": ()}
    state = portable.load_state(path, expect=shapes,
                                expect_dtypes=["float32"] * 4)
    assert [m.shape for m in state.ms] == list(shapes.values())
    with pytest.raises(ValueError, match=r"tensor 'c': expected shape \(4, 2\), got \(2, 4\)"):
        portable.load_state(path, expect={**shapes, "c": (4, 2)})
    with pytest.raises(ValueError, match="tensor 'd': expected dtype float16, got float32"):
        portable.load_state(path, expect=shapes, expect_dtypes=["float16"] * 4)
    with pytest.raises(ValueError, match="expect= .by name. or expect_shapes="):
        portable.load_state(path, expect=shapes, expect_shapes=list(shapes.values()))
    with pytest.raises(ValueError, match=r"expect\['a'\] must be a sequence of non-negative"):
        portable.load_state(path, expect={**shapes, "a": (-1,)})


def test_step_beyond_int64_is_refused_on_save(tmp_path):
    ms, hs = _state()
    with pytest.raises(ValueError, match=r"step must be < 2\*\*63"):
        portable.save_state(tmp_path / "s", step=2**63, ms=ms, hs=hs, hyperparameters={})
    portable.save_state(tmp_path / "s", step=2**63 - 1, ms=ms, hs=hs, hyperparameters={})
    assert portable.load_state(tmp_path / "s").step == 2**63 - 1


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_non_finite_state_is_refused_on_save(tmp_path, value):
    ms, hs = _state()
    hs[1] = hs[1].copy()
    hs[1][2] = value
    with pytest.raises(ValueError, match=r"hs\[1\] holds 1 non-finite values"):
        portable.save_state(tmp_path / "s", step=0, ms=ms, hs=hs, hyperparameters={})
    assert not os.listdir(tmp_path)


@pytest.mark.parametrize(
    ("names", "message"),
    [
        (["a", "b", "a", "c"], r"names\[2\] repeats names\[0\] \('a'\)"),
        (["a", "", "b", "c"], r"names\[1\] is empty"),
        (["a", "b\tc", "d", "e"], r"names\[1\] 'b\\tc' contains a non-printable"),
        (["a", "b", "c", "x" * 1025], r"names\[3\] has 1025 characters \(at most 1024\)"),
        (["a", "b", "c", 3], r"names\[3\] must be a str, got int"),
        (["a", "b"], "2 names for 4 tensors"),
        ("abcd", "names must be a list of str, got str"),
    ],
)
def test_bad_names_are_refused_on_save(tmp_path, names, message):
    ms, hs = _state()
    with pytest.raises(ValueError, match=message):
        portable.save_state(tmp_path / "s", step=0, ms=ms, hs=hs, hyperparameters={},
                            names=names)


@pytest.mark.parametrize(
    ("counters", "message"),
    [
        ({"hessian_refreshes": True}, "must be an int or float, got bool"),
        ({"gamma": "0.04"}, "must be an int or float, got str"),
        ({"gamma": float("nan")}, "counter 'gamma' is not finite"),
        ({"n": 2**63}, "counter 'n' is outside the int64 range"),
        ({"": 1}, "counter name is empty"),
        ([("gamma", 1.0)], "counters must be a dict"),
    ],
)
def test_bad_counters_are_refused_on_save(tmp_path, counters, message):
    ms, hs = _state()
    with pytest.raises(ValueError, match=message):
        portable.save_state(tmp_path / "s", step=0, ms=ms, hs=hs, hyperparameters={},
                            counters=counters)


def test_counters_accept_numpy_scalars(tmp_path):
    ms, hs = _state()
    portable.save_state(tmp_path / "s", step=0, ms=ms, hs=hs, hyperparameters={},
                        counters={"hessian_refreshes": np.int64(3), "gamma": np.float32(0.5)})
    assert portable.load_state(tmp_path / "s").counters == {"hessian_refreshes": 3,
                                                            "gamma": 0.5}


def test_name_from_path():
    assert portable.name_from_path(["layers", 0, "weight"]) == "layers.0.weight"
    assert portable.name_from_path("dense/kernel".split("/")) == "dense.kernel"
    assert portable.name_from_path([np.int64(3)]) == "3"
    with pytest.raises(TypeError, match="not a string"):
        portable.name_from_path("layers.0")
    with pytest.raises(TypeError, match="path part 1 must be a str or int, got float"):
        portable.name_from_path(["a", 1.5])
    with pytest.raises(TypeError, match="got bool"):
        portable.name_from_path([True])
    with pytest.raises(ValueError, match="path part 1 is empty"):
        portable.name_from_path(["a", "", "b"])
    with pytest.raises(ValueError, match="name is empty"):
        portable.name_from_path([])
    with pytest.raises(ValueError, match="non-printable"):
        portable.name_from_path(["a\x00"])


def _write_v1(path, ms, hs, *, step=5, hyperparameters=None):
    """A file exactly as the version-1 writer laid it out."""
    arrays = {
        "__format__": np.asarray(portable.FORMAT),
        "__version__": np.asarray(1, dtype=np.int64),
        "step": np.asarray(step, dtype=np.int64),
        "num_tensors": np.asarray(len(ms), dtype=np.int64),
        "hyperparameters": np.asarray(json.dumps(hyperparameters or {}, sort_keys=True)),
    }
    for i, (m, h) in enumerate(zip(ms, hs, strict=True)):
        arrays[f"m/{i}"] = m
        arrays[f"h/{i}"] = h
    _write_raw(path, **arrays)


def test_v1_files_still_load_by_position_and_by_name(tmp_path):
    ms, hs = _state(np.float64)
    path = tmp_path / "v1.npz"
    _write_v1(path, ms, hs, hyperparameters=HYPERPARAMETERS)
    state = portable.load_state(path, expect_shapes=[m.shape for m in ms])
    assert state.version == 1 and state.step == 5
    assert state.names == ["0", "1", "2", "3"] and state.counters == {}
    assert state.hyperparameters == HYPERPARAMETERS
    by_name = portable.load_state(path, expect={"3": (0, 5), "2": (2, 4), "1": (3,), "0": ()})
    assert by_name.names == ["3", "2", "1", "0"]
    for a, b in zip(ms[::-1] + hs[::-1], by_name.ms + by_name.hs, strict=True):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match=r"in the file but not expected: \['1', '3'\]"):
        portable.load_state(path, expect={"2": (2, 4), "0": ()})


def test_fortran_order_and_big_endian_members_load(tmp_path):
    m = np.asfortranarray(np.arange(6.0).reshape(2, 3))
    h = np.arange(6.0).reshape(2, 3).astype(">f8")
    path = tmp_path / "s.npz"
    portable.save_state(path, step=1, ms=[m], hs=[np.asfortranarray(h.astype("f8"))],
                        hyperparameters={})
    state = portable.load_state(path, expect={"0": (2, 3)})
    np.testing.assert_array_equal(state.ms[0], m)
    data = {"__format__": np.asarray(portable.FORMAT),
            "__version__": np.asarray(2, np.int64),
            "header": np.asarray(json.dumps({"step": 1, "names": ["w"], "hyperparameters": {},
                                             "counters": {}})),
            "m/0": h, "h/0": h}
    _write_raw(path, **data)
    state = portable.load_state(path, expect={"w": (2, 3)}, expect_dtypes=["float64"])
    assert state.ms[0].dtype == np.float64 and state.ms[0].dtype.isnative
    np.testing.assert_array_equal(state.hs[0], np.arange(6.0).reshape(2, 3))


def test_compressed_files_load_with_expected_shapes(tmp_path):
    """numpy.savez_compressed (deflate) is read; zeros expand far beyond the file size,
    which is accepted only when the importer says which shapes it expects."""
    ms, hs = [np.zeros(100_000, np.float32)], [np.zeros(100_000, np.float32)]
    plain = tmp_path / "plain.npz"
    portable.save_state(plain, step=2, ms=ms, hs=hs, hyperparameters={})
    with np.load(plain, allow_pickle=False) as archive:
        arrays = {k: archive[k] for k in archive.files}
    packed = tmp_path / "packed.npz"
    np.savez_compressed(packed, **arrays)
    assert packed.stat().st_size * portable.MAX_EXPANSION < 800_000
    state = portable.load_state(packed, expect={"0": (100_000,)})
    assert state.step == 2 and not state.hs[0].any()
    with pytest.raises(ValueError, match="at most 8x without expected shapes"):
        portable.load_state(packed)


def test_loading_never_calls_np_load(tmp_path, monkeypatch):
    """Members are parsed from their .npy headers, never handed to np.load."""
    ms, hs = _state()
    path = tmp_path / "s.npz"
    portable.save_state(path, step=4, ms=ms, hs=hs, hyperparameters={})

    def refuse(*args, **kwargs):
        raise AssertionError("np.load called")

    monkeypatch.setattr(np, "load", refuse)
    assert portable.load_state(path).step == 4


def test_module_examples_run():
    import doctest

    failures, tried = doctest.testmod(portable, verbose=False)
    assert tried >= 4 and failures == 0
