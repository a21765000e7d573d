"""Sophia-G against AdamW on scikit-learn's digits, in plain numpy.

Multinomial logistic regression (64 pixels -> 10 classes) trained with
minibatches through ``sophia_core`` alone: gradients are analytic, and the
Sophia-G (GNB) Hessian estimate uses labels sampled from the model's own
softmax every ``hessian_interval`` steps. AdamW, the baseline, is written out
here in numpy with the same schedule, batches and step count.

Run: ``python docs/examples/digits_numpy.py`` (or ``nox -s digits``).
"""

from __future__ import annotations

import argparse
import time

import numpy as np

import sophia_core as sc


def load_digits_split(seed: int):
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = x / 16.0
    order = np.random.default_rng(seed).permutation(len(y))
    x, y = x[order], y[order]
    n_val = len(y) // 5
    return (x[n_val:], y[n_val:]), (x[:n_val], y[:n_val])


def logits_of(params, x):
    w, b = params
    return x @ w + b


def grads_of(params, x, labels):
    """Gradient of the mean cross-entropy at ``labels`` (analytic)."""
    z = logits_of(params, x)
    p = np.exp(z - z.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    p[np.arange(len(labels)), labels] -= 1.0
    p /= len(labels)
    return [x.T @ p, p.sum(axis=0)]


def evaluate(params, x, y):
    z = logits_of(params, x)
    loss = float(sc.masked_mean_cross_entropy(z, y))
    return loss, float(np.mean(np.argmax(z, axis=1) == y))


def cosine_lr(peak: float, step: int, steps: int, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * 0.5 * (1 + np.cos(np.pi * (step - warmup) / max(steps - warmup, 1)))


def train_sophia(data, args, rng):
    (x, y), _ = data
    params = init_params(rng)
    hp = sc.Hyperparameters(lr=args.sophia_lr, gamma=args.gamma, weight_decay=args.weight_decay,
                            hessian_interval=args.hessian_interval)
    states = [sc.init_state(p) for p in params]
    fractions = []
    for t in range(args.steps):
        batch = rng.integers(0, len(y), args.batch_size)
        if sc.refresh_due(t, hessian_interval=hp.hessian_interval):
            z = logits_of(params, x[batch])
            sampled = sc.sample_labels(z, rng.random(z.shape))
            n = int(sc.num_positions(sampled))
            g_hat = grads_of(params, x[batch], sampled)
            states = [s._replace(h=sc.hessian_ema(s.h, sc.gnb_estimate(g, n), b2=hp.b2))
                      for s, g in zip(states, g_hat, strict=True)]
        grads = grads_of(params, x[batch], y[batch])
        lr = cosine_lr(args.sophia_lr, t, args.steps, args.warmup)
        kwargs = hp.replace(lr=lr).update_kwargs()
        new = [sc.sophia_update(p, g, s, step=t + 1, **kwargs)
               for p, g, s in zip(params, grads, states, strict=True)]
        params = [p for p, _ in new]
        states = [s for _, s in new]
        fractions.append(float(sc.clip_fraction([s.m for s in states], [s.h for s in states],
                                                gamma=hp.gamma, eps=hp.eps,
                                                clip_threshold=hp.clip_threshold)))
    return params, float(np.mean(fractions))


def train_adamw(data, args, rng, b1=0.9, b2=0.999, eps=1e-8):
    (x, y), _ = data
    params = init_params(rng)
    ms = [np.zeros_like(p) for p in params]
    vs = [np.zeros_like(p) for p in params]
    for t in range(args.steps):
        batch = rng.integers(0, len(y), args.batch_size)
        if sc.refresh_due(t, hessian_interval=args.hessian_interval):
            rng.random((args.batch_size, 10))  # keep the batch stream identical to Sophia's
        grads = grads_of(params, x[batch], y[batch])
        lr = cosine_lr(args.adamw_lr, t, args.steps, args.warmup)
        for p, g, m, v in zip(params, grads, ms, vs, strict=True):
            m[...] = b1 * m + (1 - b1) * g
            v[...] = b2 * v + (1 - b2) * g * g
            mhat, vhat = m / (1 - b1 ** (t + 1)), v / (1 - b2 ** (t + 1))
            p[...] = p * (1 - lr * args.weight_decay) - lr * mhat / (np.sqrt(vhat) + eps)
    return params, None


def init_params(rng):
    return [rng.normal(scale=0.01, size=(64, 10)), np.zeros(10)]


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--sophia-lr", type=float, default=0.05)
    parser.add_argument("--adamw-lr", type=float, default=0.05)
    parser.add_argument("--gamma", type=float, default=0.2)
    parser.add_argument("--weight-decay", type=float, default=1e-4)
    parser.add_argument("--hessian-interval", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    data = load_digits_split(args.seed)
    rows = []
    for name, train in (("Sophia-G", train_sophia), ("AdamW", train_adamw)):
        start = time.perf_counter()
        params, clip = train(data, args, np.random.default_rng(args.seed))
        seconds = time.perf_counter() - start
        loss, acc = evaluate(params, *data[1])
        rows.append(dict(optimizer=name, steps=args.steps, val_loss=loss, val_acc=acc,
                         seconds=seconds, clip_fraction=clip))

    print(f"digits: {len(data[0][1])} train / {len(data[1][1])} validation images, "
          f"batch {args.batch_size}, {args.steps} steps, cosine schedule")
    print(f"{'optimizer':<10} {'steps':>6} {'val loss':>9} {'val acc':>8} {'time s':>7} "
          f"{'unclipped':>10}")
    for r in rows:
        clip = "-" if r["clip_fraction"] is None else f"{r['clip_fraction']:.2f}"
        print(f"{r['optimizer']:<10} {r['steps']:>6} {r['val_loss']:>9.4f} {r['val_acc']:>8.3f} "
              f"{r['seconds']:>7.2f} {clip:>10}")
    return rows


if __name__ == "__main__":
    main()
