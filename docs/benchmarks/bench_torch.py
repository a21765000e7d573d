"""Step time of sophia_torch against torch.optim.AdamW(foreach=True) and the authors' SophiaG.

Same process, same parameters and gradients, optimizers interleaved within
each repeat, median of repeats. Two parameter sets:

- ``gpt2``: GPT-2 small's 148 parameter tensors (124,439,808 parameters);
- ``many``: 2,000 tensors of 4,096 elements.

Run (from the repository root)::

    PYTHONPATH=.:backends python docs/benchmarks/bench_torch.py --repeats 7

Prints one table per parameter set: median milliseconds per step and the
ratio to AdamW(foreach) and to the authors' SophiaG (``sophia-opt``), plus
optimizer state memory as a multiple of the parameters. Timings, not tests.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from gpt2_shapes import gpt2_small_shapes  # docs/benchmarks/, beside this script

import sophia_torch

CASES = {
    "gpt2": lambda: list(gpt2_small_shapes().values()),
    "many": lambda: [(4096,)] * 2000,
}


def make_params(shapes: list[tuple[int, ...]], grads: list[torch.Tensor] | None = None,
                ) -> list[torch.nn.Parameter]:
    """Parameters with gradients; ``grads`` (shared, read-only) when given."""
    gen = torch.Generator().manual_seed(0)
    params = []
    for i, shape in enumerate(shapes):
        p = torch.nn.Parameter(torch.randn(shape, generator=gen) * 0.02)
        p.grad = torch.randn(shape, generator=gen) * 1e-3 if grads is None else grads[i]
        params.append(p)
    return params


def optimizers(shapes: list[tuple[int, ...]], which: list[str],
               ) -> dict[str, tuple[torch.optim.Optimizer, list[torch.nn.Parameter]]]:
    """Each optimizer gets its own copy of the parameters (sophia_torch views
    them into its flat buffers); all share the same gradient tensors."""
    grads = [p.grad for p in make_params(shapes)]
    made: dict[str, tuple[torch.optim.Optimizer, list[torch.nn.Parameter]]] = {}
    for name in which:
        params = make_params(shapes, grads)
        if name == "adamw_foreach":
            opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.1, foreach=True)
        elif name == "authors_sophiag":
            from sophia_opt import SophiaG as AuthorsSophiaG

            opt = AuthorsSophiaG(params, lr=1e-4)
        elif name == "sophia_torch":
            opt = sophia_torch.Sophia(params, lr=1e-4)
        elif name == "sophia_torch_dropin":
            opt = sophia_torch.SophiaG(params, lr=1e-4)
        elif name == "sophia_torch_fused":
            opt = sophia_torch.Sophia(params, lr=1e-4, fused=True)
        elif name == "sophia_torch_per_tensor":
            opt = sophia_torch.Sophia(params, lr=1e-4, foreach=False)
        else:
            raise ValueError(f"unknown optimizer {name!r}")
        made[name] = (opt, params)
    return made


def state_ratio(opt: torch.optim.Optimizer, params: list[torch.nn.Parameter]) -> float:
    """Bytes of per-parameter state tensors (excluding scalar step counts) / parameter bytes."""
    param_bytes = sum(p.numel() * p.element_size() for p in params)
    state_bytes = sum(t.numel() * t.element_size() for s in opt.state.values()
                      for t in s.values() if isinstance(t, torch.Tensor) and t.dim() > 0)
    return state_bytes / param_bytes


def bench(case: str, which: list[str], repeats: int, warmup: int) -> None:
    shapes = CASES[case]()
    count = sum(torch.Size(s).numel() for s in shapes)
    opts = optimizers(shapes, which)
    times: dict[str, list[float]] = {name: [] for name in opts}
    with torch.no_grad():
        for r in range(warmup + repeats):
            for name, (opt, _) in opts.items():  # interleaved: load drifts hit all alike
                start = time.perf_counter()
                opt.step()
                elapsed = time.perf_counter() - start
                if r >= warmup:
                    times[name].append(elapsed)
    median = {name: statistics.median(ts) for name, ts in times.items()}
    print(f"\n{case}: {len(shapes)} tensors, {count:,} parameters, "
          f"{torch.get_num_threads()} thread(s), median of {repeats} (after {warmup} warm-up)")
    print(f"{'optimizer':26s} {'ms/step':>9s} {'vs AdamW':>9s} {'vs authors':>11s} {'state':>6s}")
    for name, t in median.items():
        vs_adamw = t / median["adamw_foreach"] if "adamw_foreach" in median else float("nan")
        vs_auth = t / median["authors_sophiag"] if "authors_sophiag" in median else float("nan")
        print(f"{name:26s} {t * 1e3:9.1f} {vs_adamw:9.3f} {vs_auth:11.3f} "
              f"{state_ratio(*opts[name]):5.2f}x")
    del opts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--optimizers", nargs="+",
                        default=["adamw_foreach", "authors_sophiag", "sophia_torch",
                                 "sophia_torch_dropin"])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads (default: torch's own choice)")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, chunk {sophia_torch.CHUNK} elements")
    for case in args.cases:
        bench(case, args.optimizers, args.repeats, args.warmup)


if __name__ == "__main__":
    main()
