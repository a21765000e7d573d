"""sophia_torch.Sophia: the core's trajectory, in place, with torch's optimizer contract."""

from __future__ import annotations

import io

import numpy as np
import pytest
from backend_support import require

torch = require("torch")
import sophia_core  # noqa: E402
import sophia_torch  # noqa: E402

SHAPES = [(3, 4), (5,), (2, 3, 2)]


def _streams(seed: int, steps: int, dtype=np.float32):
    rng = np.random.default_rng(seed)
    params = [rng.standard_normal(s).astype(dtype) for s in SHAPES]
    grads = [[rng.standard_normal(s).astype(dtype) for s in SHAPES] for _ in range(steps)]
    # hhat may be negative (a Hutchinson estimate): the sign step must handle it.
    hhats = [[(rng.standard_normal(s) + 0.5).astype(dtype) for s in SHAPES] for _ in range(steps)]
    return params, grads, hhats


def _numpy_reference(params, grads, hhats, lrs, hyper: sophia_core.Hyperparameters):
    """The core on numpy: the trajectory every backend must reproduce."""
    params = [p.copy() for p in params]
    states = [sophia_core.init_state(p) for p in params]
    for t, (gs, hs) in enumerate(zip(grads, hhats, strict=True)):
        if sophia_core.refresh_due(t, hessian_interval=hyper.hessian_interval,
                                   refresh_at_start=hyper.refresh_at_start):
            states = [s._replace(h=sophia_core.hessian_ema(s.h, hh, b2=hyper.b2))
                      for s, hh in zip(states, hs, strict=True)]
        kwargs = {**hyper.update_kwargs(), "lr": lrs[t]}
        out = [sophia_core.sophia_update(p, g, s, step=t + 1, **kwargs)
               for p, g, s in zip(params, gs, states, strict=True)]
        params = [o[0] for o in out]
        states = [o[1] for o in out]
    return params, states


def _run_torch(params, grads, hhats, lrs, hyper, *, foreach, dtype=torch.float32):
    tensors = [torch.nn.Parameter(torch.tensor(p, dtype=dtype)) for p in params]
    opt = sophia_torch.Sophia(
        tensors, lr=lrs[0], betas=(hyper.b1, hyper.b2), gamma=hyper.gamma,
        weight_decay=hyper.weight_decay, eps=hyper.eps, clip_threshold=hyper.clip_threshold,
        hessian_interval=hyper.hessian_interval, refresh_at_start=hyper.refresh_at_start,
        bias_correction=hyper.bias_correction, maximize=hyper.maximize, foreach=foreach)
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: lrs[min(t, len(lrs) - 1)] / lrs[0])
    for gs, hs in zip(grads, hhats, strict=True):
        if opt.hessian_refresh_due():
            opt.update_hessian([torch.tensor(h, dtype=dtype) for h in hs])
        for p, g in zip(tensors, gs, strict=True):
            p.grad = torch.tensor(g, dtype=dtype)
        opt.step()
        schedule.step()
    return tensors, opt


@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("bias_correction", [False, True])
def test_bitwise_equal_to_the_core_on_numpy(foreach, bias_correction):
    steps = 25
    params, grads, hhats = _streams(0, steps)
    lrs = [1e-2 * (0.9 ** t) for t in range(steps)]
    hyper = sophia_core.Hyperparameters(lr=lrs[0], hessian_interval=4, gamma=0.5,
                                        bias_correction=bias_correction, maximize=foreach)
    ref_params, ref_states = _numpy_reference(params, grads, hhats, lrs, hyper)
    tensors, opt = _run_torch(params, grads, hhats, lrs, hyper, foreach=foreach)
    for p, ref, state in zip(tensors, ref_params, ref_states, strict=True):
        np.testing.assert_array_equal(p.detach().numpy(), ref)
        np.testing.assert_array_equal(opt.state[p]["m"].numpy(), state.m)
        np.testing.assert_array_equal(opt.state[p]["h"].numpy(), state.h)
        assert int(opt.state[p]["step"]) == steps


