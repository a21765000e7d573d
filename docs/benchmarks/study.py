"""The equal-budget study: Sophia-G against AdamW on the demo's model (``nox -s study``).

Every run is the language-model demo's model, data and schedule
(``docs/examples/lm_demo``), trained with one framework thread, so its losses
do not depend on the machine or on how many runs share it (timings do).
Runs go to ``--jobs`` worker processes (by default the CPUs that are not
busy, see ``default_jobs``).

1. **Learning-rate sweeps with equal budgets**: the same number of peak
   learning rates for AdamW and for Sophia-G, on grids meant to bracket each
   optimum. The study checks that each best lies inside its grid (a lower
   and a higher lr were both worse) and says so when it does not.
2. **At Sophia-G's best learning rate**, runs that change one thing each:
   ``gamma`` (1e-12 makes every coordinate clipped, i.e. sign momentum;
   5 leaves most coordinates unclipped), weight decay (none, and the value
   whose per-step shrinkage matches AdamW's), and the core-v2 options
   ``hessian_bias_correction=True`` and ``target_unclipped_share`` 0.3 and
   0.9 (only where the installed adapter accepts them: PyTorch); and a
   Sophia-G sweep at gamma 5 (1 to 8 times that lr), which shows how the
   best lr moves with the unclipped share.

Reported: for each optimizer's best run, the steps it needs to reach the
other's best final validation loss, linearly interpolated between the two
evaluation points that straddle the target on its validation curve; the
unclipped share (``sophia_core.unclipped_share``) and the Hessian refresh's
share of the training time at every evaluation; a PNG and a JSON of
everything, and markdown tables.

    python docs/benchmarks/study.py                    # about 20 minutes on 2 idle cores
    python docs/benchmarks/study.py --quick            # a smoke run (tiny model)
    python docs/benchmarks/study.py --out docs/study   # what docs/study.md records
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import math
import multiprocessing
import os
import pathlib
import queue
import sys
import time
from collections.abc import Callable
from concurrent import futures
from typing import Any

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(ROOT / "docs" / "examples"))
for _folder in (ROOT, ROOT / "backends"):  # a checkout works without installing
    if str(_folder) not in sys.path:
        sys.path.append(str(_folder))

from lm_demo.common import (  # noqa: E402
    PRESETS,
    Config,
    RunResult,
    load_average,
    machine,
    visible_cpus,
)

#: Peak learning rates of the full study: a factor-2 grid of five per
#: optimizer; each best has a worse neighbour on both sides (measured).
ADAMW_LRS = (5e-4, 1e-3, 2e-3, 4e-3, 8e-3)
SOPHIA_LRS = (5e-5, 1e-4, 2e-4, 4e-4, 8e-4)
#: The quick (smoke) run: the tiny model, three rates each.
QUICK_ADAMW_LRS = (5e-3, 1e-2, 2e-2)
QUICK_SOPHIA_LRS = (3e-3, 1e-2, 3e-2)
QUICK_STEPS = 30
#: gamma values tried at Sophia-G's best lr (besides the config's): 1e-12
#: makes every step a sign step.
GAMMAS = (1e-12, 1.0, 5.0)
#: A second Sophia-G sweep at a large gamma (most coordinates unclipped), at
#: these multiples of Sophia-G's best lr: where its best lr lies then.
HIGH_GAMMA = 5.0
HIGH_GAMMA_LR_FACTORS = (1.0, 2.0, 4.0, 8.0)
#: The sweeps' groups: (name in the records, optimizer).
SWEEPS = (("sweep", "adamw"), ("sweep", "sophia-g"), ("sweep high gamma", "sophia-g"))
TARGET_SHARES = (0.3, 0.9)
#: Options that need core v2 in the adapter: the study runs their arms only
#: where ``sophia_torch.Sophia`` accepts them.
V2_OPTIONS = {"sophia_hessian_bias_correction": "hessian_bias_correction",
              "sophia_target_unclipped_share": "target_unclipped_share"}
#: Environment of a worker, set before it imports a framework: one thread.
ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TF_NUM_INTRAOP_THREADS": "1",
              "TF_NUM_INTEROP_THREADS": "1", "TF_CPP_MIN_LOG_LEVEL": "2"}
XLA_ONE_THREAD = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"


@dataclasses.dataclass(frozen=True)
class Arm:
    """One training run: an optimizer, a peak lr and changes to the config."""

    group: str  # "sweep", "sweep high gamma", "gamma", "weight decay", "option"
    optimizer: str
    lr: float
    changes: tuple[tuple[str, Any], ...] = ()

    @property
    def label(self) -> str:
        parts = [f"{self.optimizer} lr {self.lr:g}"]
        parts += [f"{key.removeprefix('sophia_')}={value:g}" if isinstance(value, float)
                  and not isinstance(value, bool) else f"{key.removeprefix('sophia_')}={value}"
                  for key, value in self.changes]
        return ", ".join(parts)

    def config(self, base: Config) -> Config:
        return base.replace(**dict(self.changes))


# -- running ------------------------------------------------------------------

_progress: Any = None  # the queue a worker reports its steps to
_batches: dict = {}


def _init_worker(progress: Any, backend: str) -> None:
    """A worker process: one framework thread, set before the framework loads."""
    global _progress
    _progress = progress
    os.environ.update(ONE_THREAD)
    if backend == "jax":
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + XLA_ONE_THREAD).strip()
    if backend == "torch":
        import torch

        torch.set_num_threads(1)


def _train(index: int, arm: Arm, base: Config, backend: str) -> tuple[int, dict]:
    """Run ``arm`` in this worker; report progress every few steps."""
    from lm_demo.cli import trainer_module
    from lm_demo.common import run_loop
    from lm_demo.data import Batches, load_corpus

    config = arm.config(base)
    key = (config.batch_size, config.context, config.seed, config.validation_windows)
    if key not in _batches:
        if "corpus" not in _batches:
            _batches["corpus"] = load_corpus()
        _batches[key] = Batches(_batches["corpus"], batch_size=config.batch_size,
                                context=config.context, seed=config.seed,
                                validation_windows=config.validation_windows)
    trainer = trainer_module(backend).Trainer(config, arm.optimizer, arm.lr)
    result = RunResult(backend=backend, optimizer=arm.optimizer, lr=arm.lr)
    every = max(1, config.steps // 50)

    def report(r: RunResult) -> None:
        if _progress is not None and (r.steps % every == 0 or r.steps == config.steps):
            _progress.put((index, r.steps))

    run_loop(trainer, config, _batches[key], result, progress=False, on_step=report)
    return index, result.to_json()


def default_jobs() -> int:
    """Worker processes: the visible CPUs minus the 1-minute load, at least 1."""
    cpus = visible_cpus()
    try:
        busy = os.getloadavg()[0]
    except (AttributeError, OSError):
        return cpus
    return max(1, min(cpus, int(cpus - busy + 0.5)))


def run_key(backend: str, arm: Arm, base: Config) -> str:
    """What determines a run's losses (one thread each): same key, same run.

    The whole config except what the run does not read: both default
    learning rates (the arm gives the lr) and the other optimizer's settings.
    """
    other = ("sophia_", "hessian_") if arm.optimizer == "adamw" else ("adamw_",)
    config = {k: v for k, v in dataclasses.asdict(arm.config(base)).items()
              if k not in ("adamw_lr", "sophia_lr") and not k.startswith(other)}
    return json.dumps([backend, arm.optimizer, arm.lr, config], sort_keys=True)


def recorded_runs(path: str | pathlib.Path) -> dict[str, dict]:
    """The runs of an earlier study.json, by :func:`run_key`."""
    earlier = json.loads(pathlib.Path(path).read_text())
    fields = {f.name for f in dataclasses.fields(Config)}
    base = Config(**{k: tuple(v) if isinstance(v, list) else v
                     for k, v in earlier["config"].items() if k in fields})
    return {run_key(earlier["backend"], Arm(r["group"], r["optimizer"], r["lr"],
                                            tuple(tuple(c) for c in r["changes"])), base): r
            for r in earlier["runs"]}


class Runner:
    """A pool of one-thread workers and one progress bar over every planned step.

    ``reuse`` maps :func:`run_key` to runs recorded by an earlier study: those
    are taken as they are (their losses are what a new run would give; their
    timings are the earlier machine's) instead of being trained again. So is
    a run this study has already made (an arm that is also a sweep point).
    """

    def __init__(self, backend: str, jobs: int, total_steps: int, progress: bool,
                 reuse: dict[str, dict] | None = None) -> None:
        from tqdm.auto import tqdm

        context = multiprocessing.get_context("spawn")
        self.queue = context.Queue()
        self.pool = futures.ProcessPoolExecutor(
            max_workers=jobs, mp_context=context, initializer=_init_worker,
            initargs=(self.queue, backend))
        self.backend = backend
        self.bar = tqdm(total=total_steps, desc="study", unit="step", disable=not progress,
                        dynamic_ncols=True)
        self.done: dict[int, int] = {}
        self.finished = 0
        self.reuse = dict(reuse or {})
        self._shown = (-1, -1)

    def run(self, arms: list[Arm], base: Config, log,
            on_done: Callable[[Arm, RunResult, bool], None]) -> None:
        """Train ``arms`` (or take them as recorded, or as trained earlier in this
        study); ``on_done(arm, result, reused)`` as each one is known."""
        pending: dict[futures.Future, list[Arm]] = {}
        by_key: dict[str, futures.Future] = {}
        for arm in arms:
            key = run_key(self.backend, arm, base)
            if key in self.reuse:
                result = RunResult.from_json(self.reuse[key])
                self.done[len(self.done)] = result.steps
                log(f"{arm.label}: reused, val {result.final_validation:.4f}")
                on_done(arm, result, True)
            elif key in by_key:  # the same run twice in this batch: train it once
                pending[by_key[key]].append(arm)
                self.done[len(self.done)] = base.steps  # counted as done with the first
            else:
                index = len(self.done)
                self.done[index] = 0
                future = self.pool.submit(_train, index, arm, base, self.backend)
                pending[future], by_key[key] = [arm], future
        self._refresh_bar()
        while pending:
            finished, _ = futures.wait(pending, timeout=0.5,
                                       return_when=futures.FIRST_COMPLETED)
            self._drain()
            for future in finished:
                first, *same = pending.pop(future)
                index, data = future.result()
                result = RunResult.from_json(data)
                self.reuse[run_key(self.backend, first, base)] = data
                self.done[index] = result.steps
                self.finished += 1
                self._refresh_bar()
                share = (f", unclipped share {result.unclipped_share[-1][1]:.2f}"
                         if result.unclipped_share else "")
                log(f"{first.label}: val {result.final_validation:.4f}{share}, "
                    f"{result.wall_s:.0f} s")
                on_done(first, result, False)
                for arm in same:
                    on_done(arm, result, True)

    def _drain(self) -> None:
        try:
            while True:
                index, steps = self.queue.get_nowait()
                self.done[index] = max(self.done.get(index, 0), steps)
        except queue.Empty:
            pass
        self._refresh_bar()

    def _refresh_bar(self) -> None:
        shown = (sum(self.done.values()), self.finished)
        if shown == self._shown:
            return
        self._shown = shown
        self.bar.n = shown[0]
        self.bar.set_postfix(runs=self.finished)
        self.bar.refresh()

    def close(self) -> None:
        self.bar.close()
        self.pool.shutdown()


# -- analysis -----------------------------------------------------------------

def steps_to_reach(validation: list[tuple[int, float]], target: float) -> float | None:
    """First step at which the validation curve reaches ``target``.

    Linear interpolation between the last evaluation above the target and the
    first at or below it (the curve is only known at evaluation steps); the
    first evaluation itself if it is already at or below. None if never.
    """
    previous = None
    for step, loss in validation:
        if loss <= target:
            if previous is None:
                return float(step)
            p_step, p_loss = previous
            return p_step + (step - p_step) * (p_loss - target) / (p_loss - loss)
        previous = (step, loss)
    return None


def _final(run: dict) -> float:
    return run["validation"][-1][1]


def _rank(run: dict) -> float:
    """Sort key for "best": a diverged (NaN) run ranks last."""
    loss = _final(run)
    return loss if math.isfinite(loss) else math.inf


def _share_end(run: dict) -> float | None:
    return run["unclipped_share"][-1][1] if run["unclipped_share"] else None


def _best(runs: list[dict], group: str, optimizer: str) -> dict | None:
    """The best run of one sweep, where it lies in its grid, and its figures."""
    sweep = sorted((r for r in runs if r["group"] == group and r["optimizer"] == optimizer),
                   key=lambda r: r["lr"])
    if not sweep:
        return None
    best = min(sweep, key=_rank)
    position = sweep.index(best)
    return {
        "lr": best["lr"], "final_validation": _final(best), "steps": best["steps"],
        "grid": [r["lr"] for r in sweep], "bracketed": 0 < position < len(sweep) - 1,
        "gamma": best.get("sophia_gamma"), "unclipped_share_end": _share_end(best),
        "refresh_share": best["refresh_s"] / best["wall_s"] if best["wall_s"] else None,
    }


def summarize(runs: list[dict]) -> dict:
    """Best lr per sweep, the bracket check, steps-to-reach, the arms."""
    summary: dict[str, Any] = {"best": {}}
    for name in ("adamw", "sophia-g"):
        if (found := _best(runs, "sweep", name)) is not None:
            summary["best"][name] = found
    if (found := _best(runs, "sweep high gamma", "sophia-g")) is not None:
        summary["best_high_gamma"] = found
    best = summary["best"]
    if {"adamw", "sophia-g"} <= best.keys():
        runs_by = {(r["group"], r["optimizer"], r["lr"]): r for r in runs if not r["changes"]}
        a = runs_by["sweep", "adamw", best["adamw"]["lr"]]
        s = runs_by["sweep", "sophia-g", best["sophia-g"]["lr"]]
        a_target, s_target = _final(a), _final(s)
        adamw_to_sophia = steps_to_reach(a["validation"], s_target)
        sophia_to_adamw = steps_to_reach(s["validation"], a_target)
        summary["steps_to_reach"] = {
            "adamw_to_sophia_best": adamw_to_sophia,
            "sophia_to_adamw_best": sophia_to_adamw,
            # How many times AdamW's steps Sophia-G needs for the loss the
            # worse of the two reaches at its end.
            "sophia_steps_over_adamw": (
                s["steps"] / adamw_to_sophia if s_target >= a_target and adamw_to_sophia
                else (sophia_to_adamw / a["steps"] if sophia_to_adamw else None)),
        }
        summary["lr_ratio_adamw_over_sophia"] = best["adamw"]["lr"] / best["sophia-g"]["lr"]
        if "best_high_gamma" in summary:
            summary["lr_ratio_adamw_over_sophia_high_gamma"] = (
                best["adamw"]["lr"] / summary["best_high_gamma"]["lr"])
        summary["speed_by_loss"] = speed_by_loss(a["validation"], s["validation"])
    return summary


def speed_by_loss(adamw: list, sophia: list, levels: int = 12) -> list[tuple[float, float]]:
    """(loss, Sophia-G's steps / AdamW's steps to first reach it), for losses both reach."""
    floor = max(min(v for _, v in adamw), min(v for _, v in sophia))
    top = min(adamw[0][1], sophia[0][1])
    out = []
    for i in range(levels):
        level = floor + (top - floor) * i / levels
        a, s = steps_to_reach(adamw, level), steps_to_reach(sophia, level)
        if a and s:
            out.append((level, s / a))
    return out


# -- output -------------------------------------------------------------------

def _fmt_steps(value: float | None, limit: int) -> str:
    return f"{value:.0f}" if value is not None else f"not within {limit}"


def tables(runs: list[dict], summary: dict) -> str:
    lines = ["| optimizer | gamma | peak lr | final val loss | unclipped share at end "
             "| refresh share | wall time |", "|---|---|---|---|---|---|---|"]
    best = summary["best"]
    bests = {("sweep", name): b for name, b in best.items()}
    if "best_high_gamma" in summary:
        bests["sweep high gamma", "sophia-g"] = summary["best_high_gamma"]
    order = {sweep: i for i, sweep in enumerate(SWEEPS)}
    for r in sorted((r for r in runs if (r["group"], r["optimizer"]) in order),
                    key=lambda r: (order[r["group"], r["optimizer"]], r["lr"])):
        mark = "**" if bests.get((r["group"], r["optimizer"]), {}).get("lr") == r["lr"] else ""
        share = _share_end(r)
        refresh = f"{100 * r['refresh_s'] / r['wall_s']:.1f} %" if r["refreshes"] else "-"
        gamma = f"{r['sophia_gamma']:g}" if r.get("sophia_gamma") is not None else "-"
        lines.append(f"| {r['optimizer']} | {gamma} | {r['lr']:g} | {mark}{_final(r):.4f}{mark} | "
                     f"{'-' if share is None else f'{share:.2f}'} | {refresh} | "
                     f"{r['wall_s']:.1f} s |")
    out = ["### Learning-rate sweeps (equal budgets)", "", *lines, ""]
    for (group, name), b in bests.items():
        if not b["bracketed"]:
            out.append(f"**Warning**: {name}'s best lr {b['lr']:g} ({group}) is at the edge "
                       f"of its grid {b['grid']}: the optimum is not bracketed.")
    if "steps_to_reach" in summary:
        reach = summary["steps_to_reach"]
        a, s = best["adamw"], best["sophia-g"]
        out += ["", "### Steps to reach the other's best loss", "",
                "| best run | final val loss | steps to reach the other's best |",
                "|---|---|---|",
                f"| adamw lr {a['lr']:g} | {a['final_validation']:.4f} | "
                f"{_fmt_steps(reach['adamw_to_sophia_best'], a['steps'])} "
                f"(Sophia-G's {s['final_validation']:.4f}) |",
                f"| sophia-g lr {s['lr']:g} | {s['final_validation']:.4f} | "
                f"{_fmt_steps(reach['sophia_to_adamw_best'], s['steps'])} "
                f"(AdamW's {a['final_validation']:.4f}) |"]
    arms = [r for r in runs if not r["group"].startswith("sweep")]
    if arms:
        base = best.get("sophia-g", {}).get("final_validation")
        out += ["", "### Arms at Sophia-G's best lr (one change each)", "",
                "| arm | final val loss | change vs best Sophia-G | unclipped share at end |",
                "|---|---|---|---|"]
        for r in arms:
            share = _share_end(r)
            delta = f"{_final(r) - base:+.4f}" if base is not None else "-"
            out.append(f"| {r['label']} | {_final(r):.4f} | {delta} | "
                       f"{'-' if share is None else f'{share:.2f}'} |")
    return "\n".join(out)


def headline(summary: dict) -> str:
    """One sentence with the study's main result."""
    best = summary.get("best", {})
    if "steps_to_reach" not in summary:
        return "not enough runs for a headline"
    a, s = best["adamw"], best["sophia-g"]
    ratio = summary["steps_to_reach"]["sophia_steps_over_adamw"]
    share = s["unclipped_share_end"]
    text = (f"best AdamW lr {a['lr']:g} -> {a['final_validation']:.4f}, best Sophia-G lr "
            f"{s['lr']:g} (AdamW's / {summary['lr_ratio_adamw_over_sophia']:.0f}) -> "
            f"{s['final_validation']:.4f}")
    if share is not None:
        text += f", unclipped share {share:.2f}"
    if ratio is not None:
        text += f"; Sophia-G needs {ratio:.1f}x AdamW's steps for the same loss"
    return text


def plot(runs: list[dict], summary: dict, path: pathlib.Path, title: str) -> pathlib.Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    colors = {"adamw": "tab:blue", "sophia-g": "tab:red"}
    best = summary["best"]
    fig, axes = plt.subplots(2, 3, figsize=(15, 8.4), dpi=100)
    sweep = [r for r in runs if r["group"] == "sweep"]
    arms = [r for r in runs if not r["group"].startswith("sweep")]

    ax = axes[0, 0]
    for r in sweep:
        is_best = best.get(r["optimizer"], {}).get("lr") == r["lr"]
        steps, losses = zip(*r["validation"], strict=True)
        ax.plot(steps, losses, color=colors[r["optimizer"]], lw=2.2 if is_best else 0.9,
                alpha=1.0 if is_best else 0.35,
                label=f"{r['optimizer']} lr {r['lr']:g}" if is_best else None)
    reach = summary.get("steps_to_reach", {})
    if reach:
        for name, other, key in (("adamw", "sophia-g", "adamw_to_sophia_best"),
                                 ("sophia-g", "adamw", "sophia_to_adamw_best")):
            target = best[other]["final_validation"]
            ax.axhline(target, color=colors[other], ls="--", lw=0.8)
            if reach[key] is not None:
                ax.plot([reach[key]], [target], "o", color=colors[name], ms=8, mfc="none")
                ax.annotate(f"step {reach[key]:.0f}", (reach[key], target),
                            textcoords="offset points", xytext=(4, 6), fontsize=8,
                            color=colors[name])
    ax.set_ylim(top=min(4.0, ax.get_ylim()[1]))
    ax.set(xlabel="step", ylabel="validation loss (nats per byte)",
           title="Validation loss (bold: best lr; circle: reaches the other's best)")
    ax.legend(fontsize=8)

    ax = axes[0, 1]
    for name in ("adamw", "sophia-g"):
        rs = sorted((r for r in sweep if r["optimizer"] == name), key=lambda r: r["lr"])
        if not rs:
            continue
        ax.plot([r["lr"] for r in rs], [_final(r) for r in rs], "o-", color=colors[name],
                label=name)
        b = best[name]
        ax.plot([b["lr"]], [b["final_validation"]], "*", color=colors[name], ms=16)
    high = sorted((r for r in runs if r["group"] == "sweep high gamma"), key=lambda r: r["lr"])
    if high:
        ax.plot([r["lr"] for r in high], [_final(r) for r in high], "s--", color="darkorange",
                label=f"sophia-g, gamma {high[0]['sophia_gamma']:g}")
        b = summary["best_high_gamma"]
        ax.plot([b["lr"]], [b["final_validation"]], "*", color="darkorange", ms=14)
    ax.set_xscale("log")
    ax.set(xlabel="peak learning rate", ylabel="final validation loss",
           title="Equal budgets: final loss against the learning rate")
    ax.legend(fontsize=8)

    ax = axes[0, 2]
    if arms and "sophia-g" in best:
        labels = [f"lr {best['sophia-g']['lr']:g} (best)"] + [
            r["label"].split(", ", 1)[1] if ", " in r["label"] else r["label"] for r in arms]
        values = [best["sophia-g"]["final_validation"]] + [_final(r) for r in arms]
        y = np.arange(len(values))
        low = min(values + [best.get("adamw", {}).get("final_validation", min(values))])
        high_x = min(max(values), values[0] + 0.6) + 0.25  # an outlier does not squash the rest
        ax.barh(y, values, color=["tab:red"] + ["salmon"] * len(arms))
        for yi, r in zip(y[1:], arms, strict=True):
            share = _share_end(r)
            text = f" {values[yi]:.2f}" + ("" if share is None else f", share {share:.2f}")
            if values[yi] < high_x - 0.5:
                ax.text(values[yi], yi, text, va="center", fontsize=8)
            else:  # off the scale: the number inside the bar
                ax.text(high_x - 0.02, yi, text + " (off scale)", va="center", ha="right",
                        fontsize=8, color="white", fontweight="bold")
        ax.set_yticks(y, labels, fontsize=8)
        ax.invert_yaxis()
        ax.set_xlim(low - 0.1, high_x)
        if "adamw" in best:
            ax.axvline(best["adamw"]["final_validation"], color="tab:blue", ls="--",
                       label="best AdamW")
            ax.legend(fontsize=8, loc="upper right")
    ax.set(xlabel="final validation loss", title="Sophia-G arms at its best lr")

    ax = axes[1, 0]
    cmap = plt.get_cmap("Reds")
    s_sweep = sorted((r for r in sweep if r["optimizer"] == "sophia-g"), key=lambda r: r["lr"])
    best_high = summary.get("best_high_gamma", {}).get("lr")
    for r in high:
        if r["unclipped_share"] and r["lr"] == best_high:
            steps, shares = zip(*r["unclipped_share"], strict=True)
            ax.plot(steps, shares, color="darkorange", lw=1.4,
                    label=f"gamma {r['sophia_gamma']:g}, lr {r['lr']:g} (its best)")
    for i, r in enumerate(s_sweep):
        if r["unclipped_share"]:
            steps, shares = zip(*r["unclipped_share"], strict=True)
            ax.plot(steps, shares, color=cmap(0.35 + 0.65 * i / max(1, len(s_sweep) - 1)),
                    label=f"lr {r['lr']:g}")
    for r in arms:
        if r["unclipped_share"] and r["group"] in ("gamma", "option") and not (
                r["group"] == "gamma" and any(h["lr"] == r["lr"] and h["sophia_gamma"] ==
                                              r["sophia_gamma"] for h in high)):
            steps, shares = zip(*r["unclipped_share"], strict=True)
            ax.plot(steps, shares, ls=":", lw=1.4, label=r["label"].split(", ", 1)[-1])
    ax.set(xlabel="step", ylabel="unclipped share", ylim=(0, 1.6), yticks=np.linspace(0, 1, 6),
           title="Share of coordinates not clipped (Sophia-G)")
    ax.legend(fontsize=6.5, ncol=2, loc="upper left", framealpha=0.9)

    ax = axes[1, 1]
    for i, r in enumerate(s_sweep):
        if r["refresh_share_curve"]:
            steps, shares = zip(*r["refresh_share_curve"], strict=True)
            ax.plot(steps, 100 * np.asarray(shares),
                    color=cmap(0.35 + 0.65 * i / max(1, len(s_sweep) - 1)),
                    label=f"lr {r['lr']:g}: {100 * r['refresh_s'] / r['wall_s']:.1f} % overall")
    ax.axhline(5, color="gray", ls="--", lw=0.8, label="the paper: about 5 %")
    ax.set(xlabel="step", ylabel="% of training time",
           title="Hessian refresh's share of the time, per evaluation window")
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=8)

    ax = axes[1, 2]
    by_loss = summary.get("speed_by_loss", [])
    if by_loss:
        levels, ratios = zip(*by_loss, strict=True)
        ax.plot(levels, ratios, "o-", color="black")
        ax.axhline(1.0, color="gray", lw=0.8)
        ax.invert_xaxis()
    ax.set(xlabel="validation loss reached (lower: later in training)",
           ylabel="Sophia-G steps / AdamW steps",
           title="Steps Sophia-G needs per AdamW step (best runs)")
    ax.set_ylim(bottom=0)

    for ax in axes.flat:
        ax.grid(alpha=0.3)
        ax.title.set_fontsize(10)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


