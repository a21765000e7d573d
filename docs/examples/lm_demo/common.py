"""What every framework's run shares: configuration, initial weights, the
learning-rate schedule, the result record, the table and the plot.

The model is a byte-level GPT (pre-LayerNorm, learned positions, causal
multi-head attention, tanh-GELU MLP, tied input/output embedding, no biases).
Its initial weights are drawn here with numpy from a seed and loaded into each
framework, so the three frameworks start from the same parameters, see the
same batches and follow the same schedule.
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
import platform
from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np

from .data import VOCAB_SIZE

__all__ = [
    "Config",
    "PRESETS",
    "RunResult",
    "StepResult",
    "format_table",
    "init_params",
    "lr_table",
    "plot",
]


@dataclasses.dataclass(frozen=True)
class Config:
    """Model, data and schedule; identical for every framework and optimizer."""

    n_layer: int = 4
    n_embd: int = 128
    n_head: int = 4
    context: int = 128
    batch_size: int = 16
    steps: int = 600
    eval_interval: int = 25
    validation_windows: int = 64
    eval_chunk: int = 32
    seed: int = 0
    warmup_fraction: float = 0.1
    final_lr_fraction: float = 0.1
    # The peak learning rates are the best of the equal-budget study
    # (docs/study.md, `nox -s study`: 600 steps, grids a factor 2 apart).
    # AdamW: torch/optax/Keras defaults except betas, as in nanoGPT.
    adamw_lr: float = 4e-3
    adamw_betas: tuple[float, float] = (0.9, 0.95)
    adamw_weight_decay: float = 0.1
    # Sophia-G: the paper's betas, k and weight decay (2x AdamW's; 0 measured
    # the same here); gamma 0.2. Its best lr is AdamW's / 40 at this size:
    # most coordinates are clipped, so each moves by the full lr every step.
    sophia_lr: float = 1e-4
    sophia_b1: float = 0.965
    sophia_b2: float = 0.99
    sophia_gamma: float = 0.2
    sophia_weight_decay: float = 0.2
    hessian_interval: int = 10
    #: Share of a batch's sequences the Sophia-G estimate uses (the step's
    #: own batch; the rows are the first ones). A quarter costs a quarter of
    #: a forward and backward per refresh.
    hessian_fraction: float = 0.25
    #: Sophia options (core v2), off by default; the study turns them on.
    sophia_hessian_bias_correction: bool = False
    sophia_target_unclipped_share: float | None = None

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.context

    def replace(self, **changes: Any) -> Config:
        return dataclasses.replace(self, **changes)


#: ``--size`` presets. ``tiny`` is what the CI test runs.
PRESETS: dict[str, dict[str, Any]] = {
    "default": {},
    "tiny": dict(n_layer=1, n_embd=32, n_head=2, context=32, batch_size=8, steps=30,
                 eval_interval=10, validation_windows=16, eval_chunk=16,
                 adamw_lr=1e-2, sophia_lr=5e-3),
}


def param_shapes(config: Config) -> dict[str, tuple[int, ...]]:
    """Parameter names and shapes (``x @ W`` layout: (fan_in, fan_out))."""
    d = config.n_embd
    shapes: dict[str, tuple[int, ...]] = {"wte": (VOCAB_SIZE, d), "wpe": (config.context, d)}
    for layer in range(config.n_layer):
        shapes.update({
            f"h{layer}.ln1": (d,),
            f"h{layer}.attn.qkv": (d, 3 * d),
            f"h{layer}.attn.proj": (d, d),
            f"h{layer}.ln2": (d,),
            f"h{layer}.mlp.fc": (d, 4 * d),
            f"h{layer}.mlp.proj": (4 * d, d),
        })
    shapes["lnf"] = (d,)
    return shapes


def init_params(config: Config) -> dict[str, np.ndarray]:
    """GPT-2 style initial weights as float32 numpy arrays, from ``config.seed``.

    Normal(0, 0.02) for matrices, 0.02/sqrt(2 n_layer) for the residual
    projections, ones for the LayerNorm scales.
    """
    rng = np.random.default_rng([config.seed, 2])
    residual_std = 0.02 / math.sqrt(2 * config.n_layer)
    params = {}
    for name, shape in param_shapes(config).items():
        if name.endswith(("ln1", "ln2", "lnf")):
            value = np.ones(shape)
        else:
            std = residual_std if name.endswith("proj") else 0.02
            value = rng.normal(0.0, std, size=shape)
        params[name] = value.astype(np.float32)
    return params


def count_params(config: Config) -> int:
    return sum(math.prod(shape) for shape in param_shapes(config).values())


def lr_table(peak: float, config: Config) -> np.ndarray:
    """Learning rate of each step: linear warmup, then cosine to a floor."""
    steps = config.steps
    warmup = max(1, int(round(config.warmup_fraction * steps)))
    floor = config.final_lr_fraction * peak
    lrs = np.empty(steps, dtype=np.float64)
    for step in range(steps):
        if step < warmup:
            lrs[step] = peak * (step + 1) / warmup
        else:
            progress = (step - warmup) / max(1, steps - warmup)
            lrs[step] = floor + 0.5 * (peak - floor) * (1 + math.cos(math.pi * progress))
    return lrs


@dataclasses.dataclass
class RunResult:
    """One training run, as every framework reports it."""

    backend: str
    optimizer: str
    lr: float
    steps: int = 0
    train_loss: list[float] = dataclasses.field(default_factory=list)
    validation: list[tuple[int, float]] = dataclasses.field(default_factory=list)
    wall_s: float = 0.0
    #: CPU seconds (all threads) over the same span: on a shared machine,
    #: ``cpu_s / cores`` is closer to what an idle machine's wall time would be.
    cpu_s: float = 0.0
    #: Seconds the Hessian refreshes added (Sophia only): on each refresh
    #: step, its time minus the median time of the steps without one.
    refresh_s: float = 0.0
    refreshes: int = 0
    #: Share of coordinates whose Sophia step is not clipped, at each
    #: evaluation, as the optimizer reports it.
    unclipped_share: list[tuple[int, float]] = dataclasses.field(default_factory=list)
    #: The refresh's share of the training time in each evaluation window
    #: (Sophia only; same definition as ``refresh_share``, per window).
    refresh_share_curve: list[tuple[int, float]] = dataclasses.field(default_factory=list)

    @property
    def final_validation(self) -> float:
        return self.validation[-1][1] if self.validation else math.nan

    @property
    def refresh_share(self) -> float:
        return self.refresh_s / self.wall_s if self.wall_s else math.nan

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RunResult:
        names = {f.name for f in dataclasses.fields(cls)}
        data = {k: v for k, v in data.items() if k in names or k == "clip_fraction"}
        data["validation"] = [tuple(v) for v in data["validation"]]
        if "clip_fraction" in data:  # files written before the rename
            data["unclipped_share"] = data.pop("clip_fraction")
        for key in ("unclipped_share", "refresh_share_curve"):
            data[key] = [tuple(v) for v in data.get(key, [])]
        return cls(**data)


def format_table(results: list[RunResult]) -> str:
    """The end-of-run table (markdown, so it pastes into the docs)."""
    header = ("| backend | optimizer | lr | steps | val loss | wall time | "
              "refresh share | unclipped share |")
    lines = [header, "|" + "---|" * 8]
    for r in results:
        clip = f"{r.unclipped_share[-1][1]:.2f}" if r.unclipped_share else "-"
        share = f"{100 * r.refresh_share:.1f} % ({r.refreshes})" if r.refreshes else "-"
        lines.append(
            f"| {r.backend} | {r.optimizer} | {r.lr:g} | {r.steps} | {r.final_validation:.4f} | "
            f"{r.wall_s:.1f} s | {share} | {clip} |"
        )
    return "\n".join(lines)


def machine() -> str:
    """One line describing where this ran."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (f"{cpu}, {visible_cpus()} CPUs visible, "
            f"Python {platform.python_version()}, {platform.system()}")


