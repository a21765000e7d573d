"""``sophia_torch.SophiaG`` is a drop-in for the authors' ``SophiaG`` (sophia-opt).

Same signature, same loop, same state keys (``exp_avg``, ``hessian``, tensor
``step``), checkpoints that load both ways, and the same trajectory to
float32 rounding per step, from the start or from either's checkpoint.
"""

from __future__ import annotations

import copy
import io

import pytest
from backend_support import require

torch = require("torch")
import sophia_opt  # noqa: E402  (a test requirement of the torch backend: never skipped)

import sophia_torch  # noqa: E402

F = torch.nn.functional
VOCAB = 11


class TinyLM(torch.nn.Module):
    """Embedding -> MLP -> vocabulary logits: a language model in miniature."""

    def __init__(self, vocab: int = VOCAB, width: int = 16) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, width)
        self.hidden = torch.nn.Linear(width, width)
        self.norm = torch.nn.LayerNorm(width)
        self.head = torch.nn.Linear(width, vocab)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(torch.tanh(self.hidden(self.embed(tokens)))))


class AuthorsLoop:
    """The authors' training loop (train_sophiag.py), reduced to its optimizer
    calls, with checkpoints of everything it depends on."""

    batch, block, interval = 4, 8, 10

    def __init__(self, optimizer_class, *, total_steps: int = 300, seed: int = 0) -> None:
        torch.manual_seed(seed)
        self.model = TinyLM()
        decay = [p for p in self.model.parameters() if p.dim() >= 2]
        no_decay = [p for p in self.model.parameters() if p.dim() < 2]
        self.optimizer = optimizer_class(
            [{"params": decay, "weight_decay": 0.2}, {"params": no_decay, "weight_decay": 0.0}],
            lr=3e-3, betas=(0.965, 0.99), rho=0.05,
        )
        self.scheduler = torch.optim.lr_scheduler.OneCycleLR(self.optimizer, max_lr=3e-3,
                                                             total_steps=total_steps)
        self.data = torch.Generator().manual_seed(seed + 1)
        self.sampler = torch.Generator().manual_seed(seed + 2)
        self.iter_num = 0

    def run(self, steps: int) -> None:
        optimizer, bs = self.optimizer, self.batch * self.block
        for _ in range(steps):
            tokens = torch.randint(0, VOCAB, (self.batch, self.block + 1), generator=self.data)
            logits = self.model(tokens[:, :-1])
            loss = F.cross_entropy(logits.reshape(-1, VOCAB), tokens[:, 1:].reshape(-1))
            loss.backward()
            optimizer.step(bs=bs)
            self.scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            if self.iter_num % self.interval == self.interval - 1:
                logits = self.model(tokens[:, :-1])
                probs = F.softmax(logits.reshape(-1, VOCAB), dim=-1)
                sampled = torch.multinomial(probs, 1, generator=self.sampler).view(-1)
                F.cross_entropy(logits.reshape(-1, VOCAB), sampled).backward()
                optimizer.update_hessian()
                optimizer.zero_grad(set_to_none=True)
            self.iter_num += 1

    def checkpoint(self) -> bytes:
        buffer = io.BytesIO()
        torch.save({"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                    "scheduler": self.scheduler.state_dict(), "iter_num": self.iter_num,
                    "data": self.data.get_state(), "sampler": self.sampler.get_state()}, buffer)
        return buffer.getvalue()

    def restore(self, blob: bytes) -> None:
        saved = torch.load(io.BytesIO(blob), weights_only=True)
        self.model.load_state_dict(saved["model"])
        self.optimizer.load_state_dict(saved["optimizer"])
        self.scheduler.load_state_dict(saved["scheduler"])
        self.iter_num = saved["iter_num"]
        self.data.set_state(saved["data"])
        self.sampler.set_state(saved["sampler"])


def assert_same_trajectory(ours: AuthorsLoop, theirs: AuthorsLoop, steps: int) -> None:
    """Parameters and state equal to float32 rounding accumulated over ``steps``."""
    rtol = 2e-5 * max(1, steps / 300)
    for (name, a), b in zip(theirs.model.named_parameters(), ours.model.parameters(),
                            strict=True):
        torch.testing.assert_close(b, a, rtol=rtol, atol=rtol / 10, msg=name)
        mine, their = ours.optimizer.state[b], theirs.optimizer.state[a]
        torch.testing.assert_close(mine["hessian"], their["hessian"], rtol=1e-5, atol=0)
        # m sums gradients with cancellation: compare at the scale of m.
        scale = float(their["exp_avg"].abs().max())
        torch.testing.assert_close(mine["exp_avg"], their["exp_avg"], rtol=1e-4,
                                   atol=1e-5 * scale)
        assert int(mine["step"]) == int(their["step"])


@pytest.mark.filterwarnings("ignore:Sophia is running as sign momentum")  # their settings here
def test_same_trajectory_as_the_authors_over_hundreds_of_steps():
    theirs, ours = AuthorsLoop(sophia_opt.SophiaG), AuthorsLoop(sophia_torch.SophiaG)
    theirs.run(300)
    ours.run(300)
    assert_same_trajectory(ours, theirs, 300)


