"""The demo in JAX: ``optax.adamw`` against ``sophia_jax.sophia`` (Sophia-G).

The model is a pure function of a dict of arrays; the training step (with
the Hessian refresh inside, when due) and the evaluation are each one
``jax.jit``-compiled function.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

from .common import Config, RunResult, StepResult, init_params, lr_table, run_loop


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
                key=config.seed,
            )
        else:
            b1, b2 = config.adamw_betas
            self.tx = optax.adamw(schedule, b1=b1, b2=b2, eps=1e-8,
                                  weight_decay=config.adamw_weight_decay)
        self.state = self.tx.init(self.params)

        def loss_fn(params, x, y):
            return mean_cross_entropy(forward(params, x, config), y)

        def step(params, state, x, y):
            loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
            extra = {}
            if self.sophia:
                import sophia_jax

                # Sophia-G, evaluated inside the optimizer's refresh branch only
                # (one step in k): labels sampled from the model on the first
                # hessian_fraction of this batch's sequences.
                extra["sophia_estimator"] = sophia_jax.GaussNewtonBartlett(
                    lambda p, xb: forward(p, xb, config), inputs=x,
                    batch_fraction=config.hessian_fraction)
            updates, state = self.tx.update(grads, state, params, **extra)
            return optax.apply_updates(params, updates), state, loss

        # One compiled step; parameters and state are donated (updated in place).
        self._step = jax.jit(step, donate_argnums=(0, 1))
        self._loss = jax.jit(loss_fn)

    def _refreshes(self) -> int:
        import sophia_jax

        return int(sophia_jax.sophia_state(self.state).hessian_refreshes)

    def warmup(self, x: np.ndarray, y: np.ndarray, chunks: list) -> None:
        """Compile every function once, on copies (the step donates its inputs)."""
        copies = jax.tree.map(jnp.copy, (self.params, self.state))
        jax.block_until_ready(self._step(*copies, x, y))
        for cx, cy in chunks[:1] + chunks[-1:]:
            jax.block_until_ready(self._loss(self.params, cx, cy))

    def step(self, x: np.ndarray, y: np.ndarray, lr: float) -> StepResult:
        # lr comes from the schedule inside the optimizer (same table).
        before = self._refreshes() if self.sophia else 0
        self.params, self.state, loss = self._step(self.params, self.state, x, y)
        loss = float(loss)
        return StepResult(loss, self.sophia and self._refreshes() > before)

    def evaluate(self, chunks: list) -> float:
        total = sum(float(self._loss(self.params, x, y)) * y.size for x, y in chunks)
        return total / sum(y.size for _, y in chunks)

    def unclipped_share(self) -> float | None:
        """The share the optimizer measured at its last refresh."""
        if not self.sophia:
            return None
        import sophia_jax

        return float(sophia_jax.sophia_state(self.state).unclipped_share)


def train(config: Config, batches, optimizer: str, lr: float, *, progress: bool = True,
          threads: int | None = None) -> RunResult:
    trainer = Trainer(config, optimizer, lr)
    result = RunResult(backend="jax", optimizer=optimizer, lr=lr)
    return run_loop(trainer, config, batches, result, progress=progress)