def test_float64_bitwise_and_refresh_schedule_without_start():
    steps = 12
    params, grads, hhats = _streams(1, steps, np.float64)
    lrs = [1e-3] * steps
    hyper = sophia_core.Hyperparameters(lr=1e-3, hessian_interval=5, refresh_at_start=False)
    ref_params, _ = _numpy_reference(params, grads, hhats, lrs, hyper)
    tensors, _ = _run_torch(params, grads, hhats, lrs, hyper, foreach=True, dtype=torch.float64)
    for p, ref in zip(tensors, ref_params, strict=True):
        np.testing.assert_array_equal(p.detach().numpy(), ref)


def test_fast_path_is_bitwise_the_per_tensor_path():
    """Chunks of large tensors, buckets of small ones, non-contiguous ones, mixed dtypes."""
    gen = torch.Generator().manual_seed(0)
    shapes = [(sophia_torch.CHUNK * 2 + 17,), (300, 7), (5,), (1,), (64, 33)] + [(40,)] * 50
    dtypes = [torch.float32] * (len(shapes) - 2) + [torch.float64, torch.bfloat16]

    def make():
        ps = [torch.nn.Parameter(torch.randn(s, generator=gen, dtype=torch.float32).to(d))
              for s, d in zip(shapes, dtypes, strict=True)]
        ps[1] = torch.nn.Parameter(ps[1].detach().t().contiguous().t())  # non-contiguous
        return ps

    state = gen.get_state()
    a = make()
    gen.set_state(state)
    b = make()
    opts = [sophia_torch.Sophia(ps, lr=1e-2, gamma=0.3, foreach=f) for ps, f in ((a, True),
                                                                                (b, False))]
    for step in range(3):
        hh = [torch.randn(s, generator=gen) for s in shapes]
        gs = [torch.randn(s, generator=gen) for s in shapes]
        for ps, opt in zip((a, b), opts, strict=True):
            opt.update_hessian([h.clone() for h in hh])
            for p, g in zip(ps, gs, strict=True):
                p.grad = g.to(p.dtype)
            if step == 2:
                ps[3].grad = None  # skipped this step: its own step count lags
            opt.step()
    for pa, pb in zip(a, b, strict=True):
        assert torch.equal(pa, pb)
        assert torch.equal(opts[0].state[pa]["m"], opts[1].state[pb]["m"])
    assert int(opts[0].state[a[3]]["step"]) == 2


def _train(model, opt, steps, gen, scheduler=None):
    dtype = next(model.parameters()).dtype
    for _ in range(steps):
        x = torch.randn(6, 4, generator=gen).to(dtype)
        logits = model(x)
        if opt.hessian_refresh_due():
            opt.update_hessian(sophia_torch.gnb_hessian(logits, list(model.parameters()),
                                                        generator=gen, retain_graph=True))
        torch.nn.functional.cross_entropy(logits, torch.zeros(6, dtype=torch.long)).backward()
        opt.step()
        opt.zero_grad()
        if scheduler is not None:
            scheduler.step()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_state_dict_resume_is_bitwise(dtype):
    def fresh():
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(),
                                    torch.nn.Linear(8, 3)).to(dtype)
        opt = sophia_torch.Sophia(
            [{"params": model[0].parameters()}, {"params": model[2].parameters(), "lr": 3e-3}],
            lr=1e-2, hessian_interval=3)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=4, gamma=0.5)
        return model, opt, sched

    model, opt, sched = fresh()
    gen = torch.Generator().manual_seed(1)
    _train(model, opt, 7, gen, sched)
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(),
                "gen": gen.get_state()}, buffer)
    _train(model, opt, 8, gen, sched)

    buffer.seek(0)
    saved = torch.load(buffer)
    model2, opt2, sched2 = fresh()
    model2.load_state_dict(saved["model"])
    opt2.load_state_dict(saved["opt"])
    sched2.load_state_dict(saved["sched"])
    for p in model2.parameters():
        assert opt2.state[p]["m"].dtype == torch.float32  # bf16 params keep float32 state
    gen2 = torch.Generator()
    gen2.set_state(saved["gen"])
    _train(model2, opt2, 8, gen2, sched2)
    for a, b in zip(model.parameters(), model2.parameters(), strict=True):
        assert torch.equal(a, b)
        assert torch.equal(opt.state[a]["h"], opt2.state[b]["h"])
    assert opt2.completed_steps == 15


