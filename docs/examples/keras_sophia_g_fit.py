"""Sophia-G in plain ``model.fit`` on any Keras backend: a tiny language model.

    KERAS_BACKEND=jax python docs/examples/keras_sophia_g_fit.py [--epochs 8]

(``tensorflow``, ``jax`` or ``torch``.) The one Sophia-specific line is the
model class, ``sophia_tf.Sequential``: its ``fit`` refreshes the optimizer's
Hessian every ``hessian_interval`` steps on a quarter of the batch.
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import keras  # noqa: E402
import numpy as np  # noqa: E402

import sophia_tf  # noqa: E402


def copy_task(n: int, vocab: int = 16, length: int = 12, seed: int = 0):
    """Sequences that repeat their first half: the second half is predictable."""
    rng = np.random.default_rng(seed)
    half = rng.integers(1, vocab, (n, length // 2))
    tokens = np.concatenate([half, half], axis=1).astype("int32")
    targets = np.roll(tokens, -1, axis=1)
    targets[:, : length // 2 - 1] = -100  # only the copied half is scored
    targets[:, -1] = -100
    return tokens, targets


def main(epochs: int = 8, verbose: int = 1) -> list[float]:
    keras.utils.set_random_seed(0)
    tokens, targets = copy_task(2048)
    model = sophia_tf.Sequential([  # the one line: keras.Sequential -> sophia_tf.Sequential
        keras.Input((tokens.shape[1],), dtype="int32"),
        keras.layers.Embedding(16, 32),
        keras.layers.Conv1D(64, 7, padding="causal", activation="gelu"),
        keras.layers.Flatten(),
        keras.layers.Dense(tokens.shape[1] * 32, activation="gelu"),
        keras.layers.Reshape((tokens.shape[1], 32)),
        keras.layers.Dense(16),  # logits
    ])
    optimizer = sophia_tf.SophiaG(learning_rate=3e-3, gamma=0.05, weight_decay=0.1,
                                  hessian_interval=10)
    model.compile(optimizer=optimizer, loss=keras.losses.SparseCategoricalCrossentropy(
        from_logits=True, ignore_class=-100))
    history = model.fit(tokens, targets, batch_size=64, epochs=epochs, verbose=verbose)
    print(f"{keras.backend.backend()}: {int(optimizer.iterations)} steps, "
          f"{int(optimizer.hessian_refreshes)} Hessian refreshes, unclipped share "
          f"{float(optimizer.unclipped_share):.2f}, final loss {history.history['loss'][-1]:.3f}")
    return history.history["loss"]


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=8)
    main(parser.parse_args().epochs)
