"""GNB and Hutchinson estimates: torch autodiff around the core's array math."""

from __future__ import annotations

import pytest
from backend_support import require

torch = require("torch")
import sophia_torch  # noqa: E402

F = torch.nn.functional


def _model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(5, 6), torch.nn.Tanh(), torch.nn.Linear(6, 7))


def test_gnb_matches_the_definition_and_leaves_grad_alone():
    model = _model()
    params = list(model.parameters())
    for p in params:
        p.grad = torch.full_like(p, 7.0)  # a real gradient accumulated by the training loop
    x = torch.randn(3, 4, 5)
    mask = torch.rand(3, 4) > 0.3
    uniform = torch.rand(3, 4, 7)
    hhats = sophia_torch.gnb_hessian(model(x), params, mask=mask, uniform=uniform)
    for p in params:
        assert torch.equal(p.grad, torch.full_like(p, 7.0))

    logits = model(x)
    labels = torch.argmax(logits.detach() - torch.log(-torch.log(uniform)), dim=-1)
    labels[~mask] = -100
    loss = F.cross_entropy(logits.reshape(-1, 7), labels.reshape(-1), ignore_index=-100)
    ghats = torch.autograd.grad(loss, params)
    n = int(mask.sum())
    for hhat, g in zip(hhats, ghats, strict=True):
        torch.testing.assert_close(hhat, n * g * g, rtol=1e-5, atol=1e-9)


def test_gnb_is_reproducible_with_a_generator_and_skips_unused_parameters():
    model = _model()
    unused = torch.nn.Parameter(torch.zeros(3))
    frozen = torch.nn.Parameter(torch.zeros(2), requires_grad=False)
    params = [*model.parameters(), unused, frozen]
    x = torch.randn(8, 5)
    a = sophia_torch.gnb_hessian(model(x), params, generator=torch.Generator().manual_seed(3))
    b = sophia_torch.gnb_hessian(model(x), params, generator=torch.Generator().manual_seed(3))
    c = sophia_torch.gnb_hessian(model(x), params, generator=torch.Generator().manual_seed(4))
    assert a[-2] is None and a[-1] is None
    assert all(torch.equal(u, v) for u, v in zip(a[:-2], b[:-2], strict=True))
    assert not all(torch.equal(u, v) for u, v in zip(a[:-2], c[:-2], strict=True))
    assert all(bool((h >= 0).all()) for h in a[:-2])


def test_gnb_loss_scale_unscales_and_skips_non_finite():
    model = _model()
    params = list(model.parameters())
    x, u = torch.randn(8, 5), torch.rand(8, 7)
    plain = sophia_torch.gnb_hessian(model(x), params, uniform=u)
    scaled = sophia_torch.gnb_hessian(model(x), params, uniform=u, loss_scale=2.0 ** 10)
    for a, b in zip(plain, scaled, strict=True):
        torch.testing.assert_close(b, a)
    overflow = sophia_torch.gnb_hessian(model(x), params, uniform=u, loss_scale=float("inf"))
    assert overflow == [None] * len(params)


def _quadratic(a: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return 0.5 * x @ a @ x + torch.sin(x).sum() * 0  # twice differentiable; Hessian = a


def test_hutchinson_rademacher_is_exact_on_a_diagonal_hessian():
    x = torch.nn.Parameter(torch.randn(6))
    diag = torch.linspace(-2.0, 3.0, 6)  # negative curvature included
    hhat = sophia_torch.hutchinson_hessian(_quadratic(torch.diag(diag), x), [x], probe="rademacher",
                                           generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(hhat[0], diag)


def test_hutchinson_gaussian_with_given_noise_is_u_times_hu():
    torch.manual_seed(0)
    x = torch.nn.Parameter(torch.randn(5))
    y = torch.nn.Parameter(torch.randn(3))
    a = torch.randn(5, 5)
    a = a + a.T
    noise = [[torch.randn(5), torch.randn(3)] for _ in range(3)]
    loss = _quadratic(a, x) + (y ** 3).sum()
    hhats = sophia_torch.hutchinson_hessian(loss, [x, y], n_probes=3, noise=noise)
    expected_x = sum(u[0] * (a @ u[0]) for u in noise) / 3
    expected_y = sum(u[1] * (6 * y.detach() * u[1]) for u in noise) / 3
    torch.testing.assert_close(hhats[0], expected_x)
    torch.testing.assert_close(hhats[1], expected_y)


def test_sophia_h_refreshes_from_a_loss_reproducibly():
    def run():
        model = _model()
        opt = sophia_torch.SophiaH(model.parameters(), lr=1e-2, n_probes=2, probe="rademacher",
                                   generator=torch.Generator().manual_seed(5), hessian_interval=2)
        x, y = torch.randn(16, 5), torch.randint(0, 7, (16,))
        for _ in range(5):
            loss = F.cross_entropy(model(x), y)
            if opt.hessian_refresh_due():
                opt.update_hessian(loss=loss, retain_graph=True)
            assert all(p.grad is None for p in model.parameters())
            loss.backward()
            opt.step()
            opt.zero_grad()
        return model, opt

    (m1, o1), (m2, _) = run(), run()
    for a, b in zip(m1.parameters(), m2.parameters(), strict=True):
        assert torch.equal(a, b)
    assert any(bool((o1.state[p]["h"] != 0).any()) for p in m1.parameters())
    with pytest.raises(TypeError, match="exactly one"):
        o1.update_hessian()
    with pytest.raises(ValueError, match="probe"):
        sophia_torch.SophiaH(m1.parameters(), probe="cauchy")
