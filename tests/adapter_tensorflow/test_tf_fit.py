"""Sophia in ``fit``: the Hessian refreshed on schedule, MirroredStrategy, save/resume."""

from __future__ import annotations

import pathlib
import runpy

import numpy as np
import pytest
from tf_support import LOGICAL_CPUS, bitwise_equal, keras, numpy_of, tf

import sophia_tf

ROOT = pathlib.Path(__file__).parent.parent.parent


@keras.saving.register_keras_serializable(package="sophia_tf_tests")
class Classifier(sophia_tf.SophiaTrainStep, keras.Sequential):
    pass


RNG = np.random.default_rng(3)
X = RNG.standard_normal((48, 4)).astype("float32")
Y = (X[:, 0] > 0).astype("int64") + (X[:, 1] > 0)


def _model(optimizer, **compile_options):
    keras.utils.set_random_seed(1)
    model = Classifier([keras.Input((4,)), keras.layers.Dense(8, activation="tanh"),
                        keras.layers.Dense(3)])
    model.compile(optimizer=optimizer,
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  **compile_options)
    return model


class HessianLog(keras.callbacks.Callback):
    """h's sum after every batch, to see when it changed."""

    def __init__(self):
        super().__init__()
        self.sums = []

    def on_train_batch_end(self, batch, logs=None):
        optimizer = self.model.optimizer
        self.sums.append(sum(float(np.sum(numpy_of(optimizer.sophia_slots(v)[1])))
                             for v in self.model.trainable_variables))


MODES = {"graph": dict(jit_compile=False), "jit": dict(jit_compile=True),
         "eager": dict(run_eagerly=True)}


@pytest.mark.parametrize("cls,refresh_at_start,mode", [
    (sophia_tf.SophiaG, True, "graph"), (sophia_tf.SophiaG, True, "jit"),
    (sophia_tf.SophiaG, False, "eager"), (sophia_tf.SophiaH, False, "graph"),
    (sophia_tf.SophiaH, True, "jit"),
])
def test_fit_refreshes_the_hessian_on_schedule(cls, refresh_at_start, mode):
    k = 3
    model = _model(cls(learning_rate=0.02, hessian_interval=k,
                       refresh_at_start=refresh_at_start), **MODES[mode])
    log = HessianLog()
    history = model.fit(X, Y, batch_size=8, epochs=2, shuffle=False, verbose=0,
                        callbacks=[log])
    changed = np.diff([0.0, *log.sums]) != 0
    # Batch b (0-based) starts after b completed steps: refreshed when b % k == 0.
    due = [b % k == 0 and (refresh_at_start or b > 0) for b in range(12)]
    assert changed.tolist() == due
    assert history.history["loss"][-1] < history.history["loss"][0]


def test_the_documented_example_trains():
    example = runpy.run_path(str(ROOT / "docs" / "examples" / "keras_sophia_g_fit.py"))
    losses = example["main"](epochs=3, verbose=0)
    assert losses[-1] < 0.5 * losses[0]


def test_functional_model_with_the_mixin_and_masked_sequence_labels():
    class Tagger(sophia_tf.SophiaTrainStep, keras.Model):
        pass

    inputs = keras.Input((5,), dtype="int32")
    hidden = keras.layers.Embedding(7, 6)(inputs)
    model = Tagger(inputs, keras.layers.Dense(7)(hidden))
    optimizer = sophia_tf.SophiaG(learning_rate=0.01, hessian_interval=2)
    model.compile(optimizer=optimizer, loss=keras.losses.SparseCategoricalCrossentropy(
        from_logits=True, ignore_class=-100))
    tokens = RNG.integers(0, 7, (16, 5)).astype("int32")
    labels = np.roll(tokens, -1, axis=1).astype("int64")
    labels[:, -1] = -100  # no next token: the estimator must leave it out
    model.fit(tokens, labels, batch_size=8, epochs=1, verbose=0)
    embedding_h = numpy_of(optimizer.sophia_slots(model.trainable_variables[0])[1])
    assert np.isfinite(embedding_h).all() and embedding_h.sum() > 0


@pytest.fixture(scope="module")
def mirrored():
    """One strategy for the module: two strategies in one process can collide
    on collective instance keys (a TensorFlow limitation)."""
    if len(LOGICAL_CPUS) < 2:
        pytest.skip("needs two logical CPU devices")
    return tf.distribute.MirroredStrategy(LOGICAL_CPUS[:2])


@pytest.mark.parametrize("cls", [sophia_tf.SophiaG, sophia_tf.SophiaH])
def test_mirrored_strategy_on_two_cpus_matches_one_device(cls, mirrored):
    def run(strategy):
        with strategy.scope():
            model = _model(cls(learning_rate=0.02, hessian_interval=2))
        model.fit(X, Y, batch_size=8, epochs=1, shuffle=False, verbose=0)
        optimizer = model.optimizer
        return ([numpy_of(v) for v in model.trainable_variables],
                [numpy_of(optimizer.sophia_slots(v)[1]) for v in model.trainable_variables])

    single = run(tf.distribute.get_strategy())
    both = run(mirrored)
    # Same sampled labels/probes; sums over replicas round differently.
    for a, b in zip(single[0] + single[1], both[0] + both[1], strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert sum(h.sum() for h in single[1]) > 0


def test_save_load_and_resume_continue_bitwise(tmp_path):
    def fresh():
        return _model(sophia_tf.SophiaG(learning_rate=0.02, hessian_interval=2))

    straight = fresh()
    straight.fit(X, Y, batch_size=8, epochs=2, shuffle=False, verbose=0)
    first = fresh()
    first.fit(X, Y, batch_size=8, epochs=1, shuffle=False, verbose=0)
    path = tmp_path / "model.keras"
    first.save(path)
    resumed = keras.models.load_model(path)
    assert isinstance(resumed.optimizer, sophia_tf.SophiaG)
    assert int(resumed.optimizer.iterations) == int(first.optimizer.iterations)
    for v, w in zip(resumed.trainable_variables, first.trainable_variables, strict=True):
        assert bitwise_equal(resumed.optimizer.sophia_slots(v)[0],
                             first.optimizer.sophia_slots(w)[0])
    resumed.fit(X, Y, batch_size=8, epochs=1, shuffle=False, verbose=0)
    for a, b in zip(resumed.trainable_variables, straight.trainable_variables, strict=True):
        assert bitwise_equal(a, b)
    for a, b in zip(resumed.trainable_variables, straight.trainable_variables, strict=True):
        for slot_a, slot_b in zip(resumed.optimizer.sophia_slots(a),
                                  straight.optimizer.sophia_slots(b), strict=True):
            assert bitwise_equal(slot_a, slot_b)
