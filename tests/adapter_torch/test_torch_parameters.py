"""The optimizer leaves a parameter what it is: its storage, its views, its ties.

Each test reproduces a failure measured on sophia_torch 0.1, whose fast path
re-pointed every parameter's ``.data`` into one flat buffer per param group
(issue 12). The update math is checked elsewhere; here, what a torch user
relies on: ``torch.save`` of one tensor, ``safetensors``, weights tied by
sharing storage, ``detach()`` views, ``share_memory()``.
"""

from __future__ import annotations

import io
import pathlib
import re

import pytest
from backend_support import require

torch = require("torch")
import sophia_torch  # noqa: E402

F = torch.nn.functional
OPTIMIZERS = {
    "Sophia": lambda params, **kw: sophia_torch.Sophia(params, lr=1e-2, require_refresh=False,
                                                       **kw),
    "SophiaG": lambda params, **kw: sophia_torch.SophiaG(params, lr=1e-2, require_refresh=False,
                                                         **kw),
}


class TinyLM(torch.nn.Module):
    def __init__(self, vocab: int = 40, width: int = 16) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(vocab, width)
        self.ln = torch.nn.LayerNorm(width)
        self.head = torch.nn.Linear(width, vocab, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.ln(self.emb(tokens)))


def _train(model: torch.nn.Module, opt: torch.optim.Optimizer, steps: int = 4) -> None:
    gen = torch.Generator().manual_seed(0)
    for _ in range(steps):
        tokens = torch.randint(0, 40, (4, 9), generator=gen)
        logits = model(tokens[:, :-1])
        F.cross_entropy(logits.reshape(-1, 40), tokens[:, 1:].reshape(-1)).backward()
        opt.step()
        opt.zero_grad()


@pytest.fixture(params=sorted(OPTIMIZERS))
def make_opt(request):
    return OPTIMIZERS[request.param]


def test_saving_one_parameter_writes_that_parameter_only(make_opt):
    torch.manual_seed(0)
    model = TinyLM()
    _train(model, make_opt(model.parameters()))
    buffer = io.BytesIO()
    torch.save(model.ln.weight, buffer)
    # 16 floats (64 bytes) plus the pickle and zip framing of one small tensor.
    assert len(buffer.getvalue()) < 2048, len(buffer.getvalue())
    assert model.ln.weight.untyped_storage().nbytes() == model.ln.weight.numel() * 4


def test_safetensors_save_model_after_training(tmp_path, make_opt):
    safetensors_torch = pytest.importorskip("safetensors.torch")
    torch.manual_seed(0)
    model = TinyLM()
    _train(model, make_opt(model.parameters()))
    path = tmp_path / "model.safetensors"
    safetensors_torch.save_model(model, str(path))
    twin = TinyLM()
    safetensors_torch.load_model(twin, str(path))
    for a, b in zip(model.parameters(), twin.parameters(), strict=True):
        assert torch.equal(a, b)


def test_weights_tied_by_sharing_storage_stay_tied(make_opt):
    torch.manual_seed(0)
    model = TinyLM()
    model.head.weight.data = model.emb.weight.data  # a tie through .data (two Parameters)
    _train(model, make_opt(model.parameters()))
    assert model.head.weight.data_ptr() == model.emb.weight.data_ptr()
    assert torch.equal(model.head.weight, model.emb.weight)


def test_a_view_taken_before_the_first_step_tracks_the_parameter(make_opt):
    torch.manual_seed(0)
    model = TinyLM()
    detached = model.ln.weight.detach()
    before = detached.clone()
    _train(model, make_opt(model.parameters()))
    assert not torch.equal(before, model.ln.weight)  # it moved
    assert torch.equal(detached, model.ln.weight)  # and the view saw it


def test_shared_memory_parameters_stay_shared(make_opt):
    torch.manual_seed(0)
    model = TinyLM()
    model.share_memory()
    storages = [p.untyped_storage().data_ptr() for p in model.parameters()]
    _train(model, make_opt(model.parameters()))
    assert all(p.is_shared() for p in model.parameters())
    assert storages == [p.untyped_storage().data_ptr() for p in model.parameters()]


@pytest.mark.parametrize("path", ["foreach", "per_tensor"])
def test_no_step_changes_a_parameters_storage(path, make_opt):
    """Also with missing gradients and after load_state_dict (layout rebuilds)."""
    torch.manual_seed(0)
    model = TinyLM()
    opt = make_opt(model.parameters(), foreach=path == "foreach")
    storages = [p.untyped_storage().data_ptr() for p in model.parameters()]
    _train(model, opt, 2)
    model.ln.bias.requires_grad_(False)
    _train(model, opt, 2)
    opt.load_state_dict(opt.state_dict())
    _train(model, opt, 2)
    assert storages == [p.untyped_storage().data_ptr() for p in model.parameters()]


def test_no_assignment_to_the_data_of_a_tensor_in_the_package():
    """Grep: nothing in sophia_torch writes ``something.data = ...``."""
    package = pathlib.Path(sophia_torch.__file__).parent
    assignment = re.compile(r"\.data\s*=(?!=)")
    found = [f"{path.name}:{number}: {line.strip()}"
             for path in sorted(package.rglob("*.py"))
             for number, line in enumerate(path.read_text().splitlines(), 1)
             if assignment.search(line)]
    assert not found, found