def visible_cpus() -> int:
    import os

    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def default_threads() -> int:
    """Framework threads for a run: the CPUs that are not already busy.

    ``visible CPUs - 1-minute load average``, rounded, at least 1: all cores
    on an idle machine, one thread on a busy one (where extra threads spin
    against other jobs and slow everything down).
    """
    import os

    cpus = visible_cpus()
    try:
        busy = os.getloadavg()[0]
    except (AttributeError, OSError):
        return cpus
    return max(1, min(cpus, int(cpus - busy + 0.5)))


def load_average() -> str:
    """The 1/5/15-minute load averages (a shared machine slows every timing)."""
    import os

    try:
        return "load average {:.2f} {:.2f} {:.2f}".format(*os.getloadavg())
    except (AttributeError, OSError):
        return "load average unknown"


def smooth(values: list[float], window: int) -> np.ndarray:
    values = np.asarray(values, dtype=float)
    if window <= 1 or values.size < window:
        return values
    kernel = np.ones(window) / window
    head = np.array([values[:i + 1].mean() for i in range(window - 1)])
    return np.concatenate([head, np.convolve(values, kernel, mode="valid")])


def plot(results: list[RunResult], path: str | pathlib.Path, *, title: str) -> pathlib.Path:
    """Training (smoothed) and validation loss curves of ``results`` as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    colors = {"sophia-g": "tab:red", "adamw": "tab:blue"}
    for r in results:
        color = colors.get(r.optimizer, None)
        label = f"{r.backend} {r.optimizer} (lr {r.lr:g})"
        steps = np.arange(1, len(r.train_loss) + 1)
        ax.plot(steps, smooth(r.train_loss, 10), color=color, alpha=0.35, lw=1)
        if r.validation:
            vs, vl = zip(*r.validation, strict=True)
            ax.plot(vs, vl, "o-", color=color, lw=1.8, ms=3.5, label=f"{label}, validation")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats per byte)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def save_results(results: list[RunResult], path: str | pathlib.Path, **extra: Any) -> None:
    payload = {"runs": [r.to_json() for r in results], **extra}
    pathlib.Path(path).write_text(json.dumps(payload, indent=1))


#: The equal-budget study's recorded results (``nox -s study``, docs/study.md).
STUDY_RESULTS = pathlib.Path(__file__).resolve().parents[2] / "study" / "study.json"


def explain(results: list[RunResult], *, default: bool = True,
            study: str | pathlib.Path = STUDY_RESULTS) -> str:
    """One line on what the demo's result means, pointing to the study."""
    by_name = {r.optimizer: r for r in results}
    if {"sophia-g", "adamw"} <= by_name.keys():
        s, a = by_name["sophia-g"].final_validation, by_name["adamw"].final_validation
        winner = "AdamW" if a < s else "Sophia-G"
        text = f"why: {winner} ends lower here (AdamW {a:.2f}, Sophia-G {s:.2f})"
    else:
        text = "why"
    try:
        summary = json.loads(pathlib.Path(study).read_text())["summary"]
        best, ratio = summary["best"], summary["steps_to_reach"]["sophia_steps_over_adamw"]
        own = by_name.get("sophia-g")
        share, where = ((own.unclipped_share[-1][1], "at the end of this run")
                        if own is not None and own.unclipped_share else
                        (best["sophia-g"]["unclipped_share_end"], "in the study"))
        text += (
            f"; at this model size Sophia-G is close to sign momentum (unclipped share "
            f"{share:.2f} {where}), and the equal-budget study"
            f"{'' if default else ' of the defaults'} "
            f"(`nox -s study`, docs/study.md) found its best lr at AdamW's / "
            f"{summary['lr_ratio_adamw_over_sophia']:.0f} and {ratio:.1f}x AdamW's steps "
            f"needed for the same loss")
    except (OSError, KeyError, TypeError, ValueError):
        text += "; see the equal-budget study: `nox -s study`, docs/study.md"
    return text + "."


