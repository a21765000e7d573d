"""Sophia-G in plain ``model.fit``: a small classifier, the Hessian refreshed every k steps.

    python docs/examples/keras_sophia_g_fit.py [--epochs 8]

The model outputs logits (Sophia-G's estimator samples labels from them);
``SophiaTrainStep`` refreshes the optimizer's Hessian EMA on schedule.
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import keras  # noqa: E402
import numpy as np  # noqa: E402

import sophia_tf  # noqa: E402


@keras.saving.register_keras_serializable(package="examples")
class Classifier(sophia_tf.SophiaTrainStep, keras.Sequential):
    """A Sequential model whose ``fit`` refreshes Sophia's Hessian."""


def blobs(n: int, classes: int = 5, features: int = 10, seed: int = 0):
    """Gaussian clusters: a small task a two-layer MLP can learn."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((classes, features)) * 2.0
    labels = rng.integers(0, classes, n)
    return (centres[labels] + rng.standard_normal((n, features))).astype("float32"), labels


def main(epochs: int = 8, verbose: int = 1) -> list[float]:
    keras.utils.set_random_seed(0)
    x, y = blobs(1024)
    model = Classifier([
        keras.Input((10,)),
        keras.layers.Dense(32, activation="gelu"),
        keras.layers.Dense(5),  # logits
    ])
    optimizer = sophia_tf.SophiaG(learning_rate=3e-3, gamma=0.04, weight_decay=0.1,
                                  hessian_interval=10)
    model.compile(
        optimizer=optimizer,
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    history = model.fit(x, y, batch_size=64, epochs=epochs, verbose=verbose)
    refreshes = -(-int(optimizer.iterations) // optimizer.hessian_interval)
    print(f"{int(optimizer.iterations)} steps, {refreshes} Hessian refreshes, "
          f"final loss {history.history['loss'][-1]:.3f}, "
          f"accuracy {history.history['accuracy'][-1]:.3f}")
    return history.history["loss"]


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=8)
    main(parser.parse_args().epochs)
