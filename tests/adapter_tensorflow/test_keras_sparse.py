"""Keras's own sparse-gradient optimizer tests, adapted to SophiaG.

From ``keras/src/optimizers/optimizer_sparse_test.py`` (Keras 3.15): a sparse
gradient (TensorFlow ``IndexedSlices``, JAX ``BCOO``) gives the same result
as the same gradient densified, and the optimizer writes through
``self.assign`` (never ``variable.assign``). Sophia densifies the gradient
(its update touches every coordinate: weight decay, and sign steps where
``h`` is 0), so no update is sparse. Torch has no sparse Keras gradients.
"""

from __future__ import annotations

from unittest import mock

import numpy as np
import pytest
from keras_support import BACKEND, keras, numpy_of

import sophia_tf

pytestmark = pytest.mark.skipif(BACKEND == "torch", reason="Keras on torch has no sparse tensors")
ops = keras.ops
OPTIONS = {"default": {}, "bias_correction": dict(bias_correction=True, weight_decay=0.0),
           "loss_scale": "loss_scale"}


def _optimizer(name):
    if OPTIONS[name] == "loss_scale":
        return keras.optimizers.LossScaleOptimizer(sophia_tf.SophiaG(learning_rate=0.5))
    return sophia_tf.SophiaG(**OPTIONS[name])


def _sparse(values, indices, shape):
    if BACKEND == "tensorflow":
        import tensorflow as tf

        return tf.IndexedSlices(values, indices, shape), tf.IndexedSlices
    import jax.experimental.sparse as jax_sparse

    return jax_sparse.BCOO((values, tuple((i,) for i in indices)), shape=shape), \
        jax_sparse.JAXSparse


@pytest.mark.parametrize("name", list(OPTIONS))
def test_sparse_gradients(name):
    model_variable = keras.Variable(initializer="ones", shape=(5, 10))
    optimizer = _optimizer(name)
    grad, sparse_class = _sparse(0.5 * ops.ones((3, 10)), (0, 2, 4), (5, 10))
    # Keras's test patches the tf.Variable on TensorFlow, the Keras Variable on JAX.
    variable_class = (model_variable._value if BACKEND == "tensorflow"
                      else model_variable).__class__
    inner = getattr(optimizer, "inner_optimizer", optimizer)
    sparse_updates = []

    def optimizer_assign(variable, value):
        if isinstance(value, sparse_class):
            sparse_updates.append(variable)

    def variable_assign(variable, value):
        if len(variable.shape):
            pytest.fail("the optimizer called assign on a variable: use self.assign")

    with (mock.patch.object(inner, "assign", autospec=True) as assign,
          mock.patch.object(variable_class, "assign", autospec=True) as direct,
          mock.patch.object(variable_class, "assign_add", autospec=True) as direct_add,
          mock.patch.object(variable_class, "assign_sub", autospec=True) as direct_sub):
        assign.side_effect = optimizer_assign
        for method in (direct, direct_add, direct_sub):
            method.side_effect = variable_assign
        optimizer.apply([grad], [model_variable])
    assert assign.call_count >= 2 and not sparse_updates  # param and m, densified


@pytest.mark.parametrize("name", list(OPTIONS))
def test_sparse_correctness(name):
    optimizer_sparse, optimizer_dense = _optimizer(name), _optimizer(name)
    var_sparse = keras.Variable(initializer="ones", shape=(5, 3, 2))
    var_dense = keras.Variable(initializer="ones", shape=(5, 3, 2))
    stateless = BACKEND == "jax"
    if stateless:
        optimizer_sparse.build([var_sparse])
        optimizer_dense.build([var_dense])
    sparse_state, dense_state = optimizer_sparse.variables, optimizer_dense.variables
    sparse_values, dense_values = [var_sparse.value], [var_dense.value]
    for i in range(5):
        grad_sparse, _ = _sparse(ops.ones((3, 3, 2)) * (10.0 - i), (0, 2, 4), (5, 3, 2))
        grad_dense = ops.convert_to_tensor(grad_sparse, sparse=False)
        if stateless:
            sparse_values, sparse_state = optimizer_sparse.stateless_apply(
                sparse_state, [grad_sparse], sparse_values)
            dense_values, dense_state = optimizer_dense.stateless_apply(
                dense_state, [grad_dense], dense_values)
            np.testing.assert_array_equal(numpy_of(sparse_values[0]), numpy_of(dense_values[0]))
        else:
            optimizer_sparse.apply([grad_sparse], [var_sparse])
            optimizer_dense.apply([grad_dense], [var_dense])
            np.testing.assert_array_equal(numpy_of(var_sparse), numpy_of(var_dense))
