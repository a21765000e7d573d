"""Host features: torch.compile, bf16 autocast, fp16 with GradScaler."""

from __future__ import annotations

import copy

from backend_support import require

torch = require("torch")
import sophia_torch  # noqa: E402

F = torch.nn.functional


def _model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 4))


def test_compiled_step_is_bitwise_the_eager_step_and_compiles_once():
    import torch._dynamo.utils

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()  # other tests may have compiled before
    model = _model()
    twin = copy.deepcopy(model)
    eager = sophia_torch.Sophia(model.parameters(), lr=1e-2, gamma=0.5, bias_correction=True)
    compiled = sophia_torch.Sophia(twin.parameters(), lr=1e-2, gamma=0.5, bias_correction=True)

    @torch.compile
    def compiled_step():
        compiled.step()

    x = torch.randn(8, 5)
    for i in range(5):
        for m, opt in ((model, eager), (twin, compiled)):
            if i % 2 == 0:
                opt.update_hessian([torch.full_like(p, 0.3) for p in m.parameters()])
            m(x).square().mean().backward()
        eager.step()
        compiled_step()
        eager.zero_grad()
        compiled.zero_grad()
    for a, b in zip(model.parameters(), twin.parameters(), strict=True):
        # The step counts are float64 tensors: the compiled bias correction is
        # formed in double precision, as the eager one from a Python int.
        assert torch.equal(a, b)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1


def _gnb_loop(model, opt, steps, *, autocast_dtype=None, scaler=None, poison_at=None):
    gen = torch.Generator().manual_seed(0)
    params = list(model.parameters())
    for t in range(steps):
        x = torch.randn(16, 5, generator=gen)
        y = torch.randint(0, 4, (16,), generator=gen)
        with torch.autocast("cpu", dtype=autocast_dtype, enabled=autocast_dtype is not None):
            logits = model(x)
            loss = F.cross_entropy(logits, y)
        if opt.hessian_refresh_due():
            scale = None if scaler is None else scaler.get_scale()
            hhats = sophia_torch.gnb_hessian(logits, params, generator=gen, loss_scale=scale,
                                             retain_graph=True)
            opt.update_hessian(hhats)
        if scaler is None:
            loss.backward()
            opt.step()
        else:
            scaler.scale(loss).backward()
            if t == poison_at:
                params[0].grad[0, 0] = float("inf")  # an overflow: GradScaler skips this step
            scaler.step(opt)
            scaler.update()
        opt.zero_grad()


def test_bf16_autocast_trains_and_tracks_float32():
    ref, amp = _model(), _model()
    opt_ref = sophia_torch.Sophia(ref.parameters(), lr=1e-2, hessian_interval=2)
    opt_amp = sophia_torch.Sophia(amp.parameters(), lr=1e-2, hessian_interval=2)
    _gnb_loop(ref, opt_ref, 6)
    _gnb_loop(amp, opt_amp, 6, autocast_dtype=torch.bfloat16)
    for a, b in zip(ref.parameters(), amp.parameters(), strict=True):
        assert b.dtype == torch.float32 and bool(torch.isfinite(b).all())
        torch.testing.assert_close(b, a, rtol=0, atol=6 * 1e-2)  # each step moves <= lr
        assert opt_amp.state[b]["h"].abs().sum() > 0


def test_fp16_grad_scaler_skips_overflow_and_never_makes_nan():
    model = _model()
    opt = sophia_torch.Sophia(model.parameters(), lr=1e-2, hessian_interval=2)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 14)
    _gnb_loop(model, opt, 3, autocast_dtype=torch.float16, scaler=scaler)
    before = [p.detach().clone() for p in model.parameters()]
    steps_before = opt.completed_steps
    _gnb_loop(model, opt, 1, autocast_dtype=torch.float16, scaler=scaler, poison_at=0)
    assert opt.completed_steps == steps_before  # skipped by the scaler
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    _gnb_loop(model, opt, 4, autocast_dtype=torch.float16, scaler=scaler)
    for p in model.parameters():
        state = opt.state[p]
        assert all(bool(torch.isfinite(t).all()) for t in (p, state["m"], state["h"]))
        assert bool((state["h"] >= 0).all()) and state["h"].abs().sum() > 0


def test_gnb_estimate_under_fp16_sees_unscaled_gradients():
    model = _model()
    params = list(model.parameters())
    x = torch.randn(32, 5)
    u = torch.rand(32, 4)
    reference = sophia_torch.gnb_hessian(model(x), params, uniform=u)
    with torch.autocast("cpu", dtype=torch.float16):
        logits = model(x)
    scaled = sophia_torch.gnb_hessian(logits, params, uniform=u, loss_scale=2.0 ** 16)
    for a, b in zip(reference, scaled, strict=True):
        assert b.dtype == torch.float32
        # fp16 logits round at ~1e-3; an estimate left scaled would be 2**32 too large.
        torch.testing.assert_close(b, a, rtol=0.05, atol=0.02 * float(a.abs().max()))
