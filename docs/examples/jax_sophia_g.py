"""Sophia-G on a tiny next-token model, in plain JAX + optax.

    python docs/examples/jax_sophia_g.py --steps 200

The model maps a window of previous tokens to the next one (an embedding,
one hidden layer, a softmax over the vocabulary); the data is a noisy
repeating sequence, so the loss falls well below log(vocab).
"""

from __future__ import annotations

import argparse
import math

import jax
import jax.numpy as jnp
import optax

import sophia_jax


def make_data(key, *, vocab, length):
    """A period-7 token sequence with 10% random tokens."""
    base = jnp.arange(length) * 3 % 7 % vocab
    noise = jax.random.randint(key, (length,), 0, vocab)
    flip = jax.random.uniform(jax.random.fold_in(key, 1), (length,)) < 0.1
    return jnp.where(flip, noise, base)


def init_params(key, *, vocab, context, width):
    k1, k2, k3 = jax.random.split(key, 3)
    return {
        "embed": jax.random.normal(k1, (vocab, width), jnp.float32) * 0.1,
        "hidden": jax.random.normal(k2, (context * width, width), jnp.float32)
        / math.sqrt(context * width),
        "bias": jnp.zeros(width, jnp.float32),
        "out": jax.random.normal(k3, (width, vocab), jnp.float32) / math.sqrt(width),
    }


def logits(params, windows):
    x = params["embed"][windows].reshape(windows.shape[0], -1)
    return jnp.tanh(x @ params["hidden"] + params["bias"]) @ params["out"]


def loss(params, windows, targets):
    return optax.softmax_cross_entropy_with_integer_labels(logits(params, windows), targets).mean()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--vocab", type=int, default=16)
    parser.add_argument("--context", type=int, default=4)
    parser.add_argument("--width", type=int, default=32)
    args = parser.parse_args(argv)

    key = jax.random.PRNGKey(0)
    data = make_data(key, vocab=args.vocab, length=4096)
    params = init_params(jax.random.fold_in(key, 2), vocab=args.vocab, context=args.context,
                         width=args.width)
    # Only matrices decay; clip the gradient first, as in the authors' setup.
    tx = optax.chain(
        optax.clip_by_global_norm(1.0),
        sophia_jax.sophia(
            optax.cosine_decay_schedule(3e-3, args.steps), gamma=0.05, weight_decay=0.1,
            weight_decay_mask=lambda p: {k: v.ndim == 2 for k, v in p.items()},
            hessian_interval=10, key=1,
        ),
    )
    state = tx.init(params)

    @jax.jit
    def train_step(params, state, key):
        starts = jax.random.randint(key, (args.batch,), 0, data.shape[0] - args.context - 1)
        windows = jax.vmap(lambda s: jax.lax.dynamic_slice(data, (s,), (args.context,)))(starts)
        targets = data[starts + args.context]
        value, grads = jax.value_and_grad(loss)(params, windows, targets)
        # Sophia-G, given on every step and evaluated only when a refresh is
        # due (every 10th step): labels sampled from the model's own logits on
        # the first quarter of the batch (batch_fraction), N*ghat^2 folded into h.
        estimator = sophia_jax.GaussNewtonBartlett(logits, inputs=windows)
        updates, state = tx.update(grads, state, params, sophia_estimator=estimator)
        return optax.apply_updates(params, updates), state, value

    first = None
    for step in range(args.steps):
        params, state, value = train_step(params, state, jax.random.fold_in(key, 100 + step))
        first = float(value) if first is None else first
        if step % max(1, args.steps // 5) == 0 or step == args.steps - 1:
            print(f"step {step:4d}  loss {float(value):.4f}")
    refreshes = int(sophia_jax.sophia_state(state).hessian_refreshes)
    print(f"loss {first:.4f} -> {float(value):.4f} (log vocab = {math.log(args.vocab):.4f}), "
          f"{refreshes} Hessian refreshes")
    return first, float(value)


if __name__ == "__main__":
    main()
