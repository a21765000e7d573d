r"""Estimators across frameworks: one small model, injected noise, the same hhat.

The model (``MLP``): ``logits = tanh(x W1 + b1) W2 + b2`` with a softmax
cross-entropy head (``sophia_core.masked_mean_cross_entropy``; some label
positions are ``IGNORE_INDEX``). Weights, data and noise come from a seed.
Each framework defines the forward pass in its own ops and differentiates it
with its own autodiff (driver hook ``model_ops``); the array parts (Gumbel-max
sampling from the injected uniform noise, ``N ghat^2``, ``u * Hu``) are the
core's, run on that framework's namespace. The numpy reference
differentiates by hand (backprop, and Pearlmutter's R-operator for
``H v``).

Checks, per backend against the numpy reference:

- GNB and Hutchinson hhat at the initial weights (and, where the adapter's
  own estimator functions accept injected noise, those too: driver hook
  ``adapter_estimators``; sophia_torch's do, sophia_jax's and sophia_tf's
  draw their noise from a key/seed);
- a 50-step training run through the backend's optimizer (driver protocol),
  gradients from the backend's autodiff, GNB refreshes every 10 steps.

Tolerance (reductions differ across frameworks, so not bitwise): every
quantity is a chain of at most ``L = 4`` reductions of at most ``n = 32``
terms (forward and backward through two layers); a reduction of ``n``
terms has relative error at most ``n u`` times the condition factor
``kappa = sum|terms| / |sum|``. With ``kappa <= 8`` for this model
(measured on the reference: see ``docs/conformance.md``) the estimator
budget is ``K u`` with ``K = L n kappa = 1024``, relative to the tensor's
largest magnitude. Over the training run the update is clipped, so the
gradient error moves theta by at most ``lr * c * 2 K u`` per step
(the step's relative error, bounded by the relative errors of m and h),
doubled for the feedback through the loss: ``4 K u * steps * lr * c``
absolute.
"""

from __future__ import annotations

import dataclasses

import numpy as np

import sophia_core as core

from .drivers import driver_for

__all__ = ["MLP", "make_model", "reference_gnb", "reference_grads", "reference_hutchinson",
           "run_part"]

D, H, V, N = 8, 16, 5, 32
K = 1024
TRAIN_STEPS = 50
TRAIN_HYPER = {"lr": 1e-2, "hessian_interval": 10, "weight_decay": 0.1}
DTYPES = ("float64", "float32")


@dataclasses.dataclass(frozen=True)
class MLP:
    """Weights ``[W1, b1, W2, b2]``, inputs, labels (with ignored positions) and noise."""

    params: list[np.ndarray]
    x: np.ndarray
    labels: np.ndarray
    #: Uniform noise of shape (N, V) per GNB refresh (index = refresh number).
    uniform: np.ndarray
    #: Standard normal Hutchinson probes, one list per parameter.
    probes: list[np.ndarray]

    def cast(self, dtype: str) -> MLP:
        return MLP(params=[p.astype(dtype) for p in self.params], x=self.x.astype(dtype),
                   labels=self.labels, uniform=self.uniform.astype(dtype),
                   probes=[u.astype(dtype) for u in self.probes])


