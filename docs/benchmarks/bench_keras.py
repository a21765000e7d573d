"""Sophia's Keras step against ``keras.optimizers.AdamW`` (TensorFlow backend).

Parameters have GPT-2-small's shapes (148 tensors, 124,439,808 values);
gradients are fixed random tensors, so only the optimizer step is timed.
Each optimizer's ``apply_gradients`` runs inside one ``tf.function``; the two
are timed interleaved in the same process and the table reports medians and
the ratio Sophia / AdamW (<= 1.0 means Sophia's step is no slower), both as
a ratio of medians and as the median of per-repeat ratios (robust to load
drifting on a shared machine).

    python docs/benchmarks/bench_keras.py --repeats 15

``--scale 0.1`` shrinks every first dimension (quick runs while developing).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from gpt2_shapes import gpt2_small_shapes  # noqa: E402

import sophia_tf  # noqa: E402


def scaled(shape: tuple[int, ...], scale: float) -> tuple[int, ...]:
    return (max(1, int(shape[0] * scale)), *shape[1:])


def make_step(optimizer, variables, grads):
    optimizer.build(variables)

    @tf.function
    def step():
        optimizer.apply_gradients(zip(grads, variables, strict=True))

    step()  # trace and warm up
    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--inner", type=int, default=3, help="steps per timed sample")
    parser.add_argument("--scale", type=float, default=1.0)
    args = parser.parse_args()

    shapes = [scaled(s, args.scale) for s in gpt2_small_shapes().values()]
    rng = np.random.default_rng(0)
    grads = [tf.constant(rng.standard_normal(s, dtype=np.float32)) for s in shapes]
    count = sum(int(np.prod(s)) for s in shapes)

    candidates = {
        "AdamW": keras.optimizers.AdamW(learning_rate=1e-4, weight_decay=0.1),
        # The step alone (no refresh here, so no missing-refresh check either).
        "SophiaG": sophia_tf.SophiaG(learning_rate=1e-4, weight_decay=0.1, require_refresh=False),
    }
    steps = {}
    for name, optimizer in candidates.items():
        variables = [keras.Variable(rng.standard_normal(s, dtype=np.float32) * 0.02)
                     for s in shapes]
        steps[name] = make_step(optimizer, variables, grads)

    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(args.repeats):
        for name, step in steps.items():  # interleaved
            start = time.perf_counter()
            for _ in range(args.inner):
                step()
            times[name].append((time.perf_counter() - start) / args.inner)

    base = statistics.median(times["AdamW"])
    print(f"Keras {keras.__version__}, TensorFlow {tf.__version__}, {len(shapes)} tensors, "
          f"{count:,} parameters, median of {args.repeats} x {args.inner} steps")
    print(f"{'optimizer':<10} {'median ms/step':>15} {'min ms/step':>12} {'ratio':>7} "
          f"{'paired ratio':>13}")
    for name, samples in times.items():
        median = statistics.median(samples)
        # Median of the per-repeat ratios: adjacent samples share the machine's load.
        paired = statistics.median(s / b for s, b in zip(samples, times["AdamW"], strict=True))
        print(f"{name:<10} {median * 1e3:>15.1f} {min(samples) * 1e3:>12.1f} "
              f"{median / base:>7.2f} {paired:>13.2f}")


if __name__ == "__main__":
    main()
