"""``sophia_torch.SophiaG`` is a drop-in for the authors' ``SophiaG`` (sophia-opt)."""

from __future__ import annotations

import copy

from backend_support import require

torch = require("torch")
import sophia_opt  # noqa: E402  (a test requirement of the torch backend: never skipped)

import sophia_torch  # noqa: E402

F = torch.nn.functional


class TinyLM(torch.nn.Module):
    """Embedding -> MLP -> vocabulary logits: a language model in miniature."""

    def __init__(self, vocab: int = 11, width: int = 16) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, width)
        self.hidden = torch.nn.Linear(width, width)
        self.norm = torch.nn.LayerNorm(width)
        self.head = torch.nn.Linear(width, vocab)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(torch.tanh(self.hidden(self.embed(tokens)))))


def authors_loop(optimizer_class, steps: int, *, interval: int = 10, seed: int = 0):
    """The authors' training loop (train_sophiag.py), reduced to its optimizer calls."""
    torch.manual_seed(seed)
    model = TinyLM()
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    optimizer = optimizer_class(
        [{"params": decay, "weight_decay": 0.2}, {"params": no_decay, "weight_decay": 0.0}],
        lr=3e-3, betas=(0.965, 0.99), rho=0.05,
    )
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=3e-3, total_steps=steps)
    data = torch.Generator().manual_seed(seed + 1)
    sampler = torch.Generator().manual_seed(seed + 2)
    batch, block = 4, 8
    bs = batch * block
    for step in range(steps):
        tokens = torch.randint(0, 11, (batch, block + 1), generator=data)
        logits = model(tokens[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, 11), tokens[:, 1:].reshape(-1))
        loss.backward()
        optimizer.step(bs=bs)
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if step % interval == interval - 1:
            logits = model(tokens[:, :-1])
            probs = F.softmax(logits.reshape(-1, 11), dim=-1)
            sampled = torch.multinomial(probs, 1, generator=sampler).view(-1)
            loss_sampled = F.cross_entropy(logits.reshape(-1, 11), sampled)
            loss_sampled.backward()
            optimizer.update_hessian()
            optimizer.zero_grad(set_to_none=True)
    return model, optimizer


def test_same_trajectory_as_the_authors_over_hundreds_of_steps():
    theirs, their_opt = authors_loop(sophia_opt.SophiaG, 300)
    ours, our_opt = authors_loop(sophia_torch.SophiaG, 300)
    for (name, a), b in zip(theirs.named_parameters(), ours.parameters(), strict=True):
        torch.testing.assert_close(b, a, rtol=2e-5, atol=2e-6, msg=name)
    for a, b in zip(theirs.parameters(), ours.parameters(), strict=True):
        torch.testing.assert_close(our_opt.state[b]["h"], their_opt.state[a]["hessian"],
                                   rtol=1e-5, atol=0)
        # m sums gradients with cancellation: compare at the scale of m.
        their_m = their_opt.state[a]["exp_avg"]
        torch.testing.assert_close(our_opt.state[b]["m"], their_m, rtol=1e-4,
                                   atol=1e-5 * float(their_m.abs().max()))
        assert int(our_opt.state[b]["step"]) == int(their_opt.state[a]["step"]) == 300


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


def test_reads_the_authors_checkpoint():
    _, their_opt = authors_loop(sophia_opt.SophiaG, 20)
    model, our_opt = authors_loop(sophia_torch.SophiaG, 20)
    fresh = sophia_torch.SophiaG(
        [{"params": [p for p in model.parameters() if p.dim() >= 2]},
         {"params": [p for p in model.parameters() if p.dim() < 2]}])
    fresh.load_state_dict(their_opt.state_dict())
    for p in model.parameters():
        assert int(fresh.state[p]["step"]) == 20
        torch.testing.assert_close(fresh.state[p]["h"], our_opt.state[p]["h"], rtol=1e-5, atol=0)


def test_negative_h_is_a_sign_step_not_uphill():
    p = torch.nn.Parameter(torch.zeros(4))
    opt = sophia_torch.SophiaG([p], lr=0.1, weight_decay=0.0)
    opt.update_hessian([torch.full((4,), -100.0)])  # an estimate the authors' code walks uphill on
    p.grad = torch.tensor([1.0, -1.0, 2.0, -2.0])
    opt.step(bs=10)
    torch.testing.assert_close(p.detach(), torch.tensor([-0.1, 0.1, -0.1, 0.1]))
