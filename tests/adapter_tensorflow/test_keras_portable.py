"""export_state / import_state over sophia_core.portable (no pickle), every backend."""

from __future__ import annotations

import numpy as np
import pytest
from keras_support import bitwise_equal, keras, numpy_of

import sophia_tf
from sophia_core import portable

ops = keras.ops
SHAPES = {"kernel": (3, 2), "bias": (2,)}


def _trained(names, **options):
    rng = np.random.default_rng(0)
    variables = [keras.Variable(rng.standard_normal(SHAPES[n]).astype("float32"), name=n)
                 for n in names]
    optimizer = sophia_tf.SophiaG(learning_rate=0.01, hessian_interval=2, **options)
    optimizer.build(variables)
    hhat = {n: rng.standard_normal(SHAPES[n]).astype("float32") for n in names}
    hhat["kernel"][0, 0] = np.inf  # one rejected coordinate
    optimizer.update_hessian([ops.convert_to_tensor(hhat[n]) for n in names])
    for _ in range(6):
        optimizer.apply_gradients(zip([ops.convert_to_tensor(rng.standard_normal(SHAPES[n]),
                                                             "float32") for n in names],
                                      variables, strict=True))
    return optimizer, variables


def test_export_import_round_trip_by_name(tmp_path):
    optimizer, variables = _trained(["kernel", "bias"])
    path = tmp_path / "state.npz"
    optimizer.export_state(path)
    state = portable.load_state(path)
    assert state.step == 6 and state.names == ["kernel", "bias"]
    assert state.counters["hessian_refreshes"] == 1
    assert state.counters["rejected_hessian_coordinates"] == 1
    assert state.hyperparameters["b1"] == 0.965 and state.hyperparameters["hessian_interval"] == 2

    # Another optimizer, its variables in the other order: matched by name.
    other, clones = _trained(["bias", "kernel"])
    other.import_state(path)
    assert int(numpy_of(other.iterations)) == 6
    assert int(numpy_of(other.rejected_hessian_coordinates)) == 1
    for v in variables:
        clone = next(c for c in clones if c.path == v.path)
        for a, b in zip(optimizer.sophia_slots(v), other.sophia_slots(clone), strict=True):
            assert bitwise_equal(a, b)


def test_import_names_what_does_not_match(tmp_path):
    optimizer, _ = _trained(["kernel", "bias"])
    path = tmp_path / "state.npz"
    optimizer.export_state(path)
    wrong = sophia_tf.SophiaG()
    wrong.build([keras.Variable(np.zeros((2, 3), "float32"), name="kernel"),
                 keras.Variable(np.zeros(2, "float32"), name="bias")])
    with pytest.raises(ValueError, match="shape"):
        wrong.import_state(path)
    other = sophia_tf.SophiaG()
    other.build([keras.Variable(np.zeros((3, 2), "float32"), name="weights")])
    with pytest.raises(ValueError, match="kernel"):
        other.import_state(path)


def test_gradient_accumulation_restores_steps_not_micro_steps(tmp_path):
    optimizer, _ = _trained(["kernel", "bias"], gradient_accumulation_steps=2)
    assert int(numpy_of(optimizer.iterations)) == 3  # 6 micro-steps
    path = tmp_path / "state.npz"
    optimizer.export_state(path)
    assert portable.load_state(path).step == 3
    other, variables = _trained(["kernel", "bias"], gradient_accumulation_steps=2)
    other.import_state(path)
    assert int(numpy_of(other.iterations)) == 3
    # The next real step is step 4: the refresh schedule and bias correction see it.
    due = []
    for _ in range(4):
        due.append(bool(other.hessian_refresh_due()))
        other.apply_gradients(zip([ops.ones(SHAPES[n]) for n in ("kernel", "bias")],
                                  variables, strict=True))
    assert int(numpy_of(other.iterations)) == 5 and due == [False, False, True, False]
