"""The demo in TensorFlow/Keras: ``keras.optimizers.AdamW`` against
``sophia_tf.SophiaG``, in a custom loop, each step one ``tf.function`` (for
Sophia-G with the Hessian refresh inside, ``sophia_tf.refresh_hessian``).
"""

from __future__ import annotations

import math
import os

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from .common import (  # noqa: E402
    Config,
    RunResult,
    StepResult,
    init_params,
    lr_table,
    run_loop,
)


class LearningRateTable(keras.optimizers.schedules.LearningRateSchedule):
    """The shared per-step learning rates, looked up by the optimizer's step."""

    def __init__(self, table: np.ndarray) -> None:
        self.table = tf.constant(table, dtype=tf.float32)

    def __call__(self, step):
        index = tf.minimum(tf.cast(step, tf.int32), tf.shape(self.table)[0] - 1)
        return tf.gather(self.table, index)

    def get_config(self) -> dict:
        return {"table": self.table.numpy().tolist()}


def layer_norm(x: tf.Tensor, scale: tf.Tensor, eps: float = 1e-5) -> tf.Tensor:
    mean, var = tf.nn.moments(x, axes=[-1], keepdims=True)
    return (x - mean) * tf.math.rsqrt(var + eps) * scale


class GPT(keras.Model):
    """The shared byte-level GPT (see :mod:`lm_demo.common`) as Keras weights."""

    def __init__(self, config: Config) -> None:
        super().__init__()
        self.config = config
        self.w = {}
        for name, value in init_params(config).items():
            self.w[name] = self.add_weight(
                shape=value.shape, initializer=keras.initializers.Constant(value),
                name=name.replace(".", "_"), dtype="float32")
        length = config.context
        self.causal = tf.constant(np.tril(np.ones((length, length), dtype=bool)))

    def call(self, idx: tf.Tensor) -> tf.Tensor:
        c, w = self.config, self.w
        batch, length = tf.shape(idx)[0], idx.shape[1]
        d, heads = c.n_embd, c.n_head
        x = tf.gather(w["wte"], idx) + w["wpe"][:length]
        mask = self.causal[:length, :length]
        for layer in range(c.n_layer):
            p = f"h{layer}."
            a = layer_norm(x, w[p + "ln1"])
            q, k, v = tf.split(a @ w[p + "attn.qkv"], 3, axis=-1)
            q, k, v = (tf.transpose(tf.reshape(t, (batch, length, heads, d // heads)), (0, 2, 1, 3))
                       for t in (q, k, v))
            scores = tf.matmul(q, k, transpose_b=True) / math.sqrt(d // heads)
            scores = tf.where(mask, scores, tf.constant(-1e30, scores.dtype))
            att = tf.matmul(tf.nn.softmax(scores, axis=-1), v)
            att = tf.reshape(tf.transpose(att, (0, 2, 1, 3)), (batch, length, d))
            x = x + att @ w[p + "attn.proj"]
            a = layer_norm(x, w[p + "ln2"])
            x = x + tf.nn.gelu(a @ w[p + "mlp.fc"], approximate=True) @ w[p + "mlp.proj"]
        x = layer_norm(x, w["lnf"])
        return tf.matmul(x, w["wte"], transpose_b=True)


def mean_cross_entropy(logits: tf.Tensor, targets: tf.Tensor) -> tf.Tensor:
    return tf.reduce_mean(
        tf.nn.sparse_softmax_cross_entropy_with_logits(labels=targets, logits=logits))


class Trainer:
    def __init__(self, config: Config, optimizer: str, lr: float) -> None:
        keras.utils.set_random_seed(config.seed)
        self.config = config
        self.sophia = optimizer == "sophia-g"
        self.model = GPT(config)
        self.variables = list(self.model.trainable_variables)
        schedule = LearningRateTable(lr_table(lr, config))
        if self.sophia:
            import sophia_tf

            self.opt = sophia_tf.SophiaG(
                learning_rate=schedule, beta_1=config.sophia_b1, beta_2=config.sophia_b2,
                gamma=config.sophia_gamma, weight_decay=config.sophia_weight_decay,
                hessian_interval=config.hessian_interval,
                hessian_batch_fraction=config.hessian_fraction,
            )
            self.refresh = sophia_tf.refresh_hessian
        else:
            b1, b2 = config.adamw_betas
            self.opt = keras.optimizers.AdamW(
                learning_rate=schedule, beta_1=b1, beta_2=b2, epsilon=1e-8,
                weight_decay=config.adamw_weight_decay)
        self.opt.build(self.variables)
        spec = tf.TensorSpec((config.batch_size, config.context), tf.int32)
        eval_spec = tf.TensorSpec((None, config.context), tf.int32)
        self._step = tf.function(self._train_step, input_signature=[spec, spec])
        self._loss = tf.function(self._eval_loss, input_signature=[eval_spec, eval_spec])

    def _train_step(self, x, y):
        # Sophia-G: the refresh is part of the compiled step, as in fit with
        # sophia_tf.Sequential (GNB on the first hessian_fraction of the rows,
        # labels sampled from the model's logits, seeded by the step count).
        refreshed = (self.refresh(self.model, (x, y), optimizer=self.opt) if self.sophia
                     else tf.constant(False))
        with tf.GradientTape() as tape:
            loss = mean_cross_entropy(self.model(x), y)
        grads = tape.gradient(loss, self.variables)
        self.opt.apply_gradients(zip(grads, self.variables, strict=True))
        return loss, refreshed

    def _eval_loss(self, x, y):
        return mean_cross_entropy(self.model(x), y)

    def warmup(self, x: np.ndarray, y: np.ndarray, chunks: list) -> None:
        """Trace the step without running it (running would train)."""
        self._step.get_concrete_function()

    def step(self, x: np.ndarray, y: np.ndarray, lr: float) -> StepResult:
        loss, refreshed = self._step(tf.constant(x), tf.constant(y))
        return StepResult(float(loss), bool(refreshed))

    def evaluate(self, chunks: list) -> float:
        total = sum(float(self._loss(tf.constant(x), tf.constant(y))) * y.size for x, y in chunks)
        return total / sum(y.size for _, y in chunks)

    def unclipped_share(self) -> float | None:
        """What the optimizer reports: the share at its last refresh."""
        return float(self.opt.unclipped_share.numpy()) if self.sophia else None


def train(config: Config, batches, optimizer: str, lr: float, *, progress: bool = True,
          threads: int | None = None) -> RunResult:
    if threads:
        tf.config.threading.set_intra_op_parallelism_threads(threads)
    trainer = Trainer(config, optimizer, lr)
    result = RunResult(backend="tensorflow", optimizer=optimizer, lr=lr)
    return run_loop(trainer, config, batches, result, progress=progress)

