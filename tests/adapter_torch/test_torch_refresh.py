"""Sophia-G in a standard loop: ``opt.refresh_hessian(model, inputs)``, and
what happens around a refresh (counters, non-finite estimates, the Hessian's
bias correction, gamma from a target share, the two warnings)."""

from __future__ import annotations

import io
import math
import types
import warnings

import pytest
from backend_support import require

torch = require("torch")
import sophia_core  # noqa: E402
import sophia_torch  # noqa: E402

F = torch.nn.functional
VOCAB = 13


class TinyLM(torch.nn.Module):
    """Records the batch size of every forward."""

    def __init__(self, output: str = "tensor") -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = torch.nn.Embedding(VOCAB, 8)
        self.head = torch.nn.Linear(8, VOCAB)
        self.output = output
        self.batches: list[int] = []

    def forward(self, tokens: torch.Tensor, scale: torch.Tensor | None = None):
        self.batches.append(tokens.shape[0])
        logits = self.head(torch.tanh(self.embed(tokens)))
        if scale is not None:
            logits = logits * scale[:, None, None]
        if self.output == "object":
            return types.SimpleNamespace(logits=logits, loss=None)
        if self.output == "tuple":
            return (logits, None)
        return logits


def _batch(seed: int = 0, batch: int = 8, length: int = 6) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (batch, length + 1), generator=gen)


def _loss(logits, targets):
    return F.cross_entropy(logits.reshape(-1, VOCAB), targets.reshape(-1), ignore_index=-100)


def test_refreshes_when_due_once_per_step_on_a_fraction_of_the_rows():
    model = TinyLM()
    opt = sophia_torch.Sophia(model.parameters(), hessian_interval=3)
    refreshed = []
    for t in range(7):
        tokens = _batch(t)
        x, y = tokens[:, :-1], tokens[:, 1:]
        model.batches.clear()
        loss = _loss(model(x), y)
        did = opt.refresh_hessian(model, x, targets=y)
        assert not opt.refresh_hessian(model, x, targets=y)  # at most once per step
        refreshed.append(did)
        assert model.batches == ([8, sophia_core.estimate_rows(8, 0.25)] if did else [8])
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert refreshed == [t % 3 == 0 for t in range(7)]
    assert opt.hessian_refreshes == 3


def test_refreshes_from_inside_no_grad_too():
    model = TinyLM()
    opt = sophia_torch.Sophia(model.parameters())
    tokens = _batch(3)
    with torch.no_grad():
        assert opt.refresh_hessian(model, tokens[:, :-1], targets=tokens[:, 1:])
    assert all(bool(opt.state[p]["h"].abs().sum() > 0) for p in model.parameters())


def test_gradient_accumulation_refreshes_on_the_first_micro_batch_only():
    model = TinyLM()
    opt = sophia_torch.Sophia(model.parameters(), hessian_interval=2)
    calls = []
    for _ in range(4):
        for micro in range(3):
            tokens = _batch(micro)
            x, y = tokens[:, :-1], tokens[:, 1:]
            loss = _loss(model(x), y) / 3
            calls.append(opt.refresh_hessian(model, x, targets=y))
            loss.backward()
        opt.step()
        opt.zero_grad()
    assert calls == [True, False, False, False, False, False] * 2
    assert opt.hessian_refreshes == 2


