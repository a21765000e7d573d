"""Sophia-H and Sophia-G with Flax NNX: ``nnx.Optimizer`` passes extra args to optax.

    python docs/examples/flax_nnx_sophia.py --steps 100

A small MLP classifier on synthetic two-moons-like data. ``nnx.Optimizer``
forwards keyword arguments of ``update`` to ``tx.update``, so the estimator
goes in as ``sophia_estimator=``. Its function must compute from the
parameters it is given: rebuild the model from them with ``nnx.merge``
(``lambda p: model(x)`` closes over the model, its derivative is 0, and
sophia_jax rejects it at trace time).
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import optax
from flax import nnx

import sophia_jax


class MLP(nnx.Module):
    def __init__(self, width: int, *, rngs: nnx.Rngs):
        self.hidden = nnx.Linear(2, width, rngs=rngs)
        self.out = nnx.Linear(width, 2, rngs=rngs)

    def __call__(self, x):
        return self.out(nnx.gelu(self.hidden(x)))


def make_data(key, n):
    t = jax.random.uniform(key, (n,)) * jnp.pi
    label = jax.random.bernoulli(jax.random.fold_in(key, 1), 0.5, (n,)).astype(jnp.int32)
    x = jnp.stack([jnp.cos(t) + label, jnp.sin(t) * (1 - 2 * label) + 0.5 * label], axis=1)
    return x + 0.1 * jax.random.normal(jax.random.fold_in(key, 2), x.shape), label


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--width", type=int, default=32)
    parser.add_argument("--estimator", choices=["gnb", "hutchinson"], default="hutchinson")
    args = parser.parse_args(argv)

    x, y = make_data(jax.random.PRNGKey(0), 256)
    model = MLP(args.width, rngs=nnx.Rngs(0))
    tx = sophia_jax.sophia(1e-2, gamma=0.05, weight_decay=1e-4, hessian_interval=5, key=0)
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    graphdef, _, rest = nnx.split(model, nnx.Param, ...)

    def loss_fn(model):
        return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()

    @nnx.jit
    def train_step(model, optimizer):
        loss, grads = nnx.value_and_grad(loss_fn)(model)

        # The estimators get the optimizer's view of the parameters: rebuild
        # the model from it (not from the closed-over `model`).
        def as_model(params):
            return nnx.merge(graphdef, params, rest)

        if args.estimator == "gnb":
            estimator = sophia_jax.GaussNewtonBartlett(lambda p: as_model(p)(x))
        else:
            estimator = sophia_jax.Hutchinson(lambda p: loss_fn(as_model(p)))
        optimizer.update(model, grads, sophia_estimator=estimator)
        return loss

    for step in range(args.steps):
        loss = train_step(model, optimizer)
        if step % max(1, args.steps // 5) == 0:
            print(f"step {step:4d}  loss {float(loss):.4f}")
    accuracy = float(jnp.mean(jnp.argmax(model(x), axis=-1) == y))
    state = sophia_jax.sophia_state(nnx.as_pure(optimizer.opt_state))
    print(f"final loss {float(loss_fn(model)):.4f}, accuracy {accuracy:.3f}, "
          f"steps {int(state.count)}, Hessian refreshes {int(state.hessian_refreshes)}")
    return {"loss": float(loss_fn(model)), "accuracy": accuracy, "state": state}


if __name__ == "__main__":
    main()
