"""Sophia-G on the matrices only, AdamW on the rest: ``optax.masked`` in plain JAX.

    python docs/examples/jax_masked_sophia.py --steps 200

A common split: curvature-preconditioned steps for the weight matrices,
AdamW for biases and embeddings. Inside ``optax.masked`` the transformation
sees only its part of the parameters (``optax.MaskedNode`` elsewhere), while
the model needs all of them to compute logits: pass the whole tree to the
estimator with ``params=``; the estimate is then taken with respect to the
matrices only.
"""

from __future__ import annotations

import argparse
import math

import jax
import jax.numpy as jnp
import optax

import sophia_jax


def make_data(key, *, n, dim, classes):
    """Points from ``classes`` Gaussian blobs in ``dim`` dimensions."""
    centers = jax.random.normal(key, (classes, dim)) * 2.0
    labels = jax.random.randint(jax.random.fold_in(key, 1), (n,), 0, classes)
    x = centers[labels] + jax.random.normal(jax.random.fold_in(key, 2), (n, dim))
    return x, labels


def init_params(key, *, dim, width, classes):
    k1, k2 = jax.random.split(key)
    return {
        "hidden": {"w": jax.random.normal(k1, (dim, width)) / math.sqrt(dim),
                   "b": jnp.zeros(width)},
        "out": {"w": jax.random.normal(k2, (width, classes)) / math.sqrt(width),
                "b": jnp.zeros(classes)},
    }


def logits(params, x):
    hidden = jax.nn.gelu(x @ params["hidden"]["w"] + params["hidden"]["b"])
    return hidden @ params["out"]["w"] + params["out"]["b"]


def loss(params, x, y):
    return optax.softmax_cross_entropy_with_integer_labels(logits(params, x), y).mean()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--width", type=int, default=32)
    args = parser.parse_args(argv)

    key = jax.random.key(0)
    x, y = make_data(key, n=512, dim=8, classes=4)
    params = init_params(jax.random.fold_in(key, 3), dim=8, width=args.width, classes=4)
    matrices = jax.tree.map(lambda p: p.ndim == 2, params)
    vectors = jax.tree.map(lambda is_matrix: not is_matrix, matrices)
    tx = optax.chain(
        optax.clip_by_global_norm(1.0),
        optax.masked(sophia_jax.sophia(3e-3, gamma=0.05, hessian_interval=10, key=1),
                     matrices),
        optax.masked(optax.adamw(3e-3), vectors),
    )
    state = tx.init(params)

    @jax.jit
    def train_step(params, state):
        value, grads = jax.value_and_grad(loss)(params, x, y)
        # params=params: the model needs every parameter; Sophia's part of
        # them is what the estimate is taken with respect to.
        estimator = sophia_jax.GaussNewtonBartlett(logits, inputs=x, params=params)
        updates, state = tx.update(grads, state, params, sophia_estimator=estimator)
        return optax.apply_updates(params, updates), state, value

    first = None
    for step in range(args.steps):
        params, state, value = train_step(params, state)
        first = float(value) if first is None else first
        if step % max(1, args.steps // 5) == 0:
            print(f"step {step:4d}  loss {float(value):.4f}")
    sophia = sophia_jax.sophia_state(state)
    accuracy = float(jnp.mean(jnp.argmax(logits(params, x), axis=-1) == y))
    print(f"loss {first:.4f} -> {float(value):.4f}, accuracy {accuracy:.3f}, "
          f"{int(sophia.hessian_refreshes)} Hessian refreshes of the matrices")
    return {"first": first, "last": float(value), "state": sophia}


if __name__ == "__main__":
    main()
