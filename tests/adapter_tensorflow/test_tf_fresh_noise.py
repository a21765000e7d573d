"""Successive Hessian refreshes draw fresh noise (issue 15 item 6).

The refresh seeds its noise with ``(model.sophia_seed, optimizer.iterations)``,
so refreshes at successive steps on the same batch at the same weights sample
new labels (Sophia-G) and new probes (Sophia-H). With ``learning_rate=0`` the
weights stay put and with ``beta_2=0`` ``h`` is the latest estimate. The same
``sophia_seed`` must give the same sequence, so the differences are not mere
nondeterminism. Backend-neutral (run on TensorFlow here).
"""

from __future__ import annotations

import numpy as np
import pytest
from keras_support import keras, numpy_of

import sophia_tf

VOCAB, LENGTH, ROWS, REFRESHES = 7, 4, 4, 3
RNG = np.random.default_rng(5)
TOKENS = RNG.integers(0, VOCAB, (ROWS, LENGTH)).astype("int32")
NEXT = RNG.integers(0, VOCAB, (ROWS, LENGTH)).astype("int32")


def _model(name: str, seed: int = 0):
    keras.utils.set_random_seed(1)
    model = sophia_tf.Sequential([keras.Input((LENGTH,), dtype="int32"),
                                  keras.layers.Embedding(VOCAB, 4),
                                  keras.layers.Dense(VOCAB)])
    model.sophia_seed = seed
    optimizer = getattr(sophia_tf, name)(learning_rate=0.0, beta_2=0.0, weight_decay=0.0,
                                         hessian_interval=1, hessian_batch_fraction=1.0)
    model.compile(optimizer=optimizer, jit_compile=False,
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return model


def _copies(variables):
    return [np.array(numpy_of(v)) for v in variables]  # a copy: torch's numpy is a view


def _state(model):
    return _copies(model.optimizer.sophia_slots(v)[1] for v in model.trainable_variables)


def _refreshes(name: str, seed: int = 0):
    """``h`` after each of REFRESHES refreshes, by ``refresh_hessian`` and a step."""
    model = _model(name, seed)
    weights = _copies(model.trainable_variables)
    seen = []
    for _ in range(REFRESHES):
        data = (keras.ops.convert_to_tensor(TOKENS), keras.ops.convert_to_tensor(NEXT))
        assert bool(numpy_of(sophia_tf.refresh_hessian(model, data)))
        seen.append(_state(model))
        variables = model.trainable_variables
        model.optimizer.apply([keras.ops.zeros(v.shape, v.dtype) for v in variables], variables)
    assert int(numpy_of(model.optimizer.hessian_refreshes)) == REFRESHES
    for v, w in zip(model.trainable_variables, weights, strict=True):
        np.testing.assert_array_equal(numpy_of(v), w)  # the same weights every refresh
    return seen


class HessianLog(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.seen = []

    def on_train_batch_end(self, batch, logs=None):
        self.seen.append(_state(self.model))


def _fit(name: str):
    """``h`` after each of REFRESHES steps of ``fit`` on one batch repeated."""
    model, log = _model(name), HessianLog()
    model.fit(np.tile(TOKENS, (REFRESHES, 1)), np.tile(NEXT, (REFRESHES, 1)),
              batch_size=ROWS, shuffle=False, verbose=0, callbacks=[log])
    return log.seen


def _same(a, b):
    return all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))


def _all_differ(seen):
    assert len(seen) == REFRESHES
    for earlier in range(REFRESHES):
        assert all(np.isfinite(h).all() for h in seen[earlier])
        for later in range(earlier + 1, REFRESHES):
            assert not _same(seen[earlier], seen[later]), (earlier, later)


NAMES = ["SophiaG", "SophiaH"]


@pytest.mark.parametrize("name", NAMES)
def test_successive_refreshes_on_one_batch_draw_fresh_noise(name):
    _all_differ(_refreshes(name))


@pytest.mark.parametrize("name", NAMES)
def test_successive_refreshes_in_fit_draw_fresh_noise(name):
    _all_differ(_fit(name))


@pytest.mark.parametrize("name", NAMES)
def test_the_same_seed_gives_the_same_sequence_and_another_seed_another(name):
    seen = _refreshes(name)
    assert all(_same(a, b) for a, b in zip(seen, _refreshes(name), strict=True))
    assert not _same(seen[0], _refreshes(name, seed=1)[0])
