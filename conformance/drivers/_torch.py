"""PyTorch: ``sophia_torch.Sophia``, driven the way a training loop drives it.

Gradients are written to ``p.grad`` and ``opt.step()`` is called; refreshes
call ``opt.update_hessian(hhats)`` (parameters in ``param_groups`` order); a
schedule sets ``param_group["lr"]`` before each step, which is what every
``torch.optim.lr_scheduler`` does. State is read from ``opt.state[p]``; the
counters from the optimizer's attributes (``hessian_refreshes``,
``rejected_hessian_coordinates``) and, with a target unclipped share, the
gamma in use from ``param_groups[0]["gamma"]``.
"""

from __future__ import annotations

import numpy as np
import torch

import sophia_torch

from ..scenarios import state_dtype
from . import Driver, Snapshot, Trajectory


def _torch_dtype(dtype: str) -> torch.dtype:
    return getattr(torch, dtype)


def _numpy(tensor: torch.Tensor) -> np.ndarray:
    tensor = tensor.detach()
    if tensor.dtype == torch.bfloat16:
        tensor = tensor.float()
    return tensor.cpu().numpy().copy()


def _step_count(value) -> int:
    return int(value.item()) if isinstance(value, torch.Tensor) else int(value)


class TorchDriver(Driver):
    name = "torch"
    devices = ("cpu", "cuda")
    dtypes = ("float64", "float32", "bfloat16", "float16")

    def _tensor(self, array: np.ndarray, dtype: str) -> torch.Tensor:
        return torch.from_numpy(np.array(array, dtype=state_dtype(dtype))).to(
            device=self.device, dtype=_torch_dtype(dtype))

    def init(self, params, dtype, hyper, learning_rates=None):
        self.dtype = dtype
        self.learning_rates = learning_rates
        tensors = [self._tensor(p, dtype) for p in params]
        # Integer tensors cannot be nn.Parameters: pass them as plain tensors
        # so that the optimizer itself has to refuse them.
        self.params = [torch.nn.Parameter(t) if t.is_floating_point() else t for t in tensors]
        self.opt = sophia_torch.Sophia(
            self.params, lr=hyper.lr, betas=(hyper.b1, hyper.b2), gamma=hyper.gamma,
            weight_decay=hyper.weight_decay, eps=hyper.eps,
            clip_threshold=hyper.clip_threshold, hessian_interval=hyper.hessian_interval,
            refresh_at_start=hyper.refresh_at_start, bias_correction=hyper.bias_correction,
            maximize=hyper.maximize, hessian_bias_correction=hyper.hessian_bias_correction,
            target_unclipped_share=hyper.target_unclipped_share,
            # Scenarios drive refreshes themselves (or none): no advice wanted.
            require_refresh=False, warn_sign_momentum=False,
        )
        self.target = hyper.target_unclipped_share
        self.completed = 0

    def _counters(self) -> dict[str, float]:
        counters = {"hessian_refreshes": self.opt.hessian_refreshes,
                    "rejected_hessian_coordinates": self.opt.rejected_hessian_coordinates}
        if self.target is not None:
            counters["gamma"] = float(self.opt.param_groups[0]["gamma"])
        return counters

    def refresh(self, hhats):
        self.opt.update_hessian([self._tensor(h, state_dtype(self.dtype)) for h in hhats])

    def step(self, grads):
        if self.learning_rates is not None:
            for group in self.opt.param_groups:
                group["lr"] = float(self.learning_rates[self.completed])
        for p, g in zip(self.params, grads, strict=True):
            p.grad = self._tensor(g, self.dtype)
        self.opt.step()
        self.completed += 1

    def read(self):
        states = [self.opt.state[p] for p in self.params]
        steps = {_step_count(s["step"]) for s in states if "step" in s}
        pairs = list(zip(states, self.params, strict=True))

        def slot(s, p, key):
            # State is created lazily, as in torch.optim: none before the first step.
            if key in s:
                return _numpy(s[key])
            return np.zeros(tuple(p.shape), state_dtype(self.dtype))

        return Snapshot(
            params=[_numpy(p) for p in self.params],
            ms=[slot(s, p, "m") for s, p in pairs],
            hs=[slot(s, p, "h") for s, p in pairs],
            step=steps.pop() if len(steps) == 1 else (0 if not steps else -1),
            counters=self._counters(),
        )

    def run(self, streams, *, start=0, stop=None, init=True):
        """The protocol loop with inputs converted once and state recorded in torch.

        Same public calls as ``init``/``refresh``/``step``/``read`` (``p.grad``,
        ``opt.step()``, ``opt.update_hessian``, ``opt.state[p]``), minus the
        per-step numpy conversions that would cost more than the step.
        """
        if not init or start != 0 or stop is not None:
            return super().run(streams, start=start, stop=stop, init=init)
        self.init(streams.params, streams.dtype, streams.scenario.hyper(),
                  streams.learning_rates)
        steps, dtype = streams.steps, streams.dtype
        grads = [self._tensor(g, dtype) for g in streams.grads]
        hhats = [self._tensor(h, state_dtype(dtype)) for h in streams.hhats]
        refresh_index = {int(t): i for i, t in enumerate(streams.refresh_steps)}
        lrs = None if self.learning_rates is None else [float(x) for x in self.learning_rates]
        record = {k: [torch.empty((steps, *p.shape), dtype=dt, device=self.device)
                      for p in self.params]
                  for k, dt in (("p", _torch_dtype(dtype)),
                                ("m", _torch_dtype(state_dtype(dtype))),
                                ("h", _torch_dtype(state_dtype(dtype))))}
        counts, counters = [], []
        with torch.no_grad():
            for t in range(steps):
                if t in refresh_index:
                    self.opt.update_hessian([h[refresh_index[t]] for h in hhats])
                if lrs is not None:
                    for group in self.opt.param_groups:
                        group["lr"] = lrs[t]
                for p, g in zip(self.params, grads, strict=True):
                    p.grad = g[t]
                self.opt.step()
                for i, p in enumerate(self.params):
                    state = self.opt.state[p]
                    record["p"][i][t].copy_(p)
                    record["m"][i][t].copy_(state["m"])
                    record["h"][i][t].copy_(state["h"])
                counts.append(_step_count(self.opt.state[self.params[0]]["step"]))
                counters.append(self._counters())
        self.completed = steps
        return Trajectory(params=[_numpy(x) for x in record["p"]],
                          ms=[_numpy(x) for x in record["m"]],
                          hs=[_numpy(x) for x in record["h"]],
                          steps=np.asarray(counts, dtype=np.int64),
                          counters={k: np.asarray([c[k] for c in counters], dtype=np.float64)
                                    for k in counters[0]})

    def export_state(self, path):
        self.opt.export_state(path)

    def import_state(self, path):
        self.opt.import_state(path)
        self.completed = self.read().step  # the schedule continues from the file's step


