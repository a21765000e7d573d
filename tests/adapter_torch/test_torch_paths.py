"""The three implementations agree bitwise: multi-tensor, for-loop, compiled.

As PyTorch's ``test_foreach_matches_forloop`` / ``test_fused_matches_forloop``:
several steps, several param groups with different hyperparameters, missing
gradients, mixed dtypes; and for the compiled path, any mix of
hyperparameters in any number of optimizers of one process (0.1 crashed as
soon as a second eps or clip_threshold appeared: one compiled graph was shared
and only lr and gamma were passed as tensors).
"""

from __future__ import annotations

import pytest
from backend_support import require

torch = require("torch")
import sophia_torch  # noqa: E402

SHAPES = [(sophia_torch.CHUNK + 3,), (40, 7), (9,), (3, 3, 3), (1,), (600,)]
GROUP_OPTIONS = [
    {},
    {"eps": 1e-8, "clip_threshold": 0.5, "betas": (0.9, 0.95), "weight_decay": 0.0,
     "lr": 3e-3},
    {"maximize": True, "bias_correction": True, "clip_threshold": 2.0},
]


def _params(dtype_of, seed: int = 0) -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=gen).to(dtype_of(i)))
            for i, s in enumerate(SHAPES)]


def _groups(params: list[torch.nn.Parameter]) -> list[dict]:
    return [{"params": params[i::3], **options} for i, options in enumerate(GROUP_OPTIONS)]


def _run(make, dtype_of, steps: int = 5) -> tuple[list[torch.nn.Parameter], torch.optim.Optimizer]:
    params = _params(dtype_of)
    opt = make(_groups(params))
    gen = torch.Generator().manual_seed(1)
    for t in range(steps):
        if t % 2 == 0:
            opt.update_hessian([torch.randn(p.shape, generator=gen) for p in opt._all_params()])
        for i, p in enumerate(params):
            p.grad = torch.randn(p.shape, generator=gen).to(p.dtype)
            if t == 3 and i in (1, 4):
                p.grad = None  # these sit one step out
        if isinstance(opt, sophia_torch.SophiaG):
            opt.step(bs=64)
        else:
            opt.step()
    return params, opt


def _assert_bitwise(run_a, run_b) -> None:
    (params_a, opt_a), (params_b, opt_b) = run_a, run_b
    for a, b in zip(params_a, params_b, strict=True):
        assert torch.equal(a, b)
        for key in (opt_a.momentum_key, opt_a.hessian_key, "step"):
            assert torch.equal(opt_a.state[a][key], opt_b.state[b][key]), key


def _float32(i: int) -> torch.dtype:
    return torch.float32


def _mixed(i: int) -> torch.dtype:
    return (torch.float32, torch.float64, torch.bfloat16)[i % 3]


@pytest.mark.parametrize("dtype_of", [_float32, _mixed], ids=["float32", "mixed"])
def test_multi_tensor_is_bitwise_the_for_loop(dtype_of):
    def make(foreach):
        return lambda groups: sophia_torch.Sophia(groups, lr=1e-2, gamma=0.3, foreach=foreach,
                                                  require_refresh=False)

    _assert_bitwise(_run(make(True), dtype_of), _run(make(False), dtype_of))


def test_compiled_is_bitwise_the_for_loop_for_any_mix_of_optimizers_and_hyperparameters():
    """Sophia, SophiaG and SophiaH, compiled, in one process, each with three
    groups of different eps, clip_threshold, betas, weight decay, lr, flags."""
    makers = {
        "Sophia": lambda groups, **kw: sophia_torch.Sophia(groups, lr=1e-2, gamma=0.3, **kw),
        "SophiaG": lambda groups, **kw: sophia_torch.SophiaG(groups, lr=1e-2, rho=0.02, **kw),
        "SophiaH": lambda groups, **kw: sophia_torch.SophiaH(groups, lr=2e-2, gamma=0.1,
                                                             eps=1e-10, **kw),
    }
    cases = [(make, _float32) for make in makers.values()] + [(makers["Sophia"], _mixed)]
    for make, dtype_of in cases:
        compiled = _run(lambda groups, make=make: make(groups, compiled=True,
                                                       require_refresh=False), dtype_of)
        loop = _run(lambda groups, make=make: make(groups, foreach=False, require_refresh=False),
                    dtype_of)
        _assert_bitwise(compiled, loop)
