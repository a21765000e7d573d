"""Sophia-G in a standard PyTorch training loop: one added line.

    PYTHONPATH=.:backends python docs/examples/torch_sophia_g.py --steps 200

A small next-token model (embedding, one hidden layer over a window of
previous tokens, softmax over the vocabulary) on a noisy repeating token
sequence, so the loss falls well below log(vocab). The loop is the usual
forward / backward / step; ``opt.refresh_hessian(model, x, targets=y)``
is the one line Sophia-G adds: every ``hessian_interval`` steps it samples
labels from the model on a quarter of the batch and folds ``N * ghat**2``
into the Hessian EMA; otherwise it does nothing.
"""

from __future__ import annotations

import argparse
import math

import torch
import torch.nn.functional as F

import sophia_torch


def make_data(length: int, vocab: int, seed: int) -> torch.Tensor:
    """A period-7 token sequence with 10 % random tokens."""
    gen = torch.Generator().manual_seed(seed)
    base = torch.arange(length) * 3 % 7 % vocab
    noise = torch.randint(0, vocab, (length,), generator=gen)
    return torch.where(torch.rand(length, generator=gen) < 0.1, noise, base)


class NextToken(torch.nn.Module):
    def __init__(self, vocab: int, context: int, width: int) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, width)
        self.hidden = torch.nn.Linear(context * width, width)
        self.out = torch.nn.Linear(width, vocab)

    def forward(self, windows: torch.Tensor) -> torch.Tensor:
        x = self.embed(windows).flatten(1)
        return self.out(torch.tanh(self.hidden(x)))


def main(argv: list[str] | None = None) -> float:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    vocab, context = 16, 4
    torch.manual_seed(args.seed)
    tokens = make_data(4096, vocab, args.seed)
    model = NextToken(vocab, context, width=32)
    opt = sophia_torch.Sophia(model.parameters(), lr=3e-3, gamma=0.5, weight_decay=0.1,
                              hessian_interval=10)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=args.steps)
    gen = torch.Generator().manual_seed(args.seed + 1)
    for step in range(args.steps):
        starts = torch.randint(0, len(tokens) - context - 1, (args.batch,), generator=gen)
        x = torch.stack([tokens[s:s + context] for s in starts.tolist()])
        y = tokens[starts + context]
        opt.refresh_hessian(model, x, targets=y)   # Sophia-G: the one added line
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad()
        if step % 50 == 0 or step == args.steps - 1:
            print(f"step {step:4d}  loss {loss.item():.3f}  "
                  f"unclipped share {opt.last_unclipped_share:.2f}")
    print(f"log(vocab) = {math.log(vocab):.3f}; Hessian refreshes: {opt.hessian_refreshes}")
    return loss.item()


if __name__ == "__main__":
    main()