# -- the study ----------------------------------------------------------------

def v2_options_available(backend: str) -> dict[str, bool]:
    """Which core-v2 options the backend's trainer can pass to its optimizer."""
    if backend != "torch":
        return {name: False for name in V2_OPTIONS}
    import sophia_torch

    parameters = inspect.signature(sophia_torch.Sophia).parameters
    return {name: option in parameters for name, option in V2_OPTIONS.items()}


def arms_at(lr: float, adamw_lr: float, config: Config, available: dict[str, bool], *,
            high_gamma: bool = True) -> list[Arm]:
    """The second phase, at Sophia-G's best learning rate ``lr``: the one-change
    arms and the sweep at a high gamma (whose point at ``lr`` is also an arm)."""
    arms = [Arm("gamma", "sophia-g", lr, (("sophia_gamma", g),)) for g in GAMMAS
            if g != config.sophia_gamma]
    if high_gamma:
        arms += [Arm("sweep high gamma", "sophia-g", lr * factor, (("sophia_gamma", HIGH_GAMMA),))
                 for factor in HIGH_GAMMA_LR_FACTORS]
    # Weight decay: none, and the value whose per-step shrinkage lr * wd
    # equals AdamW's at its best lr (decoupled decay scales with the lr).
    matched = config.adamw_weight_decay * adamw_lr / lr
    arms += [Arm("weight decay", "sophia-g", lr, (("sophia_weight_decay", wd),))
             for wd in (0.0, round(matched, 2))]
    if available["sophia_hessian_bias_correction"]:
        arms.append(Arm("option", "sophia-g", lr, (("sophia_hessian_bias_correction", True),)))
    if available["sophia_target_unclipped_share"]:
        arms += [Arm("option", "sophia-g", lr, (("sophia_target_unclipped_share", share),))
                 for share in TARGET_SHARES]
    return arms


