"""export_state / import_state over sophia_core.portable (no pickle).

If ``sophia_core.portable`` is not on this branch yet, a stand-in with its
documented signature (``save_state(path, *, step, ms, hs, hyperparameters)``,
``load_state(path) -> PortableState(step, ms, hs, hyperparameters)``) is used,
so the adapter's side of the contract is still tested.
"""

from __future__ import annotations

import importlib
import json
import sys
import types
from typing import NamedTuple

import numpy as np
import pytest
from tf_support import bitwise_equal, keras, tf

import sophia_tf


class _PortableState(NamedTuple):
    step: int
    ms: list
    hs: list
    hyperparameters: dict


def _stand_in() -> types.ModuleType:
    module = types.ModuleType("sophia_core.portable")

    def save_state(path, *, step, ms, hs, hyperparameters):
        arrays = {f"m{i}": np.asarray(m) for i, m in enumerate(ms)}
        arrays.update({f"h{i}": np.asarray(h) for i, h in enumerate(hs)})
        np.savez(path, step=np.asarray(step), count=np.asarray(len(ms)),
                 hyperparameters=np.asarray(json.dumps(hyperparameters)), **arrays)

    def load_state(path):
        with np.load(path, allow_pickle=False) as data:
            n = int(data["count"])
            return _PortableState(int(data["step"]), [data[f"m{i}"] for i in range(n)],
                                  [data[f"h{i}"] for i in range(n)],
                                  json.loads(str(data["hyperparameters"])))

    module.save_state, module.load_state, module.PortableState = (
        save_state, load_state, _PortableState)
    return module


@pytest.fixture
def portable(monkeypatch):
    try:
        return importlib.import_module("sophia_core.portable")
    except ImportError:
        module = _stand_in()
        monkeypatch.setitem(sys.modules, "sophia_core.portable", module)
        import sophia_core

        monkeypatch.setattr(sophia_core, "portable", module, raising=False)
        return module


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
