"""Sophia in ``fit``: the Hessian refreshed on schedule, on every Keras backend.

Backend-neutral (TensorFlow here; JAX and torch in ``test_keras_backends.py``).
The models are tiny language models: an Embedding, a Dense layer, logits.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from keras_support import BACKEND, bitwise_equal, keras, numpy_of

import sophia_tf

VOCAB, LENGTH = 11, 5
RNG = np.random.default_rng(3)
TOKENS = RNG.integers(0, VOCAB, (48, LENGTH)).astype("int32")
NEXT = np.roll(TOKENS, -1, axis=1).astype("int32")
NEXT[:, -1] = -100  # no next token: left out of the loss and of the estimate
LOSS = dict(from_logits=True, ignore_class=-100)
#: jit_compile settings each backend runs (Keras on torch: eager only here).
JIT = {"tensorflow": [False, True], "jax": [True, False], "torch": [False]}[BACKEND]
#: Refresh in fit: every estimator with the backend's default, and Sophia-G
#: with the other jit_compile setting (XLA-compiling Sophia-H's HVP on
#: TensorFlow takes a minute on a shared 2-core machine).
FIT_CASES = [("SophiaG", True, "auto"), ("SophiaG", False, "auto"), ("SophiaH", True, "auto"),
             *(("SophiaG", True, jit) for jit in JIT[1:])]


def language_model(optimizer, cls=sophia_tf.Sequential, head=None, loss=None, **compile_args):
    """Embedding, Dense, and a head: ``Dense(VOCAB, **head)`` (logits by default)."""
    keras.utils.set_random_seed(1)
    model = cls([keras.Input((LENGTH,), dtype="int32"), keras.layers.Embedding(VOCAB, 8),
                 keras.layers.Dense(16, activation="tanh"),
                 keras.layers.Dense(VOCAB, **head or {})])
    model.compile(optimizer=optimizer,
                  loss=loss or keras.losses.SparseCategoricalCrossentropy(**LOSS),
                  **compile_args)
    return model


def hessians(model):
    optimizer = getattr(model.optimizer, "inner_optimizer", model.optimizer)
    return [numpy_of(optimizer.sophia_slots(v)[1]) for v in model.trainable_variables]


class HessianLog(keras.callbacks.Callback):
    """The sum of h after every batch, to see when it changed."""

    def __init__(self):
        super().__init__()
        self.sums = []

    def on_train_batch_end(self, batch, logs=None):
        self.sums.append(sum(float(h.sum()) for h in hessians(self.model)))


@pytest.mark.parametrize("name,refresh_at_start,jit", FIT_CASES,
                         ids=[f"{n}-start={s}-jit={j}" for n, s, j in FIT_CASES])
def test_fit_refreshes_the_hessian_on_schedule(name, refresh_at_start, jit):
    k = 3
    model = language_model(getattr(sophia_tf, name)(
        learning_rate=0.02, hessian_interval=k, refresh_at_start=refresh_at_start),
        jit_compile=jit)
    log = HessianLog()
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no missing-refresh warning here
        history = model.fit(TOKENS, NEXT, batch_size=8, epochs=2, shuffle=False, verbose=0,
                            callbacks=[log])
    changed = np.diff([0.0, *log.sums]) != 0
    # Batch b (0-based) starts after b completed steps: refreshed when b % k == 0.
    due = [b % k == 0 and (refresh_at_start or b > 0) for b in range(12)]
    assert changed.tolist() == due
    assert int(numpy_of(model.optimizer.hessian_refreshes)) == sum(due)
    assert all(np.isfinite(h).all() for h in hessians(model))
    assert history.history["loss"][-1] < history.history["loss"][0]


@pytest.mark.parametrize("jit", JIT, ids=lambda j: f"jit={j}")
def test_plain_fit_without_the_refresh_warns_once_naming_the_fix(jit):
    model = language_model(sophia_tf.SophiaG(hessian_interval=2), cls=keras.Sequential,
                           jit_compile=jit)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.fit(TOKENS, NEXT, batch_size=8, epochs=2, verbose=0)
    messages = [str(w.message) for w in caught if "Hessian estimate" in str(w.message)]
    assert len(messages) == 1 and "sophia_tf.Sequential" in messages[0]
    quiet = language_model(sophia_tf.SophiaG(hessian_interval=2, require_refresh=False),
                           cls=keras.Sequential, jit_compile=jit)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet.fit(TOKENS, NEXT, batch_size=8, epochs=1, verbose=0)
    assert not [w for w in caught if "Hessian estimate" in str(w.message)]


@pytest.mark.parametrize("jit", JIT, ids=lambda j: f"jit={j}")
def test_sign_momentum_regime_warns_once_from_fit(jit):
    # gamma tiny: every step clipped, for more than warmup + patience refreshes.
    model = language_model(sophia_tf.SophiaG(learning_rate=0.01, gamma=1e-9, hessian_interval=1),
                           jit_compile=jit)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.fit(TOKENS, NEXT, batch_size=2, epochs=1, verbose=0)  # 24 refreshes
    messages = [str(w.message) for w in caught if "sign momentum" in str(w.message)]
    assert len(messages) == 1 and "warn_sign_momentum=False" in messages[0]
    assert float(numpy_of(model.optimizer.unclipped_share)) < 0.1


def test_gradient_accumulation_refreshes_once_per_window():
    model = language_model(sophia_tf.SophiaH(learning_rate=0.02, hessian_interval=2,
                                             gradient_accumulation_steps=2))
    model.fit(TOKENS, NEXT, batch_size=8, epochs=2, shuffle=False, verbose=0)
    optimizer = model.optimizer
    assert int(numpy_of(optimizer.iterations)) == 6  # 12 micro-batches
    assert int(numpy_of(optimizer.hessian_refreshes)) == 3  # after 0, 2, 4 real steps


def test_mixed_precision_fit_refreshes_through_the_loss_scale_optimizer():
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        model = language_model(sophia_tf.SophiaG(learning_rate=0.01, hessian_interval=2),
                               head=dict(dtype="float32"))
        assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
        model.fit(TOKENS, NEXT, batch_size=8, epochs=1, verbose=0)
        h = hessians(model)
        assert all(np.isfinite(a).all() for a in h) and sum(a.sum() for a in h) > 0
    finally:
        keras.mixed_precision.set_global_policy("float32")


def _one_refresh(model):
    model.fit(TOKENS[:16], NEXT[:16], batch_size=16, epochs=1, shuffle=False, verbose=0)
    return hessians(model)


def test_a_softmax_head_with_from_logits_false_is_estimated_as_logits():
    optimizer = dict(learning_rate=0.01, hessian_interval=1, hessian_batch_fraction=1.0)
    logits = _one_refresh(language_model(sophia_tf.SophiaG(**optimizer)))
    probabilities = _one_refresh(language_model(
        sophia_tf.SophiaG(**optimizer), head=dict(activation="softmax"),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=False, ignore_class=-100)))
    for a, b in zip(logits, probabilities, strict=True):
        np.testing.assert_allclose(b, a, rtol=2e-3, atol=1e-9)
    assert sum(a.sum() for a in logits) > 0


def test_a_softmax_head_with_from_logits_true_is_rejected():
    model = language_model(sophia_tf.SophiaG(hessian_interval=1),
                           head=dict(activation="softmax"))
    with pytest.raises(ValueError, match="softmax"):
        model.fit(TOKENS, NEXT, batch_size=8, epochs=1, verbose=0)
    mse = language_model(sophia_tf.SophiaG(hessian_interval=1), loss="mse")
    with pytest.raises(ValueError, match="SophiaH"):
        mse.fit(TOKENS, keras.ops.one_hot(NEXT % VOCAB, VOCAB), batch_size=8, epochs=1,
                verbose=0)


def test_the_estimate_leaves_batch_norm_statistics_alone():
    def moving_mean(cls):
        keras.utils.set_random_seed(1)
        model = cls([keras.Input((LENGTH,), dtype="int32"), keras.layers.Embedding(VOCAB, 8),
                     keras.layers.BatchNormalization(), keras.layers.Dense(VOCAB)])
        model.compile(optimizer=sophia_tf.SophiaG(hessian_interval=1, require_refresh=False),
                      loss=keras.losses.SparseCategoricalCrossentropy(**LOSS))
        model.fit(TOKENS[:16], NEXT[:16], batch_size=16, epochs=1, verbose=0)
        return numpy_of(model.layers[1].moving_mean)

    refreshed, plain = moving_mean(sophia_tf.Sequential), moving_mean(keras.Sequential)
    assert bitwise_equal(refreshed, plain)  # one update per step, the refresh adds none


@pytest.mark.parametrize("cls", [sophia_tf.SophiaG, sophia_tf.SophiaH])
def test_save_load_and_resume_continue_bitwise(cls, tmp_path):
    def fresh():
        model = language_model(cls(learning_rate=0.02, hessian_interval=2))
        model.sophia_seed = 7
        return model

    straight = fresh()
    straight.fit(TOKENS, NEXT, batch_size=8, epochs=2, shuffle=False, verbose=0)
    first = fresh()
    first.fit(TOKENS, NEXT, batch_size=8, epochs=1, shuffle=False, verbose=0)
    path = tmp_path / "model.keras"
    first.save(path)
    resumed = keras.models.load_model(path)
    assert isinstance(resumed, sophia_tf.Sequential) and resumed.sophia_seed == 7
    assert isinstance(resumed.optimizer, cls)
    assert int(numpy_of(resumed.optimizer.hessian_refreshes)) == 3
    resumed.fit(TOKENS, NEXT, batch_size=8, epochs=1, shuffle=False, verbose=0)
    for a, b in zip(resumed.trainable_variables, straight.trainable_variables, strict=True):
        assert bitwise_equal(a, b)
        for slot_a, slot_b in zip(resumed.optimizer.sophia_slots(a),
                                  straight.optimizer.sophia_slots(b), strict=True):
            assert bitwise_equal(slot_a, slot_b)


def test_the_seed_changes_the_estimate():
    def h(seed):
        model = language_model(sophia_tf.SophiaG(hessian_interval=1))
        model.sophia_seed = seed
        return _one_refresh(model)

    assert all(bitwise_equal(a, b) for a, b in zip(h(0), h(0), strict=True))
    assert not all(bitwise_equal(a, b) for a, b in zip(h(0), h(1), strict=True))


def test_functional_and_subclassed_models_refresh_in_fit():
    inputs = keras.Input((LENGTH,), dtype="int32")
    logits = keras.layers.Dense(VOCAB)(keras.layers.Embedding(VOCAB, 6)(inputs))
    functional = sophia_tf.Model(inputs, logits)

    class Tagger(sophia_tf.Model):
        def __init__(self):
            super().__init__()
            self.embed = keras.layers.Embedding(VOCAB, 6)
            self.out = keras.layers.Dense(VOCAB)

        def call(self, tokens):
            return self.out(self.embed(tokens))

    for model in (functional, Tagger()):
        model.compile(optimizer=sophia_tf.SophiaH(learning_rate=0.01, hessian_interval=2),
                      loss=keras.losses.SparseCategoricalCrossentropy(**LOSS))
        model.fit(TOKENS, NEXT, batch_size=8, epochs=1, verbose=0)
        assert int(numpy_of(model.optimizer.hessian_refreshes)) == 3
        assert all(np.isfinite(h).all() for h in hessians(model))


def test_refresh_hessian_takes_numpy_data_as_fit_does():
    def h(convert):
        model = language_model(sophia_tf.SophiaG(hessian_interval=1))
        sophia_tf.refresh_hessian(model, (convert(TOKENS[:16]), convert(NEXT[:16])))
        return hessians(model)

    as_numpy = h(np.asarray)
    assert any(float(np.abs(a).sum()) > 0 for a in as_numpy)
    assert all(bitwise_equal(a, b)
               for a, b in zip(as_numpy, h(keras.ops.convert_to_tensor), strict=True))