def _title(config: Config, backend: str) -> str:
    return (f"Sophia-G vs AdamW, equal lr budgets: byte-level GPT "
            f"{config.n_layer}x{config.n_embd}, {config.steps} steps x "
            f"{config.tokens_per_step} tokens ({backend})")


def _report(report: dict, png: pathlib.Path, out: pathlib.Path) -> None:
    print()
    print(tables(report["runs"], report["summary"]))
    print()
    print("headline: " + report["headline"])
    print(f"results: {out / 'study.json'}, plot: {png}")
    trained = [r for r in report["runs"] if not r["reused"]]
    print(f"machine: {report['machine']}; {report['load_at_start']} at start, "
          f"{report['load_at_end']} at end; {report['seconds']:.0f} s in all "
          f"({report['jobs']} worker(s)); {len(trained)} runs trained here, "
          f"{len(report['runs']) - len(trained)} reused or repeated; the runs' training took "
          f"{sum(r['cpu_s'] for r in trained):.0f} s of CPU time here")


def replot(out: pathlib.Path) -> dict:
    """Redraw study.png and print the tables from a finished study.json."""
    report = json.loads((out / "study.json").read_text())
    fields = {f.name for f in dataclasses.fields(Config)}
    config = Config(**{k: tuple(v) if isinstance(v, list) else v
                       for k, v in report["config"].items() if k in fields})
    png = plot(report["runs"], report["summary"], out / "study.png",
               _title(config, report["backend"]))
    _report(report, png, out)
    return report


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=("torch", "jax", "tensorflow"), default="torch")
    parser.add_argument("--quick", action="store_true",
                        help=f"smoke run: the tiny model, {QUICK_STEPS} steps")
    parser.add_argument("--steps", type=int, help="steps per run (default: the demo's)")
    parser.add_argument("--adamw-lrs", type=float, nargs="+")
    parser.add_argument("--sophia-lrs", type=float, nargs="+")
    parser.add_argument("--no-arms", action="store_true",
                        help="no one-change arms at Sophia-G's best lr")
    parser.add_argument("--no-high-gamma", action="store_true",
                        help=f"no second Sophia-G sweep at gamma {HIGH_GAMMA:g}")
    parser.add_argument("--jobs", type=int, help="worker processes (default: idle CPUs)")
    parser.add_argument("--out", default="study_results",
                        help="folder for study.json and study.png")
    parser.add_argument("--reuse", metavar="STUDY_JSON", nargs="+",
                        help="take runs with identical settings from earlier study.json files")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--replot", action="store_true",
                        help="only redraw the plot and tables from --out's study.json")
    args = parser.parse_args(argv)
    if args.replot:
        return replot(pathlib.Path(args.out))

    config = Config(**PRESETS["tiny" if args.quick else "default"])
    steps = args.steps or (QUICK_STEPS if args.quick else config.steps)
    config = config.replace(steps=steps, eval_interval=min(config.eval_interval, steps))
    adamw_lrs = args.adamw_lrs or (QUICK_ADAMW_LRS if args.quick else ADAMW_LRS)
    sophia_lrs = args.sophia_lrs or (QUICK_SOPHIA_LRS if args.quick else SOPHIA_LRS)
    available = v2_options_available(args.backend)
    n_arms = 0 if args.no_arms else len(arms_at(
        sophia_lrs[0], adamw_lrs[0], config, available, high_gamma=not args.no_high_gamma))
    jobs = args.jobs or default_jobs()
    out = pathlib.Path(args.out)
    command = "python docs/benchmarks/study.py " + " ".join(sys.argv[1:] if argv is None
                                                             else argv)
    started = time.perf_counter()
    report: dict[str, Any] = {
        "command": command.strip(), "machine": machine(), "load_at_start": load_average(),
        "jobs": jobs, "threads_per_run": 1, "backend": args.backend,
        "config": dataclasses.asdict(config), "options_available": available,
    }
    print(f"machine: {report['machine']}; {report['load_at_start']}")
    print(f"{len(adamw_lrs)} AdamW and {len(sophia_lrs)} Sophia-G learning rates, then "
          f"{n_arms} runs at multiples of Sophia-G's best; {steps} steps each; "
          f"{jobs} worker(s), one thread each")
    for name, ok in available.items():
        if not ok:
            print(f"note: {V2_OPTIONS[name]} arms skipped: the {args.backend} trainer's "
                  "optimizer does not accept it")
    sweep = ([Arm("sweep", "adamw", lr) for lr in adamw_lrs]
             + [Arm("sweep", "sophia-g", lr) for lr in sophia_lrs])
    reuse = {key: run for path in args.reuse or () for key, run in recorded_runs(path).items()}
    runner = Runner(args.backend, jobs, (len(sweep) + n_arms) * steps,
                    progress=not args.no_progress, reuse=reuse)
    log = runner.bar.write if not args.no_progress else print
    records: list[dict] = []

    out.mkdir(parents=True, exist_ok=True)

    def record(arm: Arm, result: RunResult, reused: bool) -> None:
        """Keep a finished run; study.json always holds every run so far
        (``--reuse`` can pick up an interrupted study)."""
        gamma = arm.config(config).sophia_gamma if arm.optimizer == "sophia-g" else None
        records.append({**result.to_json(), "group": arm.group, "label": arm.label,
                        "changes": [list(c) for c in arm.changes], "sophia_gamma": gamma,
                        "reused": reused})
        (out / "study.json").write_text(json.dumps({**report, "partial": True,
                                                    "runs": records}, indent=1))

    try:
        runner.run(sweep, config, log, record)
        if not args.no_arms:
            best = summarize(records)["best"]
            runner.run(arms_at(best["sophia-g"]["lr"], best["adamw"]["lr"], config, available,
                               high_gamma=not args.no_high_gamma), config, log, record)
    finally:
        runner.close()
    summary = summarize(records)
    report.update(runs=records, summary=summary, headline=headline(summary),
                  load_at_end=load_average(), seconds=time.perf_counter() - started)
    (out / "study.json").write_text(json.dumps(report, indent=1))
    png = plot(records, summary, out / "study.png", _title(config, args.backend))
    _report(report, png, out)
    return report


if __name__ == "__main__":
    main()
