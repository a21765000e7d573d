"""Measurements on the language-model demo for one framework (run by run_all.py).

``overhead``: the Hessian refresh's share of Sophia-G's training time at
k = ``hessian_interval``, and Sophia-G's time per step against AdamW's, on
the demo model, measured in this process (interleaved, medians).

``convergence``: AdamW and Sophia-G, each over the same small sweep of
learning-rate multipliers; how many steps the best Sophia-G run needs to
reach the best AdamW run's final validation loss.

    python docs/benchmarks/lm_bench.py overhead --framework torch --json out.json
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "examples"))

from lm_demo.cli import trainer_module  # noqa: E402
from lm_demo.common import PRESETS, Config, RunResult, run_loop  # noqa: E402
from lm_demo.data import Batches, load_corpus  # noqa: E402

BACKEND_NAMES = {"torch": "torch", "jax": "jax", "tensorflow": "tensorflow"}


def _config(args: argparse.Namespace) -> Config:
    config = Config(**PRESETS[args.size])
    if args.steps:
        config = config.replace(steps=args.steps)
    if args.eval_interval:
        config = config.replace(eval_interval=args.eval_interval)
    return config


def _batches(config: Config) -> Batches:
    return Batches(load_corpus(), batch_size=config.batch_size, context=config.context,
                   seed=config.seed, validation_windows=config.validation_windows)


def overhead(args: argparse.Namespace) -> dict:
    """Median times of a step (both optimizers) and of a refresh, same process."""
    config = _config(args)
    batches = _batches(config)
    module = trainer_module(args.framework)
    chunks = batches.validation(config.eval_chunk)
    trainers = {name: module.Trainer(config, name, 1e-4) for name in ("sophia-g", "adamw")}
    for trainer in trainers.values():
        if hasattr(trainer, "warmup"):
            trainer.warmup(*batches.train(0), chunks)
    steps = {name: [] for name in trainers}
    refreshes = []
    k = config.hessian_interval
    for step in range(args.repeats * k):
        x, y = batches.train(step)
        for name, trainer in trainers.items():  # interleaved
            start = time.perf_counter()
            _, refreshed = trainer.step(x, y, 1e-4)
            seconds = time.perf_counter() - start
            (refreshes if refreshed else steps[name]).append(seconds)
    # The first step of each trainer may still compile or allocate: drop it.
    step_s = {name: statistics.median(times[1:]) for name, times in steps.items()}
    refresh_step_s = statistics.median(refreshes[1:] if len(refreshes) > 1 else refreshes)
    refresh_s = max(0.0, refresh_step_s - step_s["sophia-g"])
    sophia_per_k = k * step_s["sophia-g"] + refresh_s
    return {
        "framework": args.framework,
        "k": k,
        "step_s": step_s,
        "refresh_step_s": refresh_step_s,
        "refresh_s": refresh_s,
        "refreshes": len(refreshes),
        "hessian_fraction": config.hessian_fraction,
        "refresh_share": refresh_s / sophia_per_k,
        "sophia_vs_adamw": sophia_per_k / (k * step_s["adamw"]),
        "tokens_per_step": config.tokens_per_step,
    }


def convergence(args: argparse.Namespace) -> dict:
    """The learning-rate sweep for both optimizers, and steps-to-target."""
    config = _config(args)
    batches = _batches(config)
    module = trainer_module(args.framework)
    runs: dict[str, list[RunResult]] = {"adamw": [], "sophia-g": []}
    for multiplier in args.multipliers:
        for name in runs:
            base = config.sophia_lr if name == "sophia-g" else config.adamw_lr
            trainer = module.Trainer(config, name, base * multiplier)
            result = RunResult(backend=args.framework, optimizer=name, lr=base * multiplier)
            runs[name].append(run_loop(trainer, config, batches, result, progress=False))
            print(f"{args.framework} {name} lr={base * multiplier:g}: "
                  f"val {result.final_validation:.4f}, {result.wall_s:.1f} s", flush=True)
    best = {name: min(rs, key=lambda r: r.final_validation) for name, rs in runs.items()}
    target = best["adamw"].final_validation
    reached = next((s for s, v in best["sophia-g"].validation if v <= target), None)
    adamw_steps = best["adamw"].steps
    return {
        "framework": args.framework,
        "config": config.__dict__,
        "target": target,
        "sophia_steps_to_target": reached,
        "adamw_steps": adamw_steps,
        "step_ratio": (reached / adamw_steps) if reached else None,
        "runs": {name: [r.to_json() for r in rs] for name, rs in runs.items()},
        "best": {name: r.to_json() for name, r in best.items()},
    }


def sophia_h(args: argparse.Namespace) -> dict:
    """PyTorch, Sophia-H: training-step time of ``sophia_torch.SophiaH`` and
    ``pytorch_optimizer.SophiaH`` (where installed) against AdamW(foreach).

    Each sample is ``k`` training steps of the demo model including one
    Hutchinson refresh (double backward), timed interleaved; medians.
    """
    import torch
    from lm_demo.train_torch import GPT, loss_fn

    import sophia_torch

    config = _config(args)
    batches = _batches(config)
    k = config.hessian_interval
    candidates = {}

    def make(name):
        torch.manual_seed(config.seed)
        model = GPT(config)
        params = list(model.parameters())
        if name == "AdamW(foreach)":
            opt = torch.optim.AdamW(params, lr=1e-4, foreach=True)
        elif name == "sophia_torch.SophiaH":
            opt = sophia_torch.SophiaH(params, lr=1e-4, hessian_interval=k)
        else:
            import pytorch_optimizer

            opt = pytorch_optimizer.SophiaH(params, lr=1e-4, update_period=k)
        return model, params, opt

    names = ["AdamW(foreach)", "sophia_torch.SophiaH"]
    try:
        import pytorch_optimizer  # noqa: F401

        names.append("pytorch_optimizer.SophiaH")
    except ImportError:
        pass
    for name in names:
        candidates[name] = make(name)
    generator = torch.Generator().manual_seed(0)

    def train_step(name, step):
        model, params, opt = candidates[name]
        x, y = (torch.from_numpy(a) for a in batches.train(step))
        loss = loss_fn(model(x), y.long())
        opt.zero_grad(set_to_none=True)
        if name == "sophia_torch.SophiaH" and opt.hessian_refresh_due():
            hhats = sophia_torch.hutchinson_hessian(loss, params, generator=generator,
                                                    retain_graph=True)
            opt.update_hessian(hhats)
            loss.backward()
        elif name == "pytorch_optimizer.SophiaH" and step % k == 0:
            loss.backward(create_graph=True)  # its step computes Hutchinson from the graph
        else:
            loss.backward()
        opt.step()

    # CPU flash attention has no double backward: every candidate uses the math kernel.
    from torch.nn.attention import SDPBackend, sdpa_kernel

    samples = {name: [] for name in names}
    with sdpa_kernel(SDPBackend.MATH):
        _time_blocks(names, train_step, samples, args.repeats, k)
    medians = {name: statistics.median(v) for name, v in samples.items()}
    return {"framework": "torch", "k": k, "step_s": medians, "attention": "math kernel",
            "ratio": {name: t / medians["AdamW(foreach)"] for name, t in medians.items()}}


def _time_blocks(names, train_step, samples, repeats, k) -> None:
    for repeat in range(repeats + 1):
        for name in names:  # interleaved
            start = time.perf_counter()
            for step in range(repeat * k, (repeat + 1) * k):
                train_step(name, step)
            if repeat:  # the first block warms up
                samples[name].append((time.perf_counter() - start) / k)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("task", choices=("overhead", "convergence", "sophia-h"))
    parser.add_argument("--framework", choices=tuple(BACKEND_NAMES), required=True)
    parser.add_argument("--size", choices=tuple(PRESETS), default="default")
    parser.add_argument("--steps", type=int)
    parser.add_argument("--eval-interval", type=int)
    parser.add_argument("--repeats", type=int, default=5, help="overhead: refresh periods timed")
    parser.add_argument("--multipliers", type=float, nargs="+", default=[0.5, 1.0, 2.0],
                        help="convergence: learning rates as multiples of the demo's")
    parser.add_argument("--json", required=True)
    args = parser.parse_args(argv)
    result = {"overhead": overhead, "convergence": convergence, "sophia-h": sophia_h}[args.task](
        args)
    pathlib.Path(args.json).write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
