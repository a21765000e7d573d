"""torch's generic optimizer contract, for Sophia, SophiaG and SophiaH.

The kinds of checks PyTorch runs on its own optimizers
(``torch/testing/_internal/common_optimizers.py``, ``test/test_optim.py``),
written for this package: state_dict round trips (also ``weights_only``
loads, older state without newer keys, non-tensor steps), deepcopy and
pickle of every public attribute, hooks, tensor learning rates of any
one-element shape, the multi-tensor path against the for-loop over several
steps and groups, missing gradients, printing, exact step counts.
"""

from __future__ import annotations

import copy
import io
import pickle
import warnings

import pytest
from backend_support import require

torch = require("torch")
import sophia_torch  # noqa: E402

F = torch.nn.functional
CLASSES = ["Sophia", "SophiaG", "SophiaH"]


def _model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 4))


def _make(name: str, model: torch.nn.Module, **kwargs):
    """Two param groups with different hyperparameters, refresh every 3 steps."""
    groups = [{"params": list(model[0].parameters())},
              {"params": list(model[2].parameters()), "weight_decay": 0.0, "lr": 5e-3}]
    if name == "Sophia":
        return sophia_torch.Sophia(groups, lr=1e-2, gamma=0.5, hessian_interval=3, **kwargs)
    if name == "SophiaG":
        return sophia_torch.SophiaG(groups, lr=1e-2, rho=0.05, hessian_interval=3,
                                    refresh_at_start=True, **kwargs)
    kwargs.setdefault("generator", torch.Generator().manual_seed(7))
    return sophia_torch.SophiaH(groups, lr=1e-2, gamma=0.5, hessian_interval=3,
                                probe="rademacher", **kwargs)


def _train(model, opt, steps: int, data: torch.Generator, *, drop: int | None = None) -> None:
    """Each class's own in-loop refresh; parameter ``drop`` gets no gradient."""
    params = list(model.parameters())
    for _ in range(steps):
        x = torch.randn(16, 5, generator=data)
        y = torch.randint(0, 4, (16,), generator=data)
        logits = model(x)
        loss = F.cross_entropy(logits, y)
        if isinstance(opt, sophia_torch.SophiaH):
            opt.refresh_hessian(loss)
        else:
            opt.refresh_hessian(model, x)
        loss.backward()
        if drop is not None:
            params[drop].grad = None
        if isinstance(opt, sophia_torch.SophiaG):
            opt.step(bs=16)
        else:
            opt.step()
        opt.zero_grad()


def _assert_same(model_a, opt_a, model_b, opt_b) -> None:
    for a, b in zip(model_a.parameters(), model_b.parameters(), strict=True):
        assert torch.equal(a, b)
        sa, sb = opt_a.state[a], opt_b.state[b]
        assert sa.keys() == sb.keys()
        for key in sa:
            if torch.is_tensor(sa[key]):
                assert torch.equal(sa[key], sb[key]), key
            else:
                assert sa[key] == sb[key], key


@pytest.mark.parametrize("name", CLASSES)
def test_state_dict_round_trip_resumes_bitwise(name):
    """Through torch.save/torch.load(weights_only=True), into fresh objects;
    SophiaH's generator state travels in the state_dict."""
    model, data = _model(), torch.Generator().manual_seed(1)
    opt = _make(name, model)
    _train(model, opt, 5, data)
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(),
                "data": data.get_state()}, buffer)
    _train(model, opt, 7, data)

    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    twin = _model(seed=3)
    twin.load_state_dict(saved["model"])
    other = _make(name, twin, generator=torch.Generator().manual_seed(99)) \
        if name == "SophiaH" else _make(name, twin)
    other.load_state_dict(saved["opt"])
    data2 = torch.Generator()
    data2.set_state(saved["data"])
    assert other.completed_steps == 5
    _train(twin, other, 7, data2)
    _assert_same(model, opt, twin, other)
    assert other.hessian_refreshes == opt.hessian_refreshes == 4


@pytest.mark.parametrize("name", CLASSES)
def test_state_dict_is_deterministic_and_detached(name):
    model = _model()
    opt = _make(name, model)
    _train(model, opt, 4, torch.Generator().manual_seed(1))
    first, second = opt.state_dict(), opt.state_dict()
    assert first["param_groups"] == second["param_groups"]
    for key, state in first["state"].items():
        for k, v in state.items():
            assert torch.equal(v, second["state"][key][k]) if torch.is_tensor(v) \
                else v == second["state"][key][k]
    loaded = _make(name, _model())
    loaded.load_state_dict(first)
    for p in loaded.param_groups[0]["params"]:  # loading copies: the dict is not aliased
        m = loaded.state[p][loaded.momentum_key]
        assert all(m.untyped_storage().data_ptr() != v.untyped_storage().data_ptr()
                   for s in first["state"].values() for v in s.values() if torch.is_tensor(v))


