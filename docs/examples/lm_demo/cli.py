"""``python docs/examples/lm_demo/run.py``: Sophia-G against AdamW on a byte-level GPT.

Trains the same model on the same batches with the same schedule twice
(Sophia-G, then AdamW), prints a table and writes a PNG of both loss curves.
"""

from __future__ import annotations

import argparse
import importlib
import pathlib
import sys
import time

from .common import (
    PRESETS,
    Config,
    count_params,
    default_threads,
    explain,
    format_table,
    load_average,
    machine,
    plot,
    save_results,
    visible_cpus,
)
from .data import Batches, load_corpus

BACKENDS = {"torch": "train_torch", "jax": "train_jax", "tensorflow": "train_tf"}
OPTIMIZERS = ("sophia-g", "adamw")


def trainer_module(backend: str):
    """The framework's training module (imported only when asked for)."""
    return importlib.import_module(f"{__package__}.{BACKENDS[backend]}")


def build_config(args: argparse.Namespace) -> Config:
    config = Config(**PRESETS[args.size])
    changes = {
        "steps": args.steps, "adamw_lr": args.adamw_lr, "sophia_lr": args.sophia_lr,
        "sophia_gamma": args.gamma, "seed": args.seed, "batch_size": args.batch_size,
        "hessian_interval": args.hessian_interval,
        "sophia_weight_decay": args.sophia_weight_decay,
        "sophia_target_unclipped_share": args.target_unclipped_share,
        "sophia_hessian_bias_correction": args.hessian_bias_correction or None,
    }
    return config.replace(**{k: v for k, v in changes.items() if v is not None})


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backend", choices=tuple(BACKENDS), default="torch")
    p.add_argument("--size", choices=tuple(PRESETS), default="default",
                   help="model/data preset (tiny: a few seconds, for tests)")
    p.add_argument("--tiny", dest="size", action="store_const", const="tiny",
                   help="same as --size tiny")
    p.add_argument("--optimizers", default=",".join(OPTIMIZERS),
                   help="comma-separated, from: " + ", ".join(OPTIMIZERS))
    p.add_argument("--steps", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--adamw-lr", type=float)
    p.add_argument("--sophia-lr", type=float)
    p.add_argument("--gamma", type=float, help="Sophia's gamma (the authors' rho)")
    p.add_argument("--hessian-interval", type=int, help="k: refresh every k steps")
    p.add_argument("--sophia-weight-decay", type=float)
    p.add_argument("--hessian-bias-correction", action="store_true",
                   help="Sophia option: bias-correct h's EMA (torch)")
    p.add_argument("--target-unclipped-share", type=float,
                   help="Sophia option: set gamma at each refresh for this share (torch)")
    p.add_argument("--seed", type=int)
    p.add_argument("--threads", type=int,
                   help="CPU threads for torch/TensorFlow (default: the CPUs not already busy "
                        "by the load average, at least 1)")
    p.add_argument("--out", default="lm_demo_{backend}.png", help="PNG path ({backend} filled in)")
    p.add_argument("--json", help="also write the runs as JSON here")
    p.add_argument("--no-progress", action="store_true", help="no tqdm bars")
    return p


def main(argv: list[str] | None = None) -> list:
    args = parser().parse_args(argv)
    config = build_config(args)
    optimizers = [o.strip() for o in args.optimizers.split(",") if o.strip()]
    for name in optimizers:
        if name not in OPTIMIZERS:
            raise SystemExit(f"unknown optimizer {name!r}; choose from {OPTIMIZERS}")
    started, cpu_started = time.perf_counter(), time.process_time()
    corpus = load_corpus()
    batches = Batches(corpus, batch_size=config.batch_size, context=config.context,
                      seed=config.seed, validation_windows=config.validation_windows)
    module = trainer_module(args.backend)
    print(f"corpus: {corpus.describe()}")
    print(f"model: {config.n_layer} layers, d={config.n_embd}, {config.n_head} heads, "
          f"context {config.context}, {count_params(config) / 1e6:.2f} M parameters; "
          f"{config.steps} steps of {config.tokens_per_step} tokens")
    threads = args.threads or default_threads()
    print(f"machine: {machine()}; {load_average()}")
    if args.backend != "jax":
        print(f"threads: {threads}" + ("" if args.threads else
              f" (of {visible_cpus()} CPUs, fewer when the machine is busy; --threads N to set)"))
    results = []
    for name in optimizers:
        lr = config.sophia_lr if name == "sophia-g" else config.adamw_lr
        results.append(module.train(config, batches, name, lr, progress=not args.no_progress,
                                    threads=threads))
    print()
    print(format_table(results))
    print("CPU time (all threads): " + ", ".join(f"{r.optimizer} {r.cpu_s:.1f} s" for r in results))
    print("wall time: training steps including Hessian refreshes (validation excluded); "
          "refresh share: what the refresh steps took beyond a plain step; "
          "unclipped share: coordinates whose Sophia step is not clipped "
          "(sophia_core.unclipped_share).")
    print(explain(results, default=config == Config()))
    out = pathlib.Path(args.out.format(backend=args.backend))
    title = (f"byte-level GPT on the CPython stdlib ({args.backend}, "
             f"{config.n_layer}x{config.n_embd}, "
             f"{config.steps} steps x {config.tokens_per_step} tokens)")
    plot(results, out, title=title)
    print(f"plot: {out}")
    if args.json:
        save_results(results, args.json, config=config.__dict__, machine=machine(),
                     backend=args.backend, corpus=corpus.describe())
    print(f"total time: {time.perf_counter() - started:.1f} s wall, "
          f"{time.process_time() - cpu_started:.1f} s CPU; {load_average()}")
    sys.stdout.flush()
    return results
