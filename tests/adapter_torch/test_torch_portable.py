"""Portable state files (sophia_core.portable: npz, no pickle) from and into torch."""

from __future__ import annotations

import pytest
from backend_support import require

torch = require("torch")
import sophia_torch  # noqa: E402


def _trained(dtype=torch.float32, steps=5):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3))
    model = model.to(dtype)
    opt = sophia_torch.Sophia(model.parameters(), lr=1e-2, hessian_interval=2)
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        if opt.hessian_refresh_due():
            opt.update_hessian([torch.rand(p.shape, generator=gen) for p in model.parameters()])
        for p in model.parameters():
            p.grad = torch.randn(p.shape, generator=gen).to(dtype)
        opt.step()
    return model, opt


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_export_import_round_trip_continues_bitwise(tmp_path, dtype):
    from sophia_core import portable

    model, opt = _trained(dtype)
    path = tmp_path / "state.npz"
    opt.export_state(path)
    loaded = portable.load_state(path)
    assert loaded.step == 5 and loaded.hyperparameters["gamma"] == 0.04
    assert all(m.dtype.name == "float32" for m in loaded.ms)  # bf16 params: float32 state

    twin, _ = _trained(dtype, steps=0)
    twin.load_state_dict(model.state_dict())
    opt2 = sophia_torch.Sophia(twin.parameters(), lr=1e-2, hessian_interval=2)
    opt2.import_state(path)
    assert opt2.completed_steps == 5
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        assert torch.equal(opt.state[p]["m"], opt2.state[q]["m"])
        assert torch.equal(opt.state[p]["h"], opt2.state[q]["h"])
    for o, ps in ((opt, model.parameters()), (opt2, twin.parameters())):
        for p in ps:
            p.grad = torch.ones_like(p)
        o.step()
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        assert torch.equal(p, q)


def test_import_checks_shapes(tmp_path):
    _, opt = _trained()
    path = tmp_path / "state.npz"
    opt.export_state(path)
    other = sophia_torch.Sophia(torch.nn.Linear(5, 2).parameters())
    with pytest.raises(ValueError):
        other.import_state(path)