OLD_GROUP_KEYS = ("eps", "clip_threshold", "bias_correction", "maximize", "compiled",
                  "foreach", "hessian_bias_correction", "target_unclipped_share")


@pytest.mark.parametrize("name", CLASSES)
def test_older_state_without_newer_keys_loads_and_steps(name):
    """As AdamW does: what a group or a state lacks takes this optimizer's defaults."""
    model, data = _model(), torch.Generator().manual_seed(1)
    opt = _make(name, model)
    _train(model, opt, 4, data)
    old = copy.deepcopy(opt.state_dict())
    old.pop("sophia")
    for group in old["param_groups"]:
        for key in OLD_GROUP_KEYS:
            group.pop(key)
    for state in old["state"].values():
        state.pop("hessian_refreshes")
        state.pop("rejected_hessian_coordinates")
        state["step"] = int(state["step"])  # a non-tensor step (torch < 1.12 saved these)
    twin = _model()
    twin.load_state_dict(model.state_dict())
    other = _make(name, twin)
    other.load_state_dict(old)
    for group, defaults in zip(other.param_groups, [other.defaults] * 2, strict=True):
        for key in OLD_GROUP_KEYS:
            assert group[key] == defaults[key], key
    for p in twin.parameters():
        assert other.state[p]["step"].dtype == torch.float64
        assert other.state[p]["hessian_refreshes"] == 0
    _train(twin, other, 2, data)
    assert other.completed_steps == 6


@pytest.mark.parametrize("name", CLASSES)
def test_deepcopy_and_pickle_keep_every_public_attribute(name):
    model = _model()
    opt = _make(name, model)
    _train(model, opt, 4, torch.Generator().manual_seed(1))
    public = sorted(k for k in vars(opt) if not k.startswith("_"))
    assert {"hessian_interval", "refresh_at_start", "generator", "state_dtype",
            "require_refresh", "warn_sign_momentum", "hessian_batch_fraction"} <= set(public)
    for clone in (copy.deepcopy(opt), pickle.loads(pickle.dumps(opt))):
        assert sorted(k for k in vars(clone) if not k.startswith("_")) == public
        for key in public:
            mine, theirs = getattr(opt, key), getattr(clone, key)
            if isinstance(mine, torch.Generator):
                assert theirs is not mine and torch.equal(mine.get_state(), theirs.get_state())
            elif key not in ("state", "param_groups"):
                assert mine == theirs, key
        assert clone.completed_steps == opt.completed_steps


def test_a_deep_copy_continues_exactly_like_the_original():
    """Sophia-H draws probes from its generator: the copy draws the same ones."""
    model = _model()
    opt = _make("SophiaH", model)
    data = torch.Generator().manual_seed(1)
    _train(model, opt, 4, data)
    twin, clone = copy.deepcopy((model, opt))  # one memo: the copy optimizes the copied model
    assert clone.generator is not opt.generator
    state = data.get_state()
    _train(model, opt, 6, data)
    data.set_state(state)
    _train(twin, clone, 6, data)
    _assert_same(model, opt, twin, clone)


@pytest.mark.parametrize("name", CLASSES)
def test_step_and_state_dict_hooks_run(name):
    model = _model()
    opt = _make(name, model)
    calls: list[str] = []
    opt.register_step_pre_hook(lambda o, args, kwargs: calls.append("pre"))
    opt.register_step_post_hook(lambda o, args, kwargs: calls.append("post"))
    opt.register_state_dict_pre_hook(lambda o: calls.append("sd_pre"))

    def post(o, state_dict):
        calls.append("sd_post")
        state_dict["extra"] = 1
        return state_dict

    opt.register_state_dict_post_hook(post)
    opt.register_load_state_dict_pre_hook(lambda o, sd: calls.append("load_pre"))
    opt.register_load_state_dict_post_hook(lambda o: calls.append("load_post"))
    _train(model, opt, 2, torch.Generator().manual_seed(1))
    saved = opt.state_dict()
    assert saved["extra"] == 1 and "sophia" in saved
    opt.load_state_dict(saved)
    assert calls == ["pre", "post", "pre", "post", "sd_pre", "sd_post", "load_pre", "load_post"]


