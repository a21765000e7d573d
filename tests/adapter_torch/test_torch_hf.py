"""Sophia-G inside Hugging Face ``transformers.Trainer`` (sophia_torch.hf).

A tiny ``GPT2LMHeadModel`` built from a ``GPT2Config`` (nothing downloaded),
trained by ``Trainer.train()`` with gradient accumulation: the refresh runs
once per optimizer step when due, padding is masked, and a run resumed from
the Trainer's own checkpoint ends where the uninterrupted run ends.
"""

from __future__ import annotations

import warnings

import pytest
from backend_support import require

torch = require("torch")
import transformers  # noqa: E402  (a test requirement of the torch backend: never skipped)

import sophia_torch  # noqa: E402
from sophia_torch.hf import SophiaTrainer, sophia_of  # noqa: E402

VOCAB, LENGTH = 32, 12


def _model() -> transformers.GPT2LMHeadModel:
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=VOCAB, n_positions=LENGTH, n_embd=16,
                                     n_layer=1, n_head=2)
    return transformers.GPT2LMHeadModel(config)


class Tokens(torch.utils.data.Dataset):
    """Random token sequences; the last three positions of odd ones are padding."""

    def __init__(self, n: int = 64) -> None:
        gen = torch.Generator().manual_seed(1)
        self.ids = torch.randint(0, VOCAB, (n, LENGTH), generator=gen)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        ids = self.ids[i]
        mask = torch.ones(LENGTH, dtype=torch.long)
        labels = ids.clone()
        if i % 2:
            mask[-3:] = 0
            labels[-3:] = -100
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _args(tmp_path, **overrides) -> transformers.TrainingArguments:
    options = dict(output_dir=str(tmp_path), per_device_train_batch_size=4,
                   gradient_accumulation_steps=2, max_steps=12, learning_rate=1e-3,
                   weight_decay=0.1, lr_scheduler_type="constant", logging_strategy="no",
                   save_strategy="no", report_to=[], use_cpu=True, seed=0,
                   dataloader_num_workers=0, disable_tqdm=True)
    options.update(overrides)
    return transformers.TrainingArguments(**options)


def _count_refreshes(monkeypatch) -> list[bool]:
    calls: list[bool] = []
    original = sophia_torch.Sophia.refresh_hessian

    def counting(self, *args, **kwargs):
        done = original(self, *args, **kwargs)
        calls.append(done)
        return done

    monkeypatch.setattr(sophia_torch.Sophia, "refresh_hessian", counting)
    return calls


def test_trainer_runs_the_refresh_inside_train_with_gradient_accumulation(tmp_path, monkeypatch):
    calls = _count_refreshes(monkeypatch)
    model = _model()
    trainer = SophiaTrainer(model=model, args=_args(tmp_path), train_dataset=Tokens(),
                            sophia_kwargs=dict(hessian_interval=5, gamma=0.01))
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="Sophia has taken")  # never silently off
        trainer.train()
    opt = sophia_of(trainer.optimizer)
    assert isinstance(opt, sophia_torch.Sophia)
    assert opt.completed_steps == 12
    # due after 0, 5, 10 steps; 2 micro-batches per step: refreshed on the first
    assert calls == [True, False] * 3
    assert opt.hessian_refreshes == 3
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    for p in model.parameters():
        assert bool(opt.state[p]["h"].abs().sum() > 0)
    assert opt.last_unclipped_share is not None


def test_a_given_sophia_optimizer_is_refreshed_too(tmp_path):
    model = _model()
    opt = sophia_torch.Sophia(model.parameters(), lr=1e-3, hessian_interval=4)
    trainer = SophiaTrainer(model=model, args=_args(tmp_path, gradient_accumulation_steps=1,
                                                    max_steps=9),
                            train_dataset=Tokens(), optimizers=(opt, None))
    trainer.train()
    assert opt.hessian_refreshes == 3 and opt.completed_steps == 9


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_resuming_from_the_trainers_checkpoint_ends_where_the_full_run_ends(tmp_path):
    kwargs = dict(hessian_interval=3, generator=None)
    full = SophiaTrainer(model=_model(), args=_args(tmp_path / "full"), train_dataset=Tokens(),
                         sophia_kwargs=kwargs)
    full.train()

    first = SophiaTrainer(model=_model(), args=_args(tmp_path / "parts", save_strategy="steps",
                                                     save_steps=7),
                          train_dataset=Tokens(), sophia_kwargs=kwargs)
    first.train()
    resumed = SophiaTrainer(model=_model(), args=_args(tmp_path / "parts"),
                            train_dataset=Tokens(), sophia_kwargs=kwargs)
    resumed.train(resume_from_checkpoint=str(tmp_path / "parts" / "checkpoint-7"))
    assert sophia_of(resumed.optimizer).completed_steps == 12
    for a, b in zip(full.model.parameters(), resumed.model.parameters(), strict=True):
        torch.testing.assert_close(b, a, rtol=0, atol=0)


def test_importing_sophia_torch_does_not_import_transformers():
    import subprocess
    import sys

    code = "import sys, sophia_torch; assert 'transformers' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