@pytest.mark.parametrize("output", ["tensor", "object", "tuple"])
def test_the_estimate_is_gnb_on_the_first_rows_with_masked_targets(output):
    """h after the first fold is (1-b2) * gnb_hessian on the same rows, mask
    and noise; p.grad is not touched; other batched arguments are sliced too."""
    model = TinyLM(output)
    opt = sophia_torch.Sophia(model.parameters(), hessian_batch_fraction=0.5,
                              generator=torch.Generator().manual_seed(3))
    tokens = _batch(1)
    x, y = tokens[:, :-1], tokens[:, 1:].clone()
    y[0, :3] = -100  # e.g. a prompt
    y[2, -2:] = -100  # e.g. padding
    scale = torch.linspace(0.5, 1.5, 8)
    for p in model.parameters():
        p.grad = torch.full_like(p, 7.0)
    assert opt.refresh_hessian(model, x, targets=y, scale=scale)
    assert all(bool((p.grad == 7.0).all()) for p in model.parameters())

    rows = sophia_core.estimate_rows(8, 0.5)
    model.output = "tensor"
    logits = model(x[:rows], scale[:rows])
    noise = torch.rand(logits.shape, generator=torch.Generator().manual_seed(3))
    expected = sophia_torch.gnb_hessian(logits, list(model.parameters()), mask=y[:rows] != -100,
                                        uniform=noise)
    for p, hhat in zip(model.parameters(), expected, strict=True):
        torch.testing.assert_close(opt.state[p]["h"], (1 - 0.99) * hhat, rtol=1e-6, atol=0)


def test_shifted_targets_for_models_that_shift_inside():
    """Hugging Face causal LMs: logits[t] predicts targets[t+1]."""
    model = TinyLM()
    opt = sophia_torch.Sophia(model.parameters(), hessian_batch_fraction=1.0,
                              generator=torch.Generator().manual_seed(3))
    tokens = _batch(2)
    labels = tokens.clone()
    labels[:, :4] = -100
    assert opt.refresh_hessian(model, tokens, targets=labels, shift_targets=True)
    logits = model(tokens)[:, :-1]
    noise = torch.rand(logits.shape, generator=torch.Generator().manual_seed(3))
    expected = sophia_torch.gnb_hessian(logits, list(model.parameters()),
                                        mask=labels[:, 1:] != -100, uniform=noise)
    for p, hhat in zip(model.parameters(), expected, strict=True):
        torch.testing.assert_close(opt.state[p]["h"], (1 - 0.99) * hhat, rtol=1e-6, atol=0)


def _steps(opt, params, n: int) -> list[warnings.WarningMessage]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(n):
            for p in params:
                p.grad = torch.ones_like(p)
            if isinstance(opt, sophia_torch.SophiaG):
                opt.step(bs=4)
            else:
                opt.step()
    return [w for w in caught if issubclass(w.category, UserWarning)]


@pytest.mark.parametrize(("cls", "first_warning"), [(sophia_torch.Sophia, 5),
                                                   (sophia_torch.SophiaG, 9)])
def test_never_silently_off_warns_once_when_no_estimate_ever_came(cls, first_warning):
    """k=4: Sophia's first refresh is due at 0, the authors' (SophiaG) at 4;
    more than k steps past that with no fold warns, once, naming the fix."""
    params = [torch.nn.Parameter(torch.zeros(3))]
    opt = cls(params, hessian_interval=4)
    assert not _steps(opt, params, first_warning - 1)
    caught = _steps(opt, params, 20)
    assert len(caught) == 1
    text = str(caught[0].message)
    assert "refresh_hessian" in text and "require_refresh=False" in text
    assert caught[0].filename == __file__  # attributed to the caller, not this package

    quiet = cls([torch.nn.Parameter(torch.zeros(3))], hessian_interval=4, require_refresh=False)
    assert not _steps(quiet, quiet.param_groups[0]["params"], 30)


