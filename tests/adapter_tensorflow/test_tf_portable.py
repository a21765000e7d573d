"""export_state / import_state over sophia_core.portable (no pickle)."""

from __future__ import annotations

import numpy as np
import pytest
from tf_support import bitwise_equal, keras, tf

import sophia_tf


@pytest.fixture
def portable():
    import sophia_core.portable

    return sophia_core.portable


def test_export_import_round_trip(tmp_path, portable):
    rng = np.random.default_rng(0)
    shapes = [(3, 2), (2,)]
    variables = [keras.Variable(rng.standard_normal(s).astype("float32")) for s in shapes]
    optimizer = sophia_tf.SophiaG(learning_rate=0.01, hessian_interval=2)
    optimizer.build(variables)
    optimizer.update_hessian([tf.constant(rng.standard_normal(s), tf.float32) for s in shapes])
    for _ in range(3):
        optimizer.apply_gradients(zip([tf.constant(rng.standard_normal(s), tf.float32)
                                       for s in shapes], variables, strict=True))
    path = tmp_path / "state.npz"
    optimizer.export_state(path)
    state = portable.load_state(path)
    assert state.step == 3
    assert state.hyperparameters["b1"] == 0.965 and state.hyperparameters["hessian_interval"] == 2

    other = sophia_tf.SophiaG(learning_rate=0.01, hessian_interval=2)
    clones = [keras.Variable(v.numpy()) for v in variables]
    other.build(clones)
    other.import_state(path)
    assert int(other.iterations) == 3
    for v, c in zip(variables, clones, strict=True):
        for a, b in zip(optimizer.sophia_slots(v), other.sophia_slots(c), strict=True):
            assert bitwise_equal(a, b)

    wrong = sophia_tf.SophiaG()
    wrong.build([keras.Variable(np.zeros((2, 3), "float32")), keras.Variable(np.zeros(2))])
    with pytest.raises(ValueError, match="shape mismatch"):
        wrong.import_state(path)