def test_closure_zero_grad_and_skipped_parameters():
    model = torch.nn.Linear(3, 1)
    frozen = torch.nn.Parameter(torch.ones(2))
    opt = sophia_torch.Sophia([*model.parameters(), frozen], lr=0.1)
    x = torch.randn(4, 3)

    def closure():
        opt.zero_grad()
        loss = model(x).square().mean()
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert isinstance(loss, torch.Tensor)
    assert frozen not in opt.state and torch.equal(frozen, torch.ones(2))
    opt.zero_grad()
    assert model.weight.grad is None


def test_step_is_bounded_by_the_learning_rate_and_negative_h_gives_sign_steps():
    p = torch.nn.Parameter(torch.zeros(1000))
    opt = sophia_torch.Sophia([p], lr=0.01, weight_decay=0.0, gamma=1.0)
    opt.update_hessian([torch.randn(1000)])  # negative entries included
    p.grad = torch.randn(1000) * 1e3
    opt.step()
    assert p.detach().abs().max() <= 0.01 * (1 + 1e-6)
    negative = opt.state[p]["h"] <= 0
    expected = -0.01 * torch.sign(opt.state[p]["m"][negative])
    torch.testing.assert_close(p.detach()[negative], expected)


def test_half_precision_parameters_keep_float32_state_and_no_nan():
    for dtype in (torch.float16, torch.bfloat16):
        p = torch.nn.Parameter(torch.randn(64).to(dtype))
        opt = sophia_torch.Sophia([p], lr=1e-3)
        for _ in range(5):
            opt.update_hessian([torch.zeros(64, dtype=dtype)])  # d = eps: the extreme case
            p.grad = (torch.randn(64) * 1e-7).to(dtype)  # tiny (and subnormal) gradients
            opt.step()
        assert opt.state[p]["m"].dtype == opt.state[p]["h"].dtype == torch.float32
        assert p.dtype == dtype and bool(torch.isfinite(p).all())


def test_sparse_gradients_and_complex_parameters_are_refused():
    emb = torch.nn.Embedding(10, 3, sparse=True)
    opt = sophia_torch.Sophia(emb.parameters())
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match="sparse gradients"):
        opt.step()
    z = torch.nn.Parameter(torch.randn(3, dtype=torch.complex64))
    z.grad = torch.randn(3, dtype=torch.complex64)
    with pytest.raises(RuntimeError, match="complex parameters"):
        sophia_torch.Sophia([z]).step()


@pytest.mark.parametrize(("kwargs", "name"), [
    ({"lr": -1.0}, "lr"), ({"betas": (1.0, 0.99)}, "betas\\[0\\]"),
    ({"betas": (0.9, -0.1)}, "betas\\[1\\]"), ({"gamma": -1.0}, "gamma"),
    ({"eps": 0.0}, "eps"), ({"clip_threshold": 0.0}, "clip_threshold"),
    ({"hessian_interval": 0}, "hessian_interval"), ({"weight_decay": -0.1}, "weight_decay"),
])
def test_invalid_hyperparameters_name_the_parameter(kwargs, name):
    with pytest.raises(ValueError, match=name):
        sophia_torch.Sophia([torch.nn.Parameter(torch.zeros(1))], **kwargs)


def test_invalid_group_hyperparameters_and_estimate_count():
    opt = sophia_torch.Sophia([torch.nn.Parameter(torch.zeros(1))])
    with pytest.raises(ValueError, match="rho"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.zeros(1))], "gamma": -2.0})
    with pytest.raises(ValueError, match="2 estimates for 1 parameters"):
        opt.update_hessian([torch.zeros(1), torch.zeros(1)])
    with pytest.raises(ValueError, match="rho"):
        sophia_torch.SophiaG([torch.nn.Parameter(torch.zeros(1))], rho=-1.0)


