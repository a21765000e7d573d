"""The demo in JAX: ``optax.adamw`` against ``sophia_jax.sophia`` (Sophia-G).

The model is a pure function of a dict of arrays; the step, the Hessian
refresh and the evaluation are each one ``jax.jit``-compiled function.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

import sophia_core

from .common import Config, RunResult, StepResult, init_params, lr_table, refresh_rows, run_loop


def layer_norm(x: jax.Array, scale: jax.Array, eps: float = 1e-5) -> jax.Array:
    mean = jnp.mean(x, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(var + eps) * scale


def forward(params: dict, idx: jax.Array, config: Config) -> jax.Array:
    """Logits of the shared byte-level GPT (see :mod:`lm_demo.common`)."""
    batch, length = idx.shape
    d, heads = config.n_embd, config.n_head
    x = params["wte"][idx] + params["wpe"][:length]
    for layer in range(config.n_layer):
        p = f"h{layer}."
        a = layer_norm(x, params[p + "ln1"])
        q, k, v = jnp.split(a @ params[p + "attn.qkv"], 3, axis=-1)
        q, k, v = (t.reshape(batch, length, heads, d // heads) for t in (q, k, v))
        att = jax.nn.dot_product_attention(q, k, v, is_causal=True)
        x = x + att.reshape(batch, length, d) @ params[p + "attn.proj"]
        a = layer_norm(x, params[p + "ln2"])
        x = x + jax.nn.gelu(a @ params[p + "mlp.fc"], approximate=True) @ params[p + "mlp.proj"]
    x = layer_norm(x, params["lnf"])
    return x @ params["wte"].T


def mean_cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
    return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()


class Trainer:
    def __init__(self, config: Config, optimizer: str, lr: float) -> None:
        self.config = config
        self.sophia = optimizer == "sophia-g"
        self.params = {k: jnp.asarray(v) for k, v in init_params(config).items()}
        lrs = jnp.asarray(lr_table(lr, config), dtype=jnp.float32)

        def schedule(count):
            return lrs[jnp.minimum(count, config.steps - 1)]

        if self.sophia:
            import sophia_jax

            self.tx = sophia_jax.sophia(
                schedule, b1=config.sophia_b1, b2=config.sophia_b2, gamma=config.sophia_gamma,
                weight_decay=config.sophia_weight_decay, hessian_interval=config.hessian_interval,
            )
        else:
            b1, b2 = config.adamw_betas
            self.tx = optax.adamw(schedule, b1=b1, b2=b2, eps=1e-8,
                                  weight_decay=config.adamw_weight_decay)
        self.state = self.tx.init(self.params)
        self.key = jax.random.key(config.seed)
        self.completed = 0

        def loss_fn(params, x, y):
            return mean_cross_entropy(forward(params, x, config), y)

        def step(params, state, x, y, hhat):
            loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
            extra = {} if hhat is None else {"hhat": hhat}
            updates, state = self.tx.update(grads, state, params, **extra)
            return optax.apply_updates(params, updates), state, loss

        def gnb(params, x, key):
            """Sophia-G's hhat = N * ghat**2 at labels sampled from the model."""
            import sophia_jax

            return sophia_jax.estimate_hessian(
                params, key, {"logits_fn": lambda p: forward(p, x, config)},
                probe="gaussian", n_probes=1)

        self._step = jax.jit(step)
        self._gnb = jax.jit(gnb)
        self._loss = jax.jit(loss_fn)

    def warmup(self, x: np.ndarray, y: np.ndarray, chunks: list) -> None:
        """Compile every function once; the results are discarded (pure functions)."""
        jax.block_until_ready(self._step(self.params, self.state, x, y, None))
        if self.sophia:
            _, key = jax.random.split(self.key)
            hhat = self._gnb(self.params, x[: refresh_rows(len(x), self.config)], key)
            jax.block_until_ready(self._step(self.params, self.state, x, y, hhat))
        for cx, cy in chunks[:1] + chunks[-1:]:
            jax.block_until_ready(self._loss(self.params, cx, cy))

    def step(self, x: np.ndarray, y: np.ndarray, lr: float) -> StepResult:
        # lr comes from the schedule inside the optimizer (same table).
        refreshed = self.sophia and bool(sophia_core.refresh_due(
            self.completed, hessian_interval=self.config.hessian_interval))
        hhat = None  # None: no refresh (a separate compilation)
        if refreshed:
            self.key, key = jax.random.split(self.key)
            hhat = self._gnb(self.params, x[: refresh_rows(len(x), self.config)], key)
        self.params, self.state, loss = self._step(self.params, self.state, x, y, hhat)
        self.completed += 1
        return StepResult(float(loss), refreshed)

    def evaluate(self, chunks: list) -> float:
        total = sum(float(self._loss(self.params, x, y)) * y.size for x, y in chunks)
        return total / sum(y.size for _, y in chunks)

    def unclipped_share(self) -> float | None:
        if not self.sophia:
            return None
        import sophia_jax

        s = sophia_jax.sophia_state(self.state)
        c = self.config
        return float(sophia_core.unclipped_share(
            jax.tree.leaves(s.m), jax.tree.leaves(s.h), gamma=c.sophia_gamma, eps=1e-12,
            clip_threshold=1.0, xp=jnp))


def train(config: Config, batches, optimizer: str, lr: float, *, progress: bool = True,
          threads: int | None = None) -> RunResult:
    trainer = Trainer(config, optimizer, lr)
    result = RunResult(backend="jax", optimizer=optimizer, lr=lr)
    return run_loop(trainer, config, batches, result, progress=progress)