@pytest.mark.parametrize("shape", [(), (1,), (1, 1), (1, 1, 1)])
@pytest.mark.parametrize("foreach", [False, True])
def test_tensor_learning_rate_of_any_one_element_shape(shape, foreach):
    """Reshaped to 0-d before the update: bitwise the float learning rate of
    the same value (values exact in float32; a schedule writes the tensor in place)."""
    schedule = [2.0**-6, 2.0**-7, 3 * 2.0**-9, 2.0**-8]
    runs = []
    for lr in (torch.full(shape, schedule[0]), schedule[0]):
        model = _model()
        opt = sophia_torch.Sophia(model.parameters(), lr=lr, foreach=foreach,
                                  require_refresh=False)
        data = torch.Generator().manual_seed(1)
        for value in schedule:
            if torch.is_tensor(lr):
                opt.param_groups[0]["lr"].fill_(value)
            else:
                opt.param_groups[0]["lr"] = value
            opt.update_hessian([torch.rand(p.shape, generator=data) for p in model.parameters()])
            F.cross_entropy(model(torch.randn(8, 5, generator=data)),
                            torch.zeros(8, dtype=torch.long)).backward()
            opt.step()
            opt.zero_grad()
        assert type(opt.param_groups[0]["lr"]) is type(lr)
        runs.append(model)
    for a, b in zip(runs[0].parameters(), runs[1].parameters(), strict=True):
        assert torch.equal(a, b)


def test_a_scheduler_drives_a_tensor_learning_rate():
    model = _model()
    opt = sophia_torch.Sophia(model.parameters(), lr=torch.tensor([[0.1]]), require_refresh=False)
    sched = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.5)
    for _ in range(3):
        F.cross_entropy(model(torch.randn(8, 5)), torch.zeros(8, dtype=torch.long)).backward()
        opt.step()
        sched.step()
        opt.zero_grad()
    lr = opt.param_groups[0]["lr"]
    assert lr.shape == (1, 1) and float(lr) == pytest.approx(0.0125)


@pytest.mark.parametrize("lr", [torch.zeros(2), torch.tensor([[1e-3, 2e-3]]), "1e-3",
                                torch.tensor(1e-3 + 0j), torch.tensor(True)])
def test_learning_rates_that_are_not_one_real_number_are_refused(lr):
    with pytest.raises(TypeError, match="lr"):
        sophia_torch.Sophia(_model().parameters(), lr=lr)


@pytest.mark.parametrize(("kwargs", "error", "name"), [
    ({"lr": -1.0}, ValueError, "lr"), ({"lr": None}, TypeError, "lr"),
    ({"betas": (1.0, 0.99)}, ValueError, "betas\\[0\\]"),
    ({"betas": (0.9, "0.99")}, TypeError, "betas\\[1\\]"),
    ({"betas": 0.9}, TypeError, "betas"),
    ({"gamma": True}, TypeError, "gamma"), ({"gamma": -1.0}, ValueError, "gamma"),
    ({"eps": 0.0}, ValueError, "eps"), ({"eps": 1e-50}, ValueError, "eps"),
    ({"clip_threshold": 1j}, TypeError, "clip_threshold"),
    ({"weight_decay": [0.1]}, TypeError, "weight_decay"),
    ({"hessian_interval": 2.0}, TypeError, "hessian_interval"),
    ({"hessian_interval": 0}, ValueError, "hessian_interval"),
    ({"maximize": 1}, TypeError, "maximize"), ({"bias_correction": None}, TypeError, "bias"),
    ({"target_unclipped_share": 1.5}, ValueError, "target_unclipped_share"),
    ({"hessian_batch_fraction": 0.0}, ValueError, "hessian_batch_fraction"),
    ({"require_refresh": "yes"}, TypeError, "require_refresh"),
    ({"foreach": 1}, TypeError, "foreach"), ({"state_dtype": torch.int32}, TypeError, "state"),
])
def test_invalid_options_raise_the_right_error_naming_them(kwargs, error, name):
    with pytest.raises(error, match=name):
        sophia_torch.Sophia(_model().parameters(), **kwargs)