def test_refresh_schedule():
    p = torch.nn.Parameter(torch.zeros(2))
    for at_start, expected in ((True, [0, 3, 6]), (False, [3, 6])):
        opt = sophia_torch.Sophia([p], hessian_interval=3, refresh_at_start=at_start,
                                  require_refresh=False)
        due = []
        for t in range(8):
            if opt.hessian_refresh_due():
                due.append(t)
            p.grad = torch.ones(2)
            opt.step()
        assert due == expected
        assert sophia_torch.refresh_due(6, hessian_interval=3)


def _same_model_twice(shapes):
    gen = torch.Generator().manual_seed(0)
    a = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in shapes]
    b = [torch.nn.Parameter(p.detach().clone()) for p in a]
    return a, b, gen


@pytest.mark.parametrize("compiled", [False, True])
def test_state_buffers_are_bitwise_the_per_tensor_path_and_rebuild(compiled):
    """m and h of a group live in flat buffers (their state entries are views);
    a missing gradient, a loaded state_dict or replaced state fall back and
    rebuild, bitwise the for-loop path throughout; parameters keep their storage."""
    shapes = [(sophia_torch.CHUNK + 5, 2), (7, 3), (11,), (sophia_torch.CHUNK // 2,), (1,)]
    a, b, gen = _same_model_twice(shapes)
    storages = [p.untyped_storage().data_ptr() for p in a]
    multi = sophia_torch.Sophia(a, lr=1e-2, gamma=0.3, hessian_interval=2, compiled=compiled)
    plain = sophia_torch.Sophia(b, lr=1e-2, gamma=0.3, hessian_interval=2, foreach=False)
    schedules = [torch.optim.lr_scheduler.ExponentialLR(o, 0.9) for o in (multi, plain)]
    for t in range(8):
        hh = [torch.randn(s, generator=gen) for s in shapes]
        gs = [torch.randn(s, generator=gen) for s in shapes]
        if t == 4:
            plain.load_state_dict(plain.state_dict())
            multi.load_state_dict(multi.state_dict())
        if t == 6:  # a user replaces one state tensor: that parameter leaves the buffers
            for opt, ps in ((multi, a), (plain, b)):
                opt.state[ps[1]]["m"] = opt.state[ps[1]]["m"].clone()
        for ps, opt, sched in zip((a, b), (multi, plain), schedules, strict=True):
            if opt.hessian_refresh_due():
                opt.update_hessian(hh)
            for p, g in zip(ps, gs, strict=True):
                p.grad = g.clone()
            if t == 2:
                ps[2].grad = None  # one parameter sits out
            opt.step()
            sched.step()
        if t in (1, 5):
            storage = {multi.state[p]["m"].untyped_storage().data_ptr() for p in a}
            assert len(storage) == 1  # one buffer for the group's momentum
    assert storages == [p.untyped_storage().data_ptr() for p in a]
    for pa, pb in zip(a, b, strict=True):
        assert torch.equal(pa, pb)
        assert torch.equal(multi.state[pa]["m"], plain.state[pb]["m"])
        assert torch.equal(multi.state[pa]["h"], plain.state[pb]["h"])
        assert int(multi.state[pa]["step"]) == int(plain.state[pb]["step"])
    assert int(multi.state[a[2]]["step"]) == 7


def test_deepcopy_keeps_the_schedule_and_continues_identically():
    import copy

    p = torch.nn.Parameter(torch.randn(5))
    opt = sophia_torch.SophiaH([p], lr=0.1, hessian_interval=3, refresh_at_start=False,
                               n_probes=2)
    for _ in range(2):
        p.grad = torch.ones(5)
        opt.step()
    clone = copy.deepcopy(opt)
    assert (clone.hessian_interval, clone.refresh_at_start, clone.n_probes) == (3, False, 2)
    assert clone.completed_steps == 2 and not clone.hessian_refresh_due()