class StepResult(NamedTuple):
    """What a trainer's ``step`` reports."""

    loss: float
    #: Whether this step folded a new Hessian estimate into ``h``.
    refreshed: bool = False


def _excess_s(refresh_step_s: list[float], plain_s: list[float]) -> float:
    """What the refresh steps took beyond the median plain step."""
    if not refresh_step_s or not plain_s:
        return 0.0
    typical = float(np.median(plain_s))
    return sum(max(0.0, s - typical) for s in refresh_step_s)


def run_loop(trainer: Any, config: Config, batches: Any, result: RunResult, *,
             progress: bool = True, on_step: Callable[[RunResult], None] | None = None,
             ) -> RunResult:
    """The training loop every framework shares.

    ``trainer`` supplies ``step(x, y, lr) -> StepResult`` (for Sophia-G it
    refreshes the Hessian estimate inside the step when it is due, the way
    a user's loop would), ``evaluate(chunks) -> float`` and
    ``unclipped_share() -> float | None``, and optionally
    ``warmup(x, y, chunks)`` (compiles without changing the model or the
    optimizer state). Wall time counts steps (not validation); a step
    returns only when its work is done. The refresh time is what the
    refresh steps took beyond the median step without a refresh, over the
    whole run (``refresh_s``) and per evaluation window
    (``refresh_share_curve``). ``on_step(result)`` is called after every step.
    """
    import time

    from tqdm.auto import tqdm

    lrs = lr_table(result.lr, config)
    chunks = batches.validation(config.eval_chunk)
    if hasattr(trainer, "warmup"):  # compile outside the timed loop
        trainer.warmup(*batches.train(0), chunks)
    bar = tqdm(total=config.steps, desc=f"{result.backend} {result.optimizer}",
               disable=not progress, leave=True, dynamic_ncols=True)
    plain_s, refresh_step_s = [], []
    window_plain, window_refresh = [], []
    for step in range(config.steps):
        x, y = batches.train(step)
        start, cpu_start = time.perf_counter(), time.process_time()
        loss, refreshed = trainer.step(x, y, float(lrs[step]))
        seconds = time.perf_counter() - start
        result.wall_s += seconds
        result.cpu_s += time.process_time() - cpu_start
        (refresh_step_s if refreshed else plain_s).append(seconds)
        (window_refresh if refreshed else window_plain).append(seconds)
        result.refreshes += int(refreshed)
        result.train_loss.append(loss)
        result.steps = step + 1
        if result.steps % config.eval_interval == 0 or result.steps == config.steps:
            result.validation.append((result.steps, trainer.evaluate(chunks)))
            share = trainer.unclipped_share()
            if share is not None:
                result.unclipped_share.append((result.steps, share))
            if window_refresh:
                window_s = sum(window_plain) + sum(window_refresh)
                excess = _excess_s(window_refresh, window_plain or plain_s)
                result.refresh_share_curve.append((result.steps, excess / window_s))
            window_plain, window_refresh = [], []
        bar.set_postfix(loss=f"{loss:.3f}",
                        val=f"{result.final_validation:.3f}" if result.validation else "-")
        bar.update()
        if on_step is not None:
            on_step(result)
    bar.close()
    result.refresh_s = _excess_s(refresh_step_s, plain_s)
    return result
