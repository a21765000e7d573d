"""Sophia in ``fit`` under ``tf.distribute.MirroredStrategy`` on two logical CPUs.

A tiny language model with an Embedding (whose replica gradients are
``IndexedSlices`` of unknown shape) trains on two replicas as on one device:
same sampled labels and probes, sums over replicas rounded differently. In
float64, so that the reduction order (float32: relative differences of 1e-5
in gradient sums with cancellation) stays far below the tolerance.
"""

from __future__ import annotations

import numpy as np
import pytest
from keras_support import LOGICAL_CPUS, keras, numpy_of, tensorflow_only
from test_keras_fit import NEXT, TOKENS, hessians, language_model

import sophia_tf

pytestmark = tensorflow_only


@pytest.fixture(scope="module")
def mirrored():
    """One strategy for the module: two strategies in one process can collide
    on collective instance keys (a TensorFlow limitation)."""
    import tensorflow as tf

    if len(LOGICAL_CPUS) < 2:
        pytest.skip("needs two logical CPU devices")
    return tf.distribute.MirroredStrategy(LOGICAL_CPUS[:2])


@pytest.mark.parametrize("cls", [sophia_tf.SophiaG, sophia_tf.SophiaH])
def test_mirrored_strategy_on_two_cpus_matches_one_device(cls, mirrored):
    import tensorflow as tf

    def run(strategy):
        keras.config.set_floatx("float64")
        keras.config.set_dtype_policy("float64")  # a policy set earlier would win over floatx
        try:
            with strategy.scope():
                # The whole batch: each replica takes its share of its own rows.
                model = language_model(cls(learning_rate=0.02, hessian_interval=2,
                                           hessian_batch_fraction=1.0))
            model.fit(TOKENS, NEXT, batch_size=8, epochs=1, shuffle=False, verbose=0)
        finally:
            keras.config.set_floatx("float32")
            keras.config.set_dtype_policy("float32")
        return ([numpy_of(v) for v in model.trainable_variables], hessians(model),
                int(numpy_of(model.optimizer.hessian_refreshes)))

    single, both = run(tf.distribute.get_strategy()), run(mirrored)
    assert single[2] == both[2] == 3 and single[0][0].dtype == np.float64
    for a, b in zip(single[0] + single[1], both[0] + both[1], strict=True):
        np.testing.assert_allclose(b, a, rtol=1e-9, atol=1e-15)
    assert sum(h.sum() for h in single[1]) > 0


def test_adamw_runs_the_same_model_on_the_strategy(mirrored):
    with mirrored.scope():
        model = language_model(keras.optimizers.AdamW(), cls=keras.Sequential)
    model.fit(TOKENS, NEXT, batch_size=8, epochs=1, verbose=0)