def test_their_state_keys_so_their_logging_works():
    """train_sophiag.py logs from ``state['hessian']`` and ``state['exp_avg']``."""
    loop = AuthorsLoop(sophia_torch.SophiaG)
    loop.run(12)
    for p in loop.model.parameters():
        state = loop.optimizer.state[p]
        assert {"exp_avg", "hessian", "step"} <= set(state)
        assert torch.is_tensor(state["step"]) and int(state["step"]) == 12
        hessian_norm = state["hessian"].norm().item()  # as their logging computes it
        assert hessian_norm > 0


@pytest.mark.parametrize(("first", "then"), [("authors", "ours"), ("ours", "authors")])
def test_checkpoints_load_both_ways_and_training_goes_on_the_same(first, then):
    """A checkpoint written by one class, loaded into the other, continues as
    the writer would have (the authors' checkpoints have no eps or
    clip_threshold; ours have more keys than theirs know)."""
    classes = {"authors": sophia_opt.SophiaG, "ours": sophia_torch.SophiaG}
    writer = AuthorsLoop(classes[first])
    writer.run(25)
    blob = writer.checkpoint()
    reader = AuthorsLoop(classes[then])
    reader.restore(blob)
    writer.run(40)
    reader.run(40)
    ours, theirs = (reader, writer) if then == "ours" else (writer, reader)
    assert_same_trajectory(ours, theirs, 65)


def test_same_signature_and_defaults():
    model = torch.nn.Linear(3, 2)
    theirs = sophia_opt.SophiaG(model.parameters())
    ours = sophia_torch.SophiaG(model.parameters())
    for key in ("lr", "betas", "rho", "weight_decay", "maximize", "capturable"):
        assert ours.defaults[key] == theirs.defaults[key], key
    assert isinstance(ours, torch.optim.Optimizer)


def test_one_step_is_bitwise_where_no_rounding_differs():
    # h = 0 before the first refresh: both divide by 1e-15 and take the sign step.
    torch.manual_seed(0)
    model = torch.nn.Linear(5, 3)
    twin = copy.deepcopy(model)
    theirs = sophia_opt.SophiaG(model.parameters(), lr=1e-2)
    ours = sophia_torch.SophiaG(twin.parameters(), lr=1e-2)
    x = torch.randn(7, 5)
    for m in (model, twin):
        m(x).square().mean().backward()
    theirs.step(bs=64)
    ours.step(bs=64)
    for a, b in zip(model.parameters(), twin.parameters(), strict=True):
        assert torch.equal(a, b)


def test_reads_sophia_torch_0_1_checkpoints():
    """0.1 saved ``m``/``h`` and float32 steps; they load as ``exp_avg``/``hessian``."""
    loop = AuthorsLoop(sophia_torch.SophiaG)
    loop.run(15)
    saved = loop.optimizer.state_dict()
    old = copy.deepcopy(saved)
    for state in old["state"].values():
        state["m"], state["h"] = state.pop("exp_avg"), state.pop("hessian")
        state["step"] = state["step"].float()
    for group in old["param_groups"]:
        for key in ("compiled", "hessian_bias_correction", "target_unclipped_share"):
            group.pop(key)
        group["fused"] = False
    other = AuthorsLoop(sophia_torch.SophiaG)
    other.optimizer.load_state_dict(old)
    for p, q in zip(loop.model.parameters(), other.model.parameters(), strict=True):
        for key in ("exp_avg", "hessian"):
            assert torch.equal(loop.optimizer.state[p][key], other.optimizer.state[q][key])
        assert other.optimizer.state[q]["step"].dtype == torch.float64
    assert other.optimizer.param_groups[0]["compiled"] is False


def test_negative_h_is_a_sign_step_not_uphill():
    p = torch.nn.Parameter(torch.zeros(4))
    opt = sophia_torch.SophiaG([p], lr=0.1, weight_decay=0.0)
    opt.update_hessian([torch.full((4,), -100.0)])  # an estimate the authors' code walks uphill on
    p.grad = torch.tensor([1.0, -1.0, 2.0, -2.0])
    opt.step(bs=10)
    torch.testing.assert_close(p.detach(), torch.tensor([-0.1, 0.1, -0.1, 0.1]))


def test_refresh_hessian_folds_in_their_scale():
    """``SophiaG.refresh_hessian`` folds N ghat**2 / N_batch: with ``step(bs=N_batch)``
    the denominator is what ``Sophia`` computes from the same estimate."""
    torch.manual_seed(0)
    model, twin = TinyLM(), TinyLM()
    twin.load_state_dict(model.state_dict())
    theirs = sophia_torch.SophiaG(model.parameters(), refresh_at_start=True,
                                  generator=torch.Generator().manual_seed(5))
    ours = sophia_torch.Sophia(twin.parameters(), generator=torch.Generator().manual_seed(5))
    tokens = torch.randint(0, VOCAB, (8, 9), generator=torch.Generator().manual_seed(1))
    assert theirs.refresh_hessian(model, tokens[:, :-1], targets=tokens[:, 1:])
    assert ours.refresh_hessian(twin, tokens[:, :-1], targets=tokens[:, 1:])
    batch_positions = tokens[:, 1:].numel()
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(theirs.state[p]["hessian"] * batch_positions,
                                   ours.state[q]["h"], rtol=1e-6, atol=0)
