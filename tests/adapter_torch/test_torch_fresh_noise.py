"""Successive Hessian refreshes draw fresh noise (issue 15 item 6).

Two refreshes on the same batch at the same parameters must differ: Sophia-G
samples new labels, Sophia-H new probes, from the one generator that advances.
With ``lr=0`` the parameters stay put and with ``b2=0`` ``h`` is the latest
estimate. The same seed must give the same sequence (so the differences are
not mere nondeterminism).
"""

from __future__ import annotations

import pytest
from backend_support import require

torch = require("torch")
import sophia_torch  # noqa: E402

F = torch.nn.functional
VOCAB, REFRESHES = 7, 3


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Embedding(VOCAB, 4), torch.nn.Tanh(),
                               torch.nn.Linear(4, VOCAB))


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    tokens = torch.randint(0, VOCAB, (4, 6), generator=torch.Generator().manual_seed(1))
    return tokens[:, :-1], tokens[:, 1:]


def _loss(model, x, y):
    return F.cross_entropy(model(x).reshape(-1, VOCAB), y.reshape(-1))


def _options(name: str, seed: int) -> dict:
    common = dict(lr=0.0, betas=(0.9, 0.0), weight_decay=0.0, hessian_interval=1,
                  refresh_at_start=True, generator=torch.Generator().manual_seed(seed))
    return {**common, "hessian_batch_fraction": 1.0} if name != "SophiaH" else common


def _hessians(name: str, seed: int = 5) -> list[list[torch.Tensor]]:
    """``h`` after each of REFRESHES refreshes on one batch, through the optimizer."""
    model, (x, y) = _model(), _batch()
    before = [p.detach().clone() for p in model.parameters()]
    opt = getattr(sophia_torch, name)(model.parameters(), **_options(name, seed))
    seen = []
    for _ in range(REFRESHES):
        loss = _loss(model, x, y)
        if name == "SophiaH":
            assert opt.refresh_hessian(loss)
        else:
            assert opt.refresh_hessian(model, x, targets=y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        seen.append([opt.state[p][opt.hessian_key].clone() for p in model.parameters()])
    assert opt.hessian_refreshes == REFRESHES
    for p, q in zip(model.parameters(), before, strict=True):
        assert torch.equal(p, q)  # lr=0: every refresh sees the same parameters
    return seen


def _same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return all(torch.equal(u, v) for u, v in zip(a, b, strict=True))


NAMES = ["Sophia", "SophiaG", "SophiaH"]


@pytest.mark.parametrize("name", NAMES)
def test_successive_refreshes_on_one_batch_draw_fresh_noise(name):
    seen = _hessians(name)
    for earlier in range(REFRESHES):
        assert all(torch.isfinite(h).all() for h in seen[earlier])
        for later in range(earlier + 1, REFRESHES):
            assert not _same(seen[earlier], seen[later]), (earlier, later)


@pytest.mark.parametrize("name", NAMES)
def test_the_same_seed_gives_the_same_sequence_and_another_seed_another(name):
    seen = _hessians(name)
    assert all(_same(a, b) for a, b in zip(seen, _hessians(name), strict=True))
    assert not _same(seen[0], _hessians(name, seed=6)[0])


def test_the_estimators_advance_a_shared_generator():
    model, (x, y) = _model(), _batch()
    params = list(model.parameters())

    def draws(kind: str, seed: int) -> list[list[torch.Tensor]]:
        gen = torch.Generator().manual_seed(seed)
        if kind == "gnb":
            return [sophia_torch.gnb_hessian(model(x), params, generator=gen) for _ in range(2)]
        return [sophia_torch.hutchinson_hessian(_loss(model, x, y), params, generator=gen,
                                                probe="rademacher") for _ in range(2)]

    for kind in ("gnb", "hutchinson"):
        first, second = draws(kind, 3)
        assert not _same(first, second)
        assert all(_same(a, b) for a, b in zip((first, second), draws(kind, 3), strict=True))
