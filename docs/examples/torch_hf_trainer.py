"""Sophia-G inside Hugging Face ``transformers.Trainer`` (``sophia_torch.hf``).

    PYTHONPATH=.:backends python docs/examples/torch_hf_trainer.py --steps 60

A tiny GPT-2 built from a ``GPT2Config`` (nothing is downloaded) learns a
noisy repeating token sequence. ``SophiaTrainer`` is a ``Trainer`` whose
optimizer is ``sophia_torch.Sophia`` (with the Trainer's parameter groups
and learning rate) and whose training step runs Sophia-G's Hessian refresh
when it is due: on a quarter of the micro-batch, padding masked by the
labels, once per optimizer step under gradient accumulation.
"""

from __future__ import annotations

import argparse
import tempfile

import torch
import transformers

from sophia_torch.hf import SophiaTrainer, sophia_of


class RepeatingTokens(torch.utils.data.Dataset):
    """Windows of a period-7 sequence with 10 % random tokens."""

    def __init__(self, n: int, length: int, vocab: int, seed: int = 0) -> None:
        gen = torch.Generator().manual_seed(seed)
        base = torch.arange(n + length) * 3 % 7
        noise = torch.randint(0, vocab, (n + length,), generator=gen)
        self.tokens = torch.where(torch.rand(n + length, generator=gen) < 0.1, noise, base)
        self.length = length

    def __len__(self) -> int:
        return len(self.tokens) - self.length

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        ids = self.tokens[i:i + self.length]
        return {"input_ids": ids, "labels": ids.clone()}


def main(argv: list[str] | None = None) -> float:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    args = parser.parse_args(argv)

    vocab, length = 16, 32
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=vocab, n_positions=length, n_embd=32, n_layer=2, n_head=2,
        bos_token_id=0, eos_token_id=0))
    with tempfile.TemporaryDirectory() as out:
        training_args = transformers.TrainingArguments(
            output_dir=out, max_steps=args.steps, per_device_train_batch_size=8,
            gradient_accumulation_steps=2, learning_rate=3e-3, weight_decay=0.1,
            lr_scheduler_type="cosine", logging_steps=max(1, args.steps // 4), report_to=[],
            save_strategy="no", use_cpu=True, disable_tqdm=True)
        trainer = SophiaTrainer(
            model=model, args=training_args, train_dataset=RepeatingTokens(512, length, vocab),
            sophia_kwargs=dict(gamma=2.0, hessian_interval=10))
        result = trainer.train()
    opt = sophia_of(trainer.optimizer)
    print(f"training loss {result.training_loss:.3f}; Hessian refreshes: {opt.hessian_refreshes}; "
          f"unclipped share {opt.last_unclipped_share:.2f}")
    return result.training_loss


if __name__ == "__main__":
    main()
