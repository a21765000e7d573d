"""The demo in PyTorch: ``torch.optim.AdamW`` against ``sophia_torch.SophiaG``."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from .common import Config, RunResult, StepResult, init_params, run_loop


class GPT(torch.nn.Module):
    """The shared byte-level GPT (see :mod:`lm_demo.common`)."""

    def __init__(self, config: Config) -> None:
        super().__init__()
        self.config = config
        self.weights = torch.nn.ParameterDict({
            name.replace(".", "_"): torch.nn.Parameter(torch.from_numpy(value))
            for name, value in init_params(config).items()
        })

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        c, w = self.config, self.weights
        batch, length = idx.shape
        d, heads = c.n_embd, c.n_head
        x = w["wte"][idx] + w["wpe"][:length]
        for layer in range(c.n_layer):
            p = f"h{layer}_"
            a = F.layer_norm(x, (d,), weight=w[p + "ln1"])
            q, k, v = (a @ w[p + "attn_qkv"]).split(d, dim=-1)
            q, k, v = (t.view(batch, length, heads, d // heads).transpose(1, 2) for t in (q, k, v))
            att = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            x = x + att.transpose(1, 2).reshape(batch, length, d) @ w[p + "attn_proj"]
            a = F.layer_norm(x, (d,), weight=w[p + "ln2"])
            x = x + F.gelu(a @ w[p + "mlp_fc"], approximate="tanh") @ w[p + "mlp_proj"]
        x = F.layer_norm(x, (d,), weight=w["lnf"])
        return x @ w["wte"].T


def loss_fn(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


class Trainer:
    def __init__(self, config: Config, optimizer: str, lr: float) -> None:
        torch.manual_seed(config.seed)
        self.config = config
        self.model = GPT(config)
        self.params = list(self.model.parameters())
        self.sophia = optimizer == "sophia-g"
        if self.sophia:
            import sophia_torch

            options = {}  # core v2 options, passed only when the config turns them on
            if config.sophia_hessian_bias_correction:
                options["hessian_bias_correction"] = True
            if config.sophia_target_unclipped_share is not None:
                options["target_unclipped_share"] = config.sophia_target_unclipped_share
            self.opt = sophia_torch.Sophia(
                self.params, lr=lr, betas=(config.sophia_b1, config.sophia_b2),
                gamma=config.sophia_gamma, weight_decay=config.sophia_weight_decay,
                hessian_interval=config.hessian_interval,
                hessian_batch_fraction=config.hessian_fraction,
                generator=torch.Generator().manual_seed(config.seed), **options,
            )
        else:
            self.opt = torch.optim.AdamW(
                self.params, lr=lr, betas=config.adamw_betas,
                weight_decay=config.adamw_weight_decay, foreach=True,
            )

    def step(self, x: np.ndarray, y: np.ndarray, lr: float) -> StepResult:
        for group in self.opt.param_groups:
            group["lr"] = lr
        x, y = torch.from_numpy(x), torch.from_numpy(y).long()
        # Sophia-G: when due, hhat = N * ghat**2 at labels sampled from the
        # model, on the first quarter of this batch's sequences.
        refreshed = self.sophia and self.opt.refresh_hessian(self.model, x, targets=y)
        loss = loss_fn(self.model(x), y)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        return StepResult(loss.item(), refreshed)

    @torch.no_grad()
    def evaluate(self, chunks: list) -> float:
        total, count = 0.0, 0
        for x, y in chunks:
            logits = self.model(torch.from_numpy(x))
            total += loss_fn(logits, torch.from_numpy(y).long()).item() * y.size
            count += y.size
        return total / count

    def unclipped_share(self) -> float | None:
        return self.opt.last_unclipped_share if self.sophia else None


def train(config: Config, batches, optimizer: str, lr: float, *, progress: bool = True,
          threads: int | None = None) -> RunResult:
    if threads:
        torch.set_num_threads(threads)
    trainer = Trainer(config, optimizer, lr)
    result = RunResult(backend="torch", optimizer=optimizer, lr=lr)
    return run_loop(trainer, config, batches, result, progress=progress)

