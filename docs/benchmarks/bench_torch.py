"""Step time and peak memory of sophia_torch against AdamW(foreach=True) and the authors' SophiaG.

**Time** (default): same process, same parameters and gradients, optimizers
interleaved within each repeat, median of repeats; ratios to
AdamW(foreach=True) and to the authors' SophiaG (``sophia-opt``). Two
parameter sets:

- ``gpt2``: GPT-2 small's 148 parameter tensors (124,439,808 parameters);
- ``many``: 2,000 tensors of 4,096 elements.

**Memory** (``--memory``): each optimizer in its own process, on its own
parameters and gradients; for each of the first ``--memory-steps`` steps,
the peak resident memory during the step above the resident memory before
it (Linux ``VmHWM`` after resetting it through ``/proc/self/clear_refs``),
as a multiple of the parameter bytes. Step 1 allocates the optimizer state
(2x for all of these). glibc is told to return large blocks to the system
at once (``MALLOC_MMAP_THRESHOLD_``), so freed temporaries do not hide in
its heap.

Run (from the repository root)::

    PYTHONPATH=.:backends python docs/benchmarks/bench_torch.py --repeats 7 --threads 1
    PYTHONPATH=.:backends python docs/benchmarks/bench_torch.py --memory

Timings and measurements, not tests.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch
from gpt2_shapes import gpt2_small_shapes  # docs/benchmarks/, beside this script

import sophia_torch

CASES = {
    "gpt2": lambda: list(gpt2_small_shapes().values()),
    "many": lambda: [(4096,)] * 2000,
}
OPTIMIZERS = ("adamw_foreach", "authors_sophiag", "sophia_torch", "sophia_torch_dropin",
              "sophia_torch_compiled", "sophia_torch_for_loop")


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


def make_optimizer(name: str, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    # No Hessian refreshes here (the step alone is timed): no warning about them.
    quiet = dict(require_refresh=False)
    if name == "adamw_foreach":
        return torch.optim.AdamW(params, lr=1e-4, weight_decay=0.1, foreach=True)
    if name == "authors_sophiag":
        from sophia_opt import SophiaG as AuthorsSophiaG

        return AuthorsSophiaG(params, lr=1e-4)
    if name == "sophia_torch":
        return sophia_torch.Sophia(params, lr=1e-4, **quiet)
    if name == "sophia_torch_dropin":
        return sophia_torch.SophiaG(params, lr=1e-4, **quiet)
    if name == "sophia_torch_compiled":
        return sophia_torch.Sophia(params, lr=1e-4, compiled=True, **quiet)
    if name == "sophia_torch_for_loop":
        return sophia_torch.Sophia(params, lr=1e-4, foreach=False, **quiet)
    raise ValueError(f"unknown optimizer {name!r}")


def optimizers(shapes: list[tuple[int, ...]], which: list[str],
               ) -> dict[str, tuple[torch.optim.Optimizer, list[torch.nn.Parameter]]]:
    """Each optimizer gets its own copy of the parameters; all share the same
    gradient tensors."""
    grads = [p.grad for p in make_params(shapes)]
    made = {}
    for name in which:
        params = make_params(shapes, grads)
        made[name] = (make_optimizer(name, params), params)
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
          f"{torch.get_num_threads()} thread(s), median of {repeats} (after {warmup} warm-up), "
          f"{_load()}")
    print(f"{'optimizer':26s} {'ms/step':>9s} {'vs AdamW':>9s} {'vs authors':>11s} {'state':>6s}")
    for name, t in median.items():
        vs_adamw = t / median["adamw_foreach"] if "adamw_foreach" in median else float("nan")
        vs_auth = t / median["authors_sophiag"] if "authors_sophiag" in median else float("nan")
        print(f"{name:26s} {t * 1e3:9.1f} {vs_adamw:9.3f} {vs_auth:11.3f} "
              f"{state_ratio(*opts[name]):5.2f}x")
    del opts


# -- peak memory -------------------------------------------------------------------------


def _resident() -> tuple[int, int]:
    """(current, peak) resident bytes of this process."""
    values = {}
    with open("/proc/self/status") as status:
        for line in status:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                values[key] = int(rest.split()[0]) * 1024
    return values["VmRSS"], values["VmHWM"]


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")  # resets VmHWM to the current resident size


def memory_child(name: str, case: str, steps: int) -> None:
    """In a fresh process: peak memory of each step above the memory before it."""
    params = make_params(CASES[case]())
    param_bytes = sum(p.numel() * p.element_size() for p in params)
    opt = make_optimizer(name, params)
    peaks = []
    with torch.no_grad():
        for _ in range(steps):
            before, _ = _resident()
            _reset_peak()
            opt.step()
            _, peak = _resident()
            peaks.append((peak - before) / param_bytes)
    print(json.dumps({"optimizer": name, "case": case, "peaks": peaks}))


def memory(cases: list[str], which: list[str], steps: int) -> None:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "0",
           "OMP_NUM_THREADS": "1"}
    for case in cases:
        print(f"\n{case}: peak memory during each step above the memory before it, "
              f"/ parameter bytes ({steps} steps, one process per optimizer)")
        print(f"{'optimizer':26s} " + " ".join(f"{'step ' + str(i + 1):>7s}"
                                                 for i in range(steps)) + f" {'max':>6s}")
        for name in which:
            out = subprocess.run(
                [sys.executable, __file__, "--memory-child", name, "--cases", case,
                 "--memory-steps", str(steps)],
                env=env, check=True, capture_output=True, text=True).stdout
            peaks = json.loads(out.strip().splitlines()[-1])["peaks"]
            print(f"{name:26s} " + " ".join(f"{p:7.2f}" for p in peaks) + f" {max(peaks):6.2f}")


def _load() -> str:
    try:
        return "load average {:.1f} {:.1f} {:.1f}".format(*os.getloadavg())
    except OSError:
        return "load average unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--optimizers", nargs="+", choices=OPTIMIZERS,
                        default=["adamw_foreach", "authors_sophiag", "sophia_torch",
                                 "sophia_torch_dropin"])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads (default: torch's own choice)")
    parser.add_argument("--memory", action="store_true",
                        help="measure peak memory per step instead of time")
    parser.add_argument("--memory-steps", type=int, default=3)
    parser.add_argument("--memory-child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child:
        memory_child(args.memory_child, args.cases[0], args.memory_steps)
        return
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, chunk {sophia_torch.CHUNK} elements")
    if args.memory:
        memory(args.cases, args.optimizers, args.memory_steps)
        return
    for case in args.cases:
        bench(case, args.optimizers, args.repeats, args.warmup)


if __name__ == "__main__":
    main()
