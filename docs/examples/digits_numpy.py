"""Sophia-G on numpy alone: softmax regression on scikit-learn's digits.

The core runs on any array-API namespace, numpy included, so a model whose
gradient is written by hand needs no framework at all. The gradient of the
mean cross-entropy of a linear model ``logits = X @ W`` is
``X.T @ (softmax(logits) - onehot(y)) / N``; Sophia-G's estimate uses the same
formula at labels sampled from the model (``sophia_core.sample_labels``).

    python docs/examples/digits_numpy.py [--steps 300]
"""

from __future__ import annotations

import argparse

import numpy as np
from sklearn.datasets import load_digits

import sophia_core


def softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def gradient(w: np.ndarray, x: np.ndarray, labels: np.ndarray) -> np.ndarray:
    p = softmax(x @ w)
    p[np.arange(len(labels)), labels] -= 1.0
    return x.T @ p / len(labels)


def loss(w: np.ndarray, x: np.ndarray, y: np.ndarray) -> float:
    return float(sophia_core.masked_mean_cross_entropy(x @ w, y))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args()
    digits = load_digits()
    x = np.hstack([digits.data / 16.0, np.ones((len(digits.data), 1))])
    y = digits.target.astype(np.int64)
    order = np.random.default_rng(0).permutation(len(y))
    train, test = order[:1400], order[1400:]
    rng = np.random.default_rng(1)
    hp = sophia_core.Hyperparameters(lr=0.02, gamma=0.01, weight_decay=1e-3)
    w_sophia = np.zeros((x.shape[1], 10))
    state = sophia_core.init_state(w_sophia)
    w_adam, m, v = np.zeros_like(w_sophia), np.zeros_like(w_sophia), np.zeros_like(w_sophia)
    for step in range(args.steps):
        batch = rng.choice(train, size=args.batch_size, replace=False)
        xb, yb = x[batch], y[batch]
        if sophia_core.refresh_due(step, hessian_interval=hp.hessian_interval):
            sampled = sophia_core.sample_labels(xb @ w_sophia, rng.random((len(batch), 10)))
            hhat = sophia_core.gnb_estimate(gradient(w_sophia, xb, sampled), len(batch))
            state = state._replace(h=sophia_core.hessian_ema(state.h, hhat, b2=hp.b2))
        w_sophia, state = sophia_core.sophia_update(
            w_sophia, gradient(w_sophia, xb, yb), state, step=step + 1, **hp.update_kwargs())
        # AdamW (lr 0.05, betas 0.9/0.999, weight decay 1e-3), for comparison.
        g = gradient(w_adam, xb, yb)
        m, v = 0.9 * m + 0.1 * g, 0.999 * v + 0.001 * g * g
        mhat, vhat = m / (1 - 0.9 ** (step + 1)), v / (1 - 0.999 ** (step + 1))
        w_adam = w_adam * (1 - 0.05 * 1e-3) - 0.05 * mhat / (np.sqrt(vhat) + 1e-8)
    for name, w in (("Sophia-G", w_sophia), ("AdamW", w_adam)):
        accuracy = float(np.mean((x[test] @ w).argmax(axis=1) == y[test]))
        print(f"{name:9s} test loss {loss(w, x[test], y[test]):.4f}, accuracy {accuracy:.3f}")


if __name__ == "__main__":
    main()