def test_sign_momentum_regime_warns_once_and_exposes_the_share():
    params = [torch.nn.Parameter(torch.zeros(50))]
    opt = sophia_torch.Sophia(params, gamma=1e-9, hessian_interval=1)  # every step clipped
    caught = []
    for _ in range(40):
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            opt.update_hessian([torch.ones(50)])
        caught += w
        params[0].grad = torch.ones(50)
        opt.step()
    assert len(caught) == 1 and "sign momentum" in str(caught[0].message)
    assert opt.last_unclipped_share == 0.0
    assert opt.sign_momentum_streak >= sophia_core.SIGN_MOMENTUM_PATIENCE
    quiet = sophia_torch.Sophia([torch.nn.Parameter(torch.zeros(5))], gamma=1e-9,
                                hessian_interval=1, warn_sign_momentum=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(40):
            quiet.update_hessian([torch.ones(5)])
            quiet.param_groups[0]["params"][0].grad = torch.ones(5)
            quiet.step()


def test_non_finite_estimates_keep_the_old_h_and_are_counted_and_saved():
    params = [torch.nn.Parameter(torch.zeros(4)), torch.nn.Parameter(torch.zeros(2, 3))]
    opt = sophia_torch.Sophia(params, warn_sign_momentum=False)
    opt.update_hessian([torch.ones(4), torch.ones(2, 3)])
    before = [opt.state[p]["h"].clone() for p in params]
    bad = torch.tensor([float("nan"), 1.0, float("inf"), 3e38])
    opt.update_hessian([bad, torch.full((2, 3), -float("inf"))])
    h0 = opt.state[params[0]]["h"]
    assert torch.equal(h0[[0, 2]], before[0][[0, 2]])
    assert h0[1] == 0.99 * before[0][1] + 0.01 * 1.0
    assert torch.equal(opt.state[params[1]]["h"], before[1])
    assert opt.rejected_hessian_coordinates == 2 + 6
    assert opt.hessian_refreshes == 2
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    other = sophia_torch.Sophia([torch.nn.Parameter(torch.zeros(4)),
                                 torch.nn.Parameter(torch.zeros(2, 3))])
    other.load_state_dict(torch.load(buffer, weights_only=True))
    assert other.rejected_hessian_coordinates == 8 and other.hessian_refreshes == 2


def test_hessian_bias_correction_sets_h_at_the_first_refresh():
    p = torch.nn.Parameter(torch.zeros(3))
    opt = sophia_torch.Sophia([p], betas=(0.9, 0.99), hessian_bias_correction=True)
    first, second = torch.tensor([1.0, 2.0, 3.0]), torch.tensor([3.0, 2.0, 1.0])
    opt.update_hessian([first])
    assert torch.equal(opt.state[p]["h"], first)
    opt.update_hessian([second])
    decay = 1 - 0.01 / (1 - 0.99**2)
    expected = sophia_core.fold_hessian(first, second, b2=0.99, refresh=2,
                                        bias_correction=True).h
    assert torch.equal(opt.state[p]["h"], expected)
    torch.testing.assert_close(expected, decay * first + (1 - decay) * second)


def test_gamma_follows_a_target_unclipped_share_and_is_saved():
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(400)), torch.nn.Parameter(torch.randn(30, 20))]
    opt = sophia_torch.Sophia(params, lr=1e-3, gamma=0.04, target_unclipped_share=0.3,
                              hessian_interval=1)
    gen = torch.Generator().manual_seed(1)
    for _ in range(5):
        opt.update_hessian([torch.rand(p.shape, generator=gen) for p in params])
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen)
        opt.step()
    gamma = opt.param_groups[0]["gamma"]
    assert gamma != 0.04 and math.isfinite(gamma)
    ms = [opt.state[p]["m"] for p in params]
    opt.update_hessian([torch.zeros_like(p) for p in params])  # refresh: gamma re-set
    hs = [opt.state[p]["h"] for p in params]
    expected = float(sophia_core.gamma_for_unclipped_share(
        ms, hs, target=0.3, gamma=gamma, clip_threshold=1.0, b1=0.965, step=5))
    assert opt.param_groups[0]["gamma"] == expected
    assert abs(opt.last_unclipped_share - 0.3) < 0.01
    other = sophia_torch.Sophia([torch.nn.Parameter(torch.zeros(400)),
                                 torch.nn.Parameter(torch.zeros(30, 20))],
                                target_unclipped_share=0.3)
    other.load_state_dict(opt.state_dict())
    assert other.param_groups[0]["gamma"] == expected


def test_sophia_h_refreshes_in_the_loop_from_the_loss():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    opt = sophia_torch.SophiaH(model.parameters(), hessian_interval=2)
    did = []
    for _ in range(5):
        loss = F.cross_entropy(model(torch.randn(6, 4)), torch.zeros(6, dtype=torch.long))
        did.append(opt.refresh_hessian(loss))
        assert not opt.refresh_hessian(loss)
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert did == [True, False, True, False, True] and opt.hessian_refreshes == 3
