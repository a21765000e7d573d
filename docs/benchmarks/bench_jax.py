"""Speed of the jitted Sophia update against optax, and what the refresh costs.

    python docs/benchmarks/bench_jax.py            # 124M parameters, 148 tensors
    python docs/benchmarks/bench_jax.py --quick    # a 12x smaller model, for a smoke run
    python docs/benchmarks/bench_jax.py --demo     # also the demo model's refresh share

Part 1 times one jitted, donated ``update + apply_updates`` (no refresh) for
``optax.adamw``, ``sophia_jax.sophia`` (also its exact ``tx.apply``) and
``optax.contrib.sophia``, interleaved in random order, median of repeats,
ratios against ``optax.adamw`` measured in the same process.

Part 2 is the refresh's cost. On the GPT-2 shapes: a step that folds a given
``hhat`` into ``h`` against a step that does not (the optimizer's share).
On a small next-token MLP (where the forward/backward can be timed too): a
full training step with a Sophia-G refresh (one extra forward and backward,
on the whole batch or on its first quarter, ``batch_fraction``) against one
without; at ``k = 10`` a refresh happens on one step in ten, so its share
of training time is ``extra / (k + extra)`` in units of a plain step.

Part 3 (``--demo``) is the same share on the language-model demo's model
(``docs/examples/lm_demo``, its default size), measured by
``lm_bench.py overhead``: the demo's own jitted step, refresh inside.
"""

from __future__ import annotations

import argparse
import platform
import random
import statistics
import time

import jax
import jax.numpy as jnp
import optax
import optax.contrib
from gpt2_shapes import gpt2_small_shapes  # docs/benchmarks/, beside this script

import sophia_jax


def random_tree(key, shapes, scale=0.02, positive=False):
    keys = jax.random.split(key, len(shapes))
    out = {}
    for k, (name, shape) in zip(keys, shapes.items(), strict=True):
        x = jax.random.normal(k, shape, jnp.float32) * scale
        out[name] = jnp.abs(x) if positive else x
    return out


def no_refresh_hessian():
    """A ``hessian_diagonal_fn`` for optax.contrib.sophia (never due here anyway)."""
    return optax.GradientTransformationExtraArgs(
        lambda params: optax.EmptyState(),
        lambda updates, state, params=None, **kw: (updates, state),
    )


class Loop:
    """A training loop's view of one jitted step: (params, state) threaded and donated."""

    def __init__(self, step, params, state, *args):
        self.fn = jax.jit(step, donate_argnums=(0, 1))
        self.params = jax.tree.map(jnp.copy, params)
        self.state = jax.tree.map(jnp.copy, state)
        self.args = args

    def __call__(self):
        self.params, self.state = self.fn(self.params, self.state, *self.args)
        return self.params


def interleaved(cases, repeats, warmup=2):
    """Median seconds per case; cases run in a fresh random order each repeat."""
    for fn in cases.values():
        for _ in range(warmup):
            jax.block_until_ready(fn())
    times = {name: [] for name in cases}
    order = list(cases)
    for _ in range(repeats):
        random.shuffle(order)
        for name in order:
            start = time.perf_counter()
            jax.block_until_ready(cases[name]())
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def table(title, medians, baseline):
    print(f"\n{title}")
    print(f"{'case':44s} {'median ms':>10s} {'ratio':>7s}")
    for name, seconds in medians.items():
        print(f"{name:44s} {seconds * 1e3:10.1f} {seconds / medians[baseline]:7.2f}x")


def _optax_step(tx, **extra):
    def step(p, s, g, *more):
        updates, s = tx.update(g, s, p, **dict(zip(extra, more, strict=True)))
        return optax.apply_updates(p, updates), s

    return step


def bench_updates(shapes, repeats):
    params = random_tree(jax.random.PRNGKey(0), shapes)
    grads = random_tree(jax.random.PRNGKey(1), shapes, scale=1e-3)
    hhat = random_tree(jax.random.PRNGKey(2), shapes, scale=1e-3, positive=True)
    n = sum(x.size for x in jax.tree.leaves(params))
    print(f"{len(shapes)} tensors, {n:,} parameters (float32)")

    adamw = optax.adamw(3e-4, weight_decay=0.1)
    ours = sophia_jax.sophia(3e-4, require_refresh=False)  # never refreshes
    exact = sophia_jax.exact_sophia(3e-4, require_refresh=False)
    contrib = optax.contrib.sophia(3e-4, hessian_diagonal_fn=no_refresh_hessian(),
                                   update_interval=10**9)
    contrib_state = contrib.init(params)
    contrib_state = (contrib_state[0]._replace(nu=hhat, count=jnp.asarray(1, jnp.int32)),
                     *contrib_state[1:])
    ours_state = ours.init(params)._replace(h=hhat)
    cases = {
        "optax.adamw": Loop(_optax_step(adamw), params, adamw.init(params), grads),
        "sophia_jax.sophia (update + apply_updates)": Loop(
            _optax_step(ours), params, ours_state, grads),
        "sophia_jax.exact_sophia (exact params)": Loop(
            lambda p, s, g: exact.apply(g, s, p), params, ours_state, grads),
        "optax.contrib.sophia": Loop(_optax_step(contrib), params, contrib_state, grads),
    }
    table("Jitted update + apply, donated, no refresh", interleaved(cases, repeats),
          "optax.adamw")

    # The refresh's optimizer-side cost: folding a given hhat into h on every
    # step (k = 1) against never; at k = 10 one step in ten pays it.
    every = sophia_jax.sophia(3e-4, hessian_interval=1, require_refresh=False)

    def folding(p, s, g, h):
        updates, s = every.update(g, s, p, sophia_estimator=sophia_jax.HessianDiagonalFn(
            lambda params, key: h))
        return optax.apply_updates(p, updates), s

    medians = interleaved({
        "sophia step, no refresh": Loop(_optax_step(every), params, ours_state, grads),
        "sophia step + EMA fold of a given hhat": Loop(folding, params, ours_state, grads,
                                                       hhat),
    }, repeats)
    table("EMA fold of a given hhat", medians, "sophia step, no refresh")
    extra = medians["sophia step + EMA fold of a given hhat"] / medians[
        "sophia step, no refresh"] - 1
    print(f"EMA fold: {extra:+.1%} of an optimizer step when due, "
          f"{extra / 10:+.1%} amortized at k = 10")