def test_invalid_groups_are_refused_when_added_or_loaded():
    opt = sophia_torch.Sophia(_model().parameters())
    with pytest.raises(ValueError, match="gamma"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.zeros(1))], "gamma": -2.0})
    saved = opt.state_dict()
    saved["param_groups"][0]["eps"] = "small"
    with pytest.raises(TypeError, match="eps"):
        opt.load_state_dict(saved)
    with pytest.raises(ValueError, match="rho"):
        sophia_torch.SophiaG([torch.nn.Parameter(torch.zeros(1))], rho=-1.0)


def test_missing_gradients_leave_parameters_and_state_alone():
    model = _model()
    frozen = torch.nn.Parameter(torch.ones(3))
    opt = sophia_torch.Sophia([*model.parameters(), frozen], lr=0.1, require_refresh=False)
    opt.step()  # no gradient at all: nothing happens
    assert not opt.state and opt.completed_steps == 0
    F.cross_entropy(model(torch.randn(4, 5)), torch.zeros(4, dtype=torch.long)).backward()
    opt.step()
    assert frozen not in opt.state and torch.equal(frozen, torch.ones(3))
    assert opt.completed_steps == 1


@pytest.mark.parametrize("foreach", [False, True])
def test_zero_gradients_without_weight_decay_do_not_move_parameters(foreach):
    model = _model()
    before = [p.detach().clone() for p in model.parameters()]
    opt = sophia_torch.Sophia(model.parameters(), weight_decay=0.0, foreach=foreach,
                              require_refresh=False)
    for _ in range(3):
        for p in model.parameters():
            p.grad = torch.zeros_like(p)
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


def test_each_group_uses_its_own_learning_rate_and_weight_decay():
    a = torch.nn.Parameter(torch.ones(4))
    b = torch.nn.Parameter(torch.ones(4))
    opt = sophia_torch.Sophia([{"params": [a]}, {"params": [b], "lr": 0.5, "weight_decay": 0.0}],
                              lr=0.1, weight_decay=0.1, require_refresh=False)
    a.grad, b.grad = torch.ones(4), torch.ones(4)
    opt.step()
    torch.testing.assert_close(a.detach(), torch.full((4,), 1 * (1 - 0.1 * 0.1) - 0.1))
    torch.testing.assert_close(b.detach(), torch.full((4,), 0.5))


@pytest.mark.parametrize("name", CLASSES)
def test_printing(name):
    text = repr(_make(name, _model()))
    assert text.startswith(f"{name} (") and "Parameter Group 1" in text
    assert "weight_decay: 0.0" in text and ("rho: 0.05" in text or "gamma: 0.5" in text)


@pytest.mark.parametrize("interval", [8, 10])
def test_step_counts_stay_exact_past_2_to_the_24(interval):
    """A float32 counter stops at 2**24: the schedule then never fires (k=10)
    or fires every step (k=8). Counters here are exact."""
    p = torch.nn.Parameter(torch.zeros(3))
    opt = sophia_torch.Sophia([p], hessian_interval=interval)
    p.grad = torch.ones(3)
    opt.step()
    saved = opt.state_dict()
    start = 2**24 - 3
    saved["state"][0]["step"] = torch.tensor(float(start), dtype=torch.float64)
    saved["state"][0]["hessian_refreshes"] = 5
    opt.load_state_dict(saved)
    due = []
    for t in range(start, start + 25):
        assert opt.completed_steps == t
        if opt.hessian_refresh_due():
            due.append(t)
            opt.update_hessian([torch.ones(3)])
        opt.step()
    assert due == [t for t in range(start, start + 25) if t % interval == 0]
    assert int(opt.state[p]["step"]) == start + 25


def test_foreach_defaults_to_the_multi_tensor_path_and_false_is_a_for_loop():
    for foreach, layouts in ((None, 1), (True, 1), (False, 0)):
        model = _model()
        opt = sophia_torch.Sophia(model.parameters(), foreach=foreach, require_refresh=False)
        F.cross_entropy(model(torch.randn(4, 5)), torch.zeros(4, dtype=torch.long)).backward()
        opt.step()
        assert len(opt._layouts.get(0, [])) == layouts
        assert opt.param_groups[0]["foreach"] is foreach


def test_fused_is_a_deprecated_spelling_of_compiled():
    with pytest.warns(FutureWarning, match="compiled"):
        opt = sophia_torch.Sophia(_model().parameters(), fused=False)
    assert opt.param_groups[0]["compiled"] is False


def test_no_warning_from_a_loop_that_refreshes():
    model = _model()
    opt = _make("Sophia", model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _train(model, opt, 12, torch.Generator().manual_seed(1))
