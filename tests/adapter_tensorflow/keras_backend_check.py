"""Run under KERAS_BACKEND=jax or torch by test_tf_keras_backends.py (not a test module).

Checks, on that backend: importing sophia_tf imports no TensorFlow; the
optimizer's eager trajectory (with update_hessian) equals the core on numpy
bitwise; model.fit trains; the TF-only helpers say they are TF-only.
"""

import sys

import keras
import numpy as np

import sophia_core
import sophia_tf

assert "tensorflow" not in sys.modules, "sophia_tf imported TensorFlow"
rng = np.random.default_rng(0)
param = rng.standard_normal((5, 3)).astype(np.float32)
grads = [rng.standard_normal((5, 3)).astype(np.float32) for _ in range(4)]
hhat = 100 * np.abs(grads[0])  # large enough that some coordinates are not clipped
variable = keras.Variable(param)
optimizer = sophia_tf.SophiaG(learning_rate=0.01, bias_correction=True, hessian_interval=2)
optimizer.build([variable])
want, state = param, sophia_core.init_state(param, xp=np)
for t, g in enumerate(grads):
    if sophia_core.refresh_due(t, hessian_interval=2):
        optimizer.update_hessian([keras.ops.convert_to_tensor(hhat)])
        state = state._replace(h=sophia_core.hessian_ema(state.h, hhat, b2=0.99, xp=np))
    optimizer.apply_gradients([(keras.ops.convert_to_tensor(g), variable)])
    want, state = sophia_core.sophia_update(
        want, g, state, step=t + 1, lr=np.float32(0.01), b1=0.965, gamma=0.04,
        weight_decay=0.1, eps=1e-12, clip_threshold=1.0, bias_correction=True, xp=np)
assert 0 < float(sophia_core.clip_fraction([state.m], [state.h], gamma=0.04, eps=1e-12,
                                           clip_threshold=1.0, xp=np)) < 1
got = keras.ops.convert_to_numpy(variable)
assert got.tobytes() == want.tobytes(), np.abs(got - want).max()
assert int(keras.ops.convert_to_numpy(optimizer.iterations)) == len(grads)

x = rng.standard_normal((64, 4)).astype(np.float32)
y = (x[:, 0] > 0).astype("int64")
model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(8, activation="tanh"),
                          keras.layers.Dense(2)])
model.compile(optimizer=sophia_tf.SophiaG(learning_rate=0.02),
              loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
losses = model.fit(x, y, batch_size=16, epochs=4, verbose=0).history["loss"]
assert losses[-1] < losses[0], losses
restored = sophia_tf.SophiaG.from_config(model.optimizer.get_config())
assert restored.get_config() == model.optimizer.get_config()
try:
    sophia_tf.SophiaTrainStep  # noqa: B018
except AttributeError as error:
    assert "TensorFlow Keras backend" in str(error)
else:
    raise AssertionError("SophiaTrainStep should be TensorFlow-only")
print("ok", keras.backend.backend(), losses[0], losses[-1])
