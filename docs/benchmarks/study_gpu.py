"""The equal-budget study at a larger size, on one GPU: PyTorch and JAX, one script.

What ``study.py`` does on CPU, scaled up for one H100/H200 and sized to end
well within 10 minutes there: a 8-layer, width-512 byte-level GPT (about
25 M parameters), 1,000 steps of 64 x 256 tokens (16 M tokens), trained on
the Python sources installed on the machine (standard library and
site-packages, recursively, at most 64 MB: data that exists offline).

Runs, in this order, until ``--budget-s`` would be passed (a run that would
end after it is skipped and reported as such):

1. PyTorch: AdamW and Sophia-G over equal learning-rate grids (three each,
   a factor 3 apart, Sophia-G's centred on AdamW's / 20: the CPU study found
   / 40 at gamma 0.2), in the order middle, low, high;
2. PyTorch, at Sophia-G's best lr: gamma 1e-12 (sign momentum) and, where
   ``sophia_torch.Sophia`` accepts it, ``target_unclipped_share=0.3``;
3. JAX: the best AdamW and Sophia-G settings again (a cross-check that
   the result is not PyTorch's), on the device JAX picks.

Prints a table (markdown) and the steps each optimizer needs to reach the
other's best loss (as ``study.py``), and writes ``study_gpu.json`` and
``study_gpu.png`` in ``--out``.

    python docs/benchmarks/study_gpu.py --out $OUT        # on the GPU machine
    python docs/benchmarks/study_gpu.py --tiny            # CPU smoke run (the test)

TensorFlow is not part of it. The project needs ``array-api-compat`` (pure
Python); a machine without it can be given the wheel (docs/study.md).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import sys
import time
from typing import Any

# JAX shares the GPU with PyTorch in this process: no preallocation.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(ROOT / "docs" / "examples"))
sys.path.insert(0, str(HERE))
for _folder in (ROOT, ROOT / "backends"):  # a checkout works without installing
    if str(_folder) not in sys.path:
        sys.path.append(str(_folder))

from lm_demo.common import (  # noqa: E402
    PRESETS,
    Config,
    RunResult,
    StepResult,
    count_params,
    load_average,
    machine,
    run_loop,
)
from lm_demo.data import Batches, load_python_sources  # noqa: E402
from study import headline, plot, steps_to_reach, summarize, tables  # noqa: E402

#: The GPU size: about 25 M parameters, 16 M tokens per run.
GPU_CONFIG = Config(n_layer=8, n_embd=512, n_head=8, context=256, batch_size=64, steps=1000,
                    eval_interval=50, validation_windows=256, eval_chunk=64,
                    adamw_lr=1.5e-3, sophia_lr=7.5e-5)
#: Learning-rate grids as multiples of the config's (middle first: if the
#: budget runs out, the runs done are the informative ones).
MULTIPLIERS = (1.0, 1 / 3, 3.0)
TINY = dict(PRESETS["tiny"], steps=20, eval_interval=10)


class TorchTrainer:
    """The demo's PyTorch trainer on any device (the demo's runs on CPU only)."""

    def __init__(self, config: Config, optimizer: str, lr: float, device: str) -> None:
        import torch
        from lm_demo.train_torch import GPT, loss_fn

        torch.manual_seed(config.seed)
        self.torch, self.loss_fn = torch, loss_fn
        self.config, self.device = config, torch.device(device)
        self.model = GPT(config).to(self.device)
        self.params = list(self.model.parameters())
        self.sophia = optimizer == "sophia-g"
        if self.sophia:
            import sophia_torch

            options = {}
            if config.sophia_target_unclipped_share is not None:
                options["target_unclipped_share"] = config.sophia_target_unclipped_share
            self.opt = sophia_torch.Sophia(
                self.params, lr=lr, betas=(config.sophia_b1, config.sophia_b2),
                gamma=config.sophia_gamma, weight_decay=config.sophia_weight_decay,
                hessian_interval=config.hessian_interval,
                hessian_batch_fraction=config.hessian_fraction,
                generator=torch.Generator(device=self.device).manual_seed(config.seed),
                **options)
        else:
            kernel = {"fused": True} if self.device.type == "cuda" else {"foreach": True}
            self.opt = torch.optim.AdamW(
                self.params, lr=lr, betas=config.adamw_betas,
                weight_decay=config.adamw_weight_decay, **kernel)

    def _tensor(self, a):
        return self.torch.from_numpy(a).to(self.device, non_blocking=True)

    def step(self, x, y, lr: float) -> StepResult:
        for group in self.opt.param_groups:
            group["lr"] = lr
        x, y = self._tensor(x), self._tensor(y).long()
        # Sophia-G: the optimizer's own in-step refresh, as in the CPU demo.
        refreshed = self.sophia and self.opt.refresh_hessian(self.model, x, targets=y)
        loss = self.loss_fn(self.model(x), y)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        return StepResult(loss.item(), refreshed)

    def evaluate(self, chunks: list) -> float:
        total, count = 0.0, 0
        with self.torch.no_grad():
            for x, y in chunks:
                loss = self.loss_fn(self.model(self._tensor(x)), self._tensor(y).long())
                total += loss.item() * y.size
                count += y.size
        return total / count

    def unclipped_share(self) -> float | None:
        if not self.sophia:
            return None
        import sophia_core

        states = [self.opt.state[p] for p in self.params]
        group = self.opt.param_groups[0]
        return float(sophia_core.unclipped_share(
            [s["m"] for s in states], [s["h"] for s in states], gamma=group["gamma"],
            eps=group["eps"], clip_threshold=group["clip_threshold"]))


def _available(framework: str) -> str | None:
    import importlib.util

    for module in {"torch": ("torch", "sophia_torch"), "jax": ("jax", "sophia_jax")}[framework]:
        if importlib.util.find_spec(module) is None:
            return f"{module} is not installed"
    return None


def _device(framework: str, tiny: bool) -> str:
    if framework == "torch":
        import torch

        return "cuda" if torch.cuda.is_available() and not tiny else "cpu"
    import jax

    return str(jax.devices()[0])


def _train(framework: str, config: Config, batches: Batches, optimizer: str, lr: float,
           device: str) -> RunResult:
    if framework == "torch":
        trainer = TorchTrainer(config, optimizer, lr, device)
    else:
        from lm_demo.train_jax import Trainer

        trainer = Trainer(config, optimizer, lr)
    return run_loop(trainer, config, batches, RunResult(framework, optimizer, lr), progress=True)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", "--dry-run", dest="tiny", action="store_true",
                        help="the tiny model for a few steps on CPU, 2 MB of data: a smoke run")
    parser.add_argument("--frameworks", nargs="+", choices=("torch", "jax"),
                        default=["torch", "jax"])
    parser.add_argument("--steps", type=int)
    parser.add_argument("--max-mb", type=float, help="corpus size cap (default 64, tiny 2)")
    parser.add_argument("--budget-s", type=float, default=480,
                        help="start no run that would end after this many seconds")
    parser.add_argument("--out", default="study_gpu_results")
    args = parser.parse_args(argv)

    import importlib.util

    if importlib.util.find_spec("array_api_compat") is None:
        raise SystemExit("sophia-xp needs array-api-compat (pure Python): install it, or carry "
                         "its wheel to an offline machine (docs/study.md, the GPU version)")
    started = time.perf_counter()
    config = Config(**TINY) if args.tiny else GPU_CONFIG
    if args.steps:
        config = config.replace(steps=args.steps, eval_interval=min(config.eval_interval,
                                                                     args.steps))
    corpus = load_python_sources(int((args.max_mb or (2 if args.tiny else 64)) * 2**20))
    batches = Batches(corpus, batch_size=config.batch_size, context=config.context,
                      seed=config.seed, validation_windows=config.validation_windows)
    print(f"corpus: {corpus.describe()}")
    print(f"model: {config.n_layer} layers, d={config.n_embd}, {count_params(config) / 1e6:.1f} M "
          f"parameters; {config.steps} steps of {config.tokens_per_step} tokens")
    print(f"machine: {machine()}; {load_average()}")
    frameworks = []
    for framework in args.frameworks:
        reason = _available(framework)
        print(f"{framework}: " + (f"skipped ({reason})" if reason
                                  else f"on {_device(framework, args.tiny)}"))
        if not reason:
            frameworks.append(framework)

    records: list[dict] = []
    skipped: list[str] = []
    durations: list[float] = []

    def run(framework: str, group: str, optimizer: str, lr: float, **changes: Any) -> None:
        label = f"{framework} {optimizer} lr {lr:g}" + "".join(
            f", {k.removeprefix('sophia_')}={v}" for k, v in changes.items())
        elapsed = time.perf_counter() - started
        expected = max(durations) if durations else 0.0
        if elapsed + expected > args.budget_s:
            print(f"skipped (budget): {label}")
            skipped.append(label)
            return
        run_started = time.perf_counter()
        result = _train(framework, config.replace(**changes), batches, optimizer, lr,
                        _device(framework, args.tiny))
        durations.append(time.perf_counter() - run_started)
        print(f"{label}: val {result.final_validation:.4f} "
              f"({durations[-1]:.0f} s with evaluation)", flush=True)
        records.append({**result.to_json(), "group": group, "label": label,
                        "changes": [list(c) for c in changes.items()], "framework": framework})

    summary: dict = {}
    if "torch" in frameworks:
        for multiplier in MULTIPLIERS:
            for optimizer, base in (("adamw", config.adamw_lr), ("sophia-g", config.sophia_lr)):
                run("torch", "sweep", optimizer, base * multiplier)
        torch_records = [r for r in records if r["framework"] == "torch"]
        summary = summarize(torch_records)
        if "sophia-g" in summary["best"]:
            best_lr = summary["best"]["sophia-g"]["lr"]
            run("torch", "gamma", "sophia-g", best_lr, sophia_gamma=1e-12)
            import inspect

            import sophia_torch

            if "target_unclipped_share" in inspect.signature(sophia_torch.Sophia).parameters:
                run("torch", "option", "sophia-g", best_lr, sophia_target_unclipped_share=0.3)
        summary = summarize([r for r in records if r["framework"] == "torch"])
    if "jax" in frameworks:
        best = summary.get("best", {})
        for optimizer, base in (("adamw", config.adamw_lr), ("sophia-g", config.sophia_lr)):
            run("jax", "jax", optimizer, best.get(optimizer, {}).get("lr", base))

    print()
    print("| framework | optimizer | lr | arm | final val loss | unclipped share | "
          "refresh share | wall time |")
    print("|---|---|---|---|---|---|---|---|")
    for r in records:
        share = f"{r['unclipped_share'][-1][1]:.2f}" if r["unclipped_share"] else "-"
        refresh = f"{100 * r['refresh_s'] / r['wall_s']:.1f} %" if r["refreshes"] else "-"
        arm = ", ".join(f"{k.removeprefix('sophia_')}={v}" for k, v in r["changes"]) or "-"
        print(f"| {r['framework']} | {r['optimizer']} | {r['lr']:.3g} | {arm} | "
              f"{r['validation'][-1][1]:.4f} | {share} | {refresh} | {r['wall_s']:.1f} s |")
    torch_records = [r for r in records if r["framework"] == "torch"]
    if torch_records:
        print()
        print(tables(torch_records, summary))
        print("\nheadline (torch): " + headline(summary))
    jax_runs = {r["optimizer"]: r for r in records if r["framework"] == "jax"}
    if jax_runs and summary.get("best"):
        for name, r in jax_runs.items():
            if name in summary["best"]:
                print(f"jax {name} lr {r['lr']:g}: {r['validation'][-1][1]:.4f} "
                      f"(torch {summary['best'][name]['final_validation']:.4f})")
        if {"adamw", "sophia-g"} <= jax_runs.keys():
            target = jax_runs["sophia-g"]["validation"][-1][1]
            reach = steps_to_reach(jax_runs["adamw"]["validation"], target)
            if reach:
                print(f"jax: AdamW reaches Sophia-G's final loss at step {reach:.0f} of "
                      f"{config.steps}: {config.steps / reach:.1f}x")
    for label in skipped:
        print(f"not run (budget {args.budget_s:.0f} s): {label}")
    report = {"command": "python docs/benchmarks/study_gpu.py " + " ".join(
                  sys.argv[1:] if argv is None else argv),
              "machine": machine(), "devices": {f: _device(f, args.tiny) for f in frameworks},
              "corpus": corpus.describe(), "config": dataclasses.asdict(config),
              "runs": records, "summary": summary, "skipped": skipped,
              "seconds": time.perf_counter() - started}
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "study_gpu.json").write_text(json.dumps(report, indent=1))
    if torch_records and summary.get("best"):
        plot(torch_records, summary, out / "study_gpu.png",
             f"GPU study (torch): GPT {config.n_layer}x{config.n_embd}, {config.steps} steps x "
             f"{config.tokens_per_step} tokens")
    print(f"\n{time.perf_counter() - started:.0f} s in all; results in {out}")
    return report


if __name__ == "__main__":
    main()