DRIVER = TorchDriver


def _host_skip_check(driver: TorchDriver) -> str:
    device = driver.device
    p = torch.nn.Parameter(torch.tensor([1.0, -2.0, 3.0], device=device))
    opt = sophia_torch.Sophia([p], lr=1e-2, hessian_interval=1)
    scaler = torch.amp.GradScaler(device, init_scale=2.0 ** 4)
    scaler.scale((p * p).sum()).backward()
    scaler.step(opt)
    scaler.update()
    opt.zero_grad()
    opt.update_hessian([torch.ones(3, device=device)])
    snapshot = lambda: [p.detach().clone()] + [  # noqa: E731
        v.detach().clone() if isinstance(v, torch.Tensor) else v
        for v in opt.state[p].values()]
    before = snapshot()
    for bad in (float("nan"), float("inf")):
        scale = scaler.get_scale()
        p.grad = torch.tensor([0.5, bad, 1.0], device=device) * scale
        scaler.step(opt)
        scaler.update()
        assert scaler.get_scale() < scale, "GradScaler did not see the non-finite gradient"
        after = snapshot()
        assert all(torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b
                   for a, b in zip(before, after, strict=True)), \
            f"{bad} gradient changed the parameter or the optimizer state"
    return "torch.amp.GradScaler skips the step (scale halved, state unchanged)"


TorchDriver.host_skip_check = _host_skip_check


class TorchModelOps:
    """The estimator model in torch ops, differentiated with torch.autograd."""

    def __init__(self, dtype: str, device: str) -> None:
        import array_api_compat.torch as xp

        self.xp = xp
        self.dtype = _torch_dtype(dtype)
        self.device = device

    def tensor(self, array):
        return torch.as_tensor(np.asarray(array), device=self.device).to(self.dtype)

    def labels(self, array):
        return torch.as_tensor(np.asarray(array), device=self.device)

    def params(self, arrays):
        return [self.tensor(a) for a in arrays]

    def logits(self, params, x):
        w1, b1, w2, b2 = params
        return torch.tanh(x @ w1 + b1) @ w2 + b2

    def grad(self, fn, params):
        params = [p.detach().requires_grad_(True) for p in params]
        return list(torch.autograd.grad(fn(params), params))

    def hvp(self, fn, params, vectors):
        params = [p.detach().requires_grad_(True) for p in params]
        grads = torch.autograd.grad(fn(params), params, create_graph=True)
        return list(torch.autograd.grad(grads, params, grad_outputs=vectors))

    def stop_gradient(self, tensor):
        return tensor.detach()

    def numpy(self, tensor):
        return tensor.detach().cpu().numpy().copy()


TorchDriver.model_ops = lambda self, dtype: TorchModelOps(dtype, self.device)


def _adapter_estimators(driver: TorchDriver, dtype: str):
    """sophia_torch's own estimators with injected noise (uniform=, noise=)."""
    ops = TorchModelOps(dtype, driver.device)

    def loss_of(params, x, labels):
        import sophia_core

        return sophia_core.masked_mean_cross_entropy(ops.logits(params, x), labels, xp=ops.xp)

    def gnb(params, x, labels, uniform):
        p = [t.requires_grad_(True) for t in ops.params(params)]
        xt, lt = ops.tensor(x), ops.labels(labels)
        hhats = sophia_torch.gnb_hessian(ops.logits(p, xt), p, mask=lt != -100,
                                         uniform=ops.tensor(uniform))
        return [ops.numpy(h) for h in hhats]

    def hutchinson(params, x, labels, probes):
        p = [t.requires_grad_(True) for t in ops.params(params)]
        xt, lt = ops.tensor(x), ops.labels(labels)
        hhats = sophia_torch.hutchinson_hessian(loss_of(p, xt, lt), p,
                                                noise=[[ops.tensor(u) for u in probes]])
        return [ops.numpy(h) for h in hhats]

    return gnb, hutchinson


TorchDriver.adapter_estimators = _adapter_estimators
