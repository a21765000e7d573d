"""Portable state files (sophia_core.portable: npz, no pickle) from and into torch."""

from __future__ import annotations

import pytest
from backend_support import require

torch = require("torch")
import sophia_torch  # noqa: E402


def _model(dtype=torch.float32):
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(),
                               torch.nn.Linear(6, 3)).to(dtype)


def _trained(dtype=torch.float32, steps=5, named=False, **kwargs):
    model = _model(dtype)
    params = model.named_parameters() if named else model.parameters()
    opt = sophia_torch.Sophia(params, lr=1e-2, hessian_interval=2, **kwargs)
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
    opt.update_hessian([torch.full(p.shape, float("nan")) if i == 1 else None
                        for i, p in enumerate(model.parameters())])  # rejected: 6 coordinates
    path = tmp_path / "state.npz"
    opt.export_state(path)
    loaded = portable.load_state(path)
    assert loaded.step == 5 and loaded.hyperparameters["gamma"] == 0.04
    assert loaded.names == ["0", "1", "2", "3"]  # no names given: the flat index
    assert loaded.counters["hessian_refreshes"] == 4
    assert loaded.counters["rejected_hessian_coordinates"] == 6
    assert all(m.dtype.name == "float32" for m in loaded.ms)  # bf16 params: float32 state

    twin, _ = _trained(dtype, steps=0)
    twin.load_state_dict(model.state_dict())
    opt2 = sophia_torch.Sophia(twin.parameters(), lr=1e-2, hessian_interval=2)
    opt2.import_state(path)
    assert opt2.completed_steps == 5
    assert opt2.hessian_refreshes == 4 and opt2.rejected_hessian_coordinates == 6
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        assert torch.equal(opt.state[p]["m"], opt2.state[q]["m"])
        assert torch.equal(opt.state[p]["h"], opt2.state[q]["h"])
    for o, ps in ((opt, model.parameters()), (opt2, twin.parameters())):
        for p in ps:
            p.grad = torch.ones_like(p)
        o.step()
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        assert torch.equal(p, q)


def test_named_parameters_are_matched_by_name(tmp_path):
    """Given named_parameters(), the file carries the names, and an importer
    with another order (or more groups) gets each tensor where it belongs."""
    from sophia_core import portable

    model, opt = _trained(named=True)
    path = tmp_path / "state.npz"
    opt.export_state(path)
    assert portable.load_state(path).names == ["0.weight", "0.bias", "2.weight", "2.bias"]
    twin = _model()
    named = dict(twin.named_parameters())
    other = sophia_torch.Sophia(
        [{"params": [("2.bias", named["2.bias"]), ("0.weight", named["0.weight"])]},
         {"params": [("2.weight", named["2.weight"]), ("0.bias", named["0.bias"])]}])
    other.import_state(path)
    for name, p in model.named_parameters():
        assert torch.equal(other.state[named[name]]["m"], opt.state[p]["m"]), name


def test_import_names_what_is_missing_and_checks_shapes(tmp_path):
    _, opt = _trained(named=True)
    path = tmp_path / "state.npz"
    opt.export_state(path)
    other = sophia_torch.Sophia(torch.nn.Linear(5, 2).named_parameters())
    with pytest.raises(ValueError, match="2.weight"):
        other.import_state(path)
    wrong = torch.nn.Sequential(torch.nn.Linear(4, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3))
    with pytest.raises(ValueError, match="shape"):
        sophia_torch.Sophia(wrong.named_parameters()).import_state(path)


def test_gamma_from_a_target_share_travels(tmp_path):
    from sophia_core import portable

    _, opt = _trained(target_unclipped_share=0.3)
    path = tmp_path / "state.npz"
    opt.export_state(path)
    gamma = opt.param_groups[0]["gamma"]
    assert portable.load_state(path).counters["gamma"] == gamma != 0.04
    other = sophia_torch.Sophia(_model().parameters(), target_unclipped_share=0.3)
    other.import_state(path)
    assert other.param_groups[0]["gamma"] == gamma