def make_model(seed: int = 0) -> MLP:
    rng = np.random.default_rng([seed, 1234])
    params = [rng.standard_normal((D, H)) / np.sqrt(D), 0.1 * rng.standard_normal(H),
              rng.standard_normal((H, V)) / np.sqrt(H), 0.1 * rng.standard_normal(V)]
    x = rng.standard_normal((N, D))
    labels = rng.integers(0, V, N).astype(np.int64)
    labels[rng.choice(N, 4, replace=False)] = core.IGNORE_INDEX
    uniform = rng.random((TRAIN_STEPS // TRAIN_HYPER["hessian_interval"] + 1, N, V))
    uniform = np.clip(uniform, 1e-6, 1 - 1e-6)  # no log(0) in any dtype
    probes = [rng.standard_normal(p.shape) for p in params]
    return MLP(params, x, labels, uniform, probes)


# -- the numpy reference: backprop and the R-operator by hand -----------------

def _forward(params, x):
    w1, b1, w2, b2 = params
    hidden = np.tanh(x @ w1 + b1)
    return hidden, hidden @ w2 + b2


def _dlogits(z, labels):
    counted = labels != core.IGNORE_INDEX
    s = np.exp(z - z.max(axis=-1, keepdims=True))
    s /= s.sum(axis=-1, keepdims=True)
    onehot = (labels[:, None] == np.arange(z.shape[-1])).astype(z.dtype)
    return (s - onehot) * counted[:, None].astype(z.dtype) / max(int(counted.sum()), 1), s


def _backprop(params, x, hidden, dz):
    w1, b1, w2, b2 = params
    dh = dz @ w2.T
    da = dh * (1 - hidden * hidden)
    return [x.T @ da, da.sum(0), hidden.T @ dz, dz.sum(0)]


def reference_grads(params, x, labels):
    hidden, z = _forward(params, x)
    dz, _ = _dlogits(z, labels)
    return _backprop(params, x, hidden, dz)


def reference_gnb(params, x, mask_labels, uniform):
    _, z = _forward(params, x)
    labels = core.sample_labels(z, uniform, mask=mask_labels != core.IGNORE_INDEX, xp=np)
    positions = core.num_positions(labels, xp=np)
    return [core.gnb_estimate(g, positions, xp=np) for g in reference_grads(params, x, labels)]


def reference_hutchinson(params, x, labels, probes):
    w1, b1, w2, b2 = params
    v1, c1, v2, c2 = probes
    hidden, z = _forward(params, x)
    dz, s = _dlogits(z, labels)
    counted = (labels != core.IGNORE_INDEX)[:, None].astype(z.dtype)
    r_a = x @ v1 + c1
    r_hidden = (1 - hidden * hidden) * r_a
    r_z = r_hidden @ w2 + hidden @ v2 + c2
    r_s = s * (r_z - (s * r_z).sum(-1, keepdims=True))
    r_dz = r_s * counted / max(int(counted.sum()), 1)
    dh = dz @ w2.T
    r_dh = r_dz @ w2.T + dz @ v2.T
    r_da = r_dh * (1 - hidden * hidden) - dh * 2 * hidden * r_hidden
    hvps = [x.T @ r_da, r_da.sum(0), r_hidden.T @ dz + hidden.T @ r_dz, r_dz.sum(0)]
    return [core.hutchinson_estimate([u], [hu], xp=np) for u, hu in zip(probes, hvps,
                                                                          strict=True)]


# -- frameworks: the same functions over a driver's model_ops ------------------

def framework_functions(ops):
    """(grads, gnb, hutchinson) for a framework's ``ModelOps``; numpy in and out."""
    xp = ops.xp

    def loss(params, x, labels):
        return core.masked_mean_cross_entropy(ops.logits(params, x), labels, xp=xp)

    def grads(params, x, labels):
        p, xt, lt = ops.params(params), ops.tensor(x), ops.labels(labels)
        return [ops.numpy(g) for g in ops.grad(lambda q: loss(q, xt, lt), p)]

    def gnb(params, x, mask_labels, uniform):
        p, xt = ops.params(params), ops.tensor(x)
        z = ops.stop_gradient(ops.logits(p, xt))
        mask = ops.labels(mask_labels) != core.IGNORE_INDEX
        labels = core.sample_labels(z, ops.tensor(uniform), mask=mask, xp=xp)
        positions = core.num_positions(labels, xp=xp)
        ghat = ops.grad(lambda q: loss(q, xt, labels), p)
        return [ops.numpy(core.gnb_estimate(g, positions, xp=xp)) for g in ghat]

    def hutchinson(params, x, labels, probes):
        p, xt, lt = ops.params(params), ops.tensor(x), ops.labels(labels)
        us = [ops.tensor(u) for u in probes]
        hvps = ops.hvp(lambda q: loss(q, xt, lt), p, us)
        return [ops.numpy(core.hutchinson_estimate([u], [hu], xp=xp))
                for u, hu in zip(us, hvps, strict=True)]

    return grads, gnb, hutchinson


def _functions(name: str, dtype: str, device: str):
    if name == "numpy":
        return reference_grads, reference_gnb, reference_hutchinson
    return framework_functions(driver_for(name, device).model_ops(dtype))


def _train(name: str, model: MLP, dtype: str, device: str) -> list[np.ndarray]:
    """Parameters after each of TRAIN_STEPS steps of the backend's optimizer."""
    grads_fn, gnb_fn, _ = _functions(name, dtype, device)
    driver = driver_for(name, device, cpu_fallback=True)
    hyper = core.Hyperparameters(**TRAIN_HYPER)
    driver.init(model.params, dtype, hyper)
    history = []
    refreshes = 0
    for t in range(TRAIN_STEPS):
        params = driver.read().params
        if core.refresh_due(t, hessian_interval=hyper.hessian_interval):
            driver.refresh(gnb_fn(params, model.x, model.labels, model.uniform[refreshes]))
            refreshes += 1
        driver.step(grads_fn(params, model.x, model.labels))
        history.append(np.concatenate([p.ravel() for p in driver.read().params]))
    return history


def _relative(got: list[np.ndarray], ref: list[np.ndarray]) -> float:
    worst = 0.0
    for g, r in zip(got, ref, strict=True):
        scale = max(float(np.abs(r).max()), np.finfo(r.dtype).tiny)
        worst = max(worst, float(np.abs(g.astype(np.float64) - r).max()) / scale)
    return worst


def run_part(backends: list[str], *, device: str = "cpu") -> list[dict]:
    rows = []
    base = make_model()
    for dtype in DTYPES:
        model = base.cast(dtype)
        u = float(np.finfo(dtype).eps) / 2
        ref_grads, ref_gnb, ref_hutch = _functions("numpy", dtype, "cpu")
        golden = {
            "GNB hhat": ref_gnb(model.params, model.x, model.labels, model.uniform[0]),
            "Hutchinson hhat": ref_hutch(model.params, model.x, model.labels, model.probes),
        }
        golden_train = None
        for name in backends:
            if name in ("numpy", "array_api_strict"):
                continue
            try:
                _, gnb_fn, hutch_fn = _functions(name, dtype, device)
                got = {
                    "GNB hhat": gnb_fn(model.params, model.x, model.labels, model.uniform[0]),
                    "Hutchinson hhat": hutch_fn(model.params, model.x, model.labels,
                                                model.probes),
                }
            except Exception as exc:  # a crash is a failed row
                rows.append({"backend": name, "check": "estimators", "dtype": dtype,
                             "deviation / budget": "-", "passed": False,
                             "detail": f"{type(exc).__name__}: {exc}"})
                continue
            adapter = getattr(driver_for(name, device, cpu_fallback=True),
                              "adapter_estimators", None)
            if adapter is not None:  # the adapter's own estimators take injected noise
                try:
                    a_gnb, a_hutch = adapter(dtype)
                    got["GNB hhat (adapter API)"] = a_gnb(model.params, model.x, model.labels,
                                                          model.uniform[0])
                    got["Hutchinson hhat (adapter API)"] = a_hutch(
                        model.params, model.x, model.labels, model.probes)
                except Exception as exc:  # a crash is a failed row
                    rows.append({"backend": name, "check": "estimators (adapter API)",
                                 "dtype": dtype, "deviation / budget": "-", "passed": False,
                                 "detail": f"{type(exc).__name__}: {exc}"})
            for check in got:
                ref = golden[check.replace(" (adapter API)", "")]
                deviation = _relative(got[check], ref) / (K * u)
                rows.append({"backend": name, "check": check, "dtype": dtype,
                             "deviation / budget": f"{deviation:.3g}",
                             "passed": deviation <= 1, "detail": ""})
            try:
                if golden_train is None:
                    golden_train = _train("numpy", model, dtype, "cpu")
                trajectory = _train(name, model, dtype, device)
            except Exception as exc:  # a crash is a failed row
                rows.append({"backend": name, "check": f"{TRAIN_STEPS}-step training",
                             "dtype": dtype, "deviation / budget": "-", "passed": False,
                             "detail": f"{type(exc).__name__}: {exc}"})
                continue
            budget = 4 * K * u * TRAIN_STEPS * TRAIN_HYPER["lr"]
            worst = max(float(np.abs(g - r).max())
                        for g, r in zip(trajectory, golden_train, strict=True))
            rows.append({"backend": name, "check": f"{TRAIN_STEPS}-step training",
                         "dtype": dtype, "deviation / budget": f"{worst / budget:.3g}",
                         "passed": worst <= budget,
                         "detail": f"max |theta - reference| = {worst:.3g} (budget {budget:.3g})"})
    return rows