def bench_gnb_refresh(repeats, vocab=8192, width=256, batch=2048):
    """A full training step with and without the Sophia-G refresh."""
    key = jax.random.PRNGKey(3)
    params = {"embed": jax.random.normal(key, (vocab, width)) * 0.02,
              "w1": jax.random.normal(jax.random.fold_in(key, 1), (width, 4 * width)) * 0.02,
              "w2": jax.random.normal(jax.random.fold_in(key, 2), (4 * width, width)) * 0.02,
              "out": jax.random.normal(jax.random.fold_in(key, 3), (width, vocab)) * 0.02}
    tokens = jax.random.randint(jax.random.fold_in(key, 4), (batch + 1,), 0, vocab)
    inputs, targets = tokens[:-1], tokens[1:]

    def logits(p, rows=inputs):
        x = p["embed"][rows]
        return (x + jax.nn.gelu(x @ p["w1"]) @ p["w2"]) @ p["out"]

    def loss(p):
        return optax.softmax_cross_entropy_with_integer_labels(logits(p), targets).mean()

    # Refresh on every step it is asked (the estimator is given only in "given" mode).
    tx = sophia_jax.sophia(3e-4, refresh_when="given", require_refresh=False)

    def plain(p, s):
        updates, s = tx.update(jax.grad(loss)(p), s, p)
        return optax.apply_updates(p, updates), s

    def refreshing(fraction):
        estimator = sophia_jax.GaussNewtonBartlett(logits, inputs=inputs,
                                                   batch_fraction=fraction)

        def step(p, s):
            updates, s = tx.update(jax.grad(loss)(p), s, p, sophia_estimator=estimator)
            return optax.apply_updates(p, updates), s

        return step

    state = tx.init(params)
    names = {1.0: "train step with Sophia-G refresh, whole batch",
             0.25: "train step with Sophia-G refresh, 1/4 batch"}
    base = "train step (grad + update), no refresh"
    medians = interleaved({base: Loop(plain, params, state),
                           **{name: Loop(refreshing(f), params, state)
                              for f, name in names.items()}}, repeats)
    n = sum(x.size for x in jax.tree.leaves(params))
    table(f"Sophia-G refresh, next-token MLP ({n:,} parameters, {batch} tokens, V={vocab})",
          medians, base)
    for fraction, name in names.items():
        extra = medians[name] / medians[base] - 1
        print(f"Sophia-G refresh on {fraction:g} of the batch: {extra:+.1%} of a training step "
              f"when due; refresh share at k = 10: {extra / (10 + extra):.1%}")


def bench_demo(repeats):
    """The refresh share on the demo model, as ``lm_bench.py overhead`` measures it."""
    import argparse as _argparse

    import lm_bench  # docs/benchmarks/, beside this script

    result = lm_bench.overhead(_argparse.Namespace(
        framework="jax", size="default", steps=None, eval_interval=None, repeats=repeats))
    step = result["step_s"]
    print(f"\nSophia-G refresh on the demo model (lm_demo, default size, "
          f"{result['tokens_per_step']} tokens per step, k = {result['k']}, "
          f"GNB on {result['hessian_fraction']:g} of the batch, {result['refreshes']} refreshes)")
    print(f"step: Sophia-G {step['sophia-g'] * 1e3:.0f} ms, AdamW {step['adamw'] * 1e3:.0f} ms; "
          f"refresh step {result['refresh_step_s'] * 1e3:.0f} ms")
    print(f"refresh share of Sophia-G's training time at k = {result['k']}: "
          f"{result['refresh_share']:.1%}; Sophia-G / AdamW time: "
          f"{result['sophia_vs_adamw']:.2f}x")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--quick", action="store_true", help="GPT-2 shapes with width 192")
    parser.add_argument("--demo", action="store_true",
                        help="also the refresh share on the demo model (lm_bench overhead)")
    parser.add_argument("--skip-updates", action="store_true",
                        help="leave out the GPT-2-shape update timings")
    args = parser.parse_args(argv)
    print(f"jax {jax.__version__}, optax {optax.__version__}, {jax.devices()[0].platform}, "
          f"{platform.processor() or platform.machine()}, x64={jax.config.jax_enable_x64}")
    shapes = gpt2_small_shapes(width=192, vocab=12800) if args.quick else gpt2_small_shapes()
    if not args.skip_updates:
        bench_updates(shapes, args.repeats)
    bench_gnb_refresh(args.repeats, **({"vocab": 1024, "width": 64, "batch": 256}
                                         if args.quick else {}))
    if args.demo:
        bench_demo(args.repeats)


if __name__ == "__main__":
    main()
