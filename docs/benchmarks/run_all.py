"""All of the project's benchmarks in one run: ``nox -s bench`` (about 15 minutes).

1. Speed of the optimizer step against each framework's baseline: runs the
   adapters' own scripts (``bench_torch.py``, ``bench_jax.py``,
   ``bench_keras.py``, each timing its candidates interleaved in one
   process) and gathers their ratio rows into one table.
2. The Hessian refresh's share of Sophia-G's training time at k = 10, on the
   language-model demo's model (``lm_bench.py overhead``), against the
   paper's figure of about 5 %.
3. Convergence on the demo task: steps for Sophia-G to reach AdamW's final
   validation loss, both over the same learning-rate sweep
   (``lm_bench.py convergence``), with a plot.

Each measurement runs in a fresh subprocess per framework; a framework that
is not installed is reported as skipped. Numbers depend on the machine,
which is described at the top and bottom of the output (including the load
average: on a shared machine, read the ratios, not the absolute times).

    python docs/benchmarks/run_all.py             # everything
    python docs/benchmarks/run_all.py --quick     # a smoke run, about 3 minutes
    python docs/benchmarks/run_all.py --only overhead convergence
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import pathlib
import platform
import re
import subprocess
import sys
import tempfile
import time

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parents[1]
SPEED_SCRIPTS = {"torch": "bench_torch.py", "jax": "bench_jax.py", "tensorflow": "bench_keras.py"}
ADAPTERS = {"torch": "sophia_torch", "jax": "sophia_jax", "tensorflow": "sophia_tf"}
FRAMEWORK_MODULES = {"torch": "torch", "jax": "jax", "tensorflow": "tensorflow"}
PAPER_OVERHEAD = 0.05


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:
        cpus = os.cpu_count()
    versions = []
    for name in ("torch", "jax", "optax", "tensorflow", "keras"):
        try:
            from importlib.metadata import version

            versions.append(f"{name} {version(name)}")
        except Exception:  # noqa: BLE001 - not installed
            pass
    return f"{cpu}, {cpus} CPUs, Python {platform.python_version()}; " + ", ".join(versions)


def load() -> str:
    try:
        return "load average {:.2f} {:.2f} {:.2f}".format(*os.getloadavg())
    except OSError:
        return "load average unknown"


def available(framework: str) -> str | None:
    """None if the framework and its adapter import, else the reason not.

    The checkout's ``backends/`` counts (the subprocesses get it on their path).
    """
    for folder in (str(ROOT / "backends"), str(ROOT)):
        if folder not in sys.path:
            sys.path.append(folder)
    for module in (FRAMEWORK_MODULES[framework], ADAPTERS[framework]):
        if importlib.util.find_spec(module) is None:
            return f"{module} is not installed"
    return None


def environment() -> dict[str, str]:
    env = dict(os.environ)
    paths = [str(ROOT), str(ROOT / "backends"), env.get("PYTHONPATH", "")]
    env["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
    env.pop("JAX_ENABLE_X64", None)
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    return env


def run(command: list[str], timeout: float) -> tuple[int, str]:
    print("$ " + " ".join(command[1:]), flush=True)
    try:
        done = subprocess.run(command, capture_output=True, text=True, env=environment(),
                              timeout=timeout, check=False, cwd=ROOT)
    except subprocess.TimeoutExpired as exc:
        return 124, f"timed out after {timeout:.0f} s\n{exc.stdout or ''}"
    return done.returncode, done.stdout + (done.stderr if done.returncode else "")


# -- 1. speed -----------------------------------------------------------------

_NUMBER = re.compile(r"^-?\d+(\.\d+)?[x×]?$")


def _fields(line: str) -> list[str]:
    """Columns of a printed table row: split on pipes or runs of 2+ spaces."""
    return [f for f in re.split(r"\s*\|\s*|\s{2,}", line.strip()) if f and set(f) != {"-"}]


def _is_header(fields: list[str]) -> bool:
    return len(fields) >= 2 and any(
        "ratio" in f.lower() or f.lower().startswith("vs ") for f in fields)


def ratio_rows(output: str) -> list[dict]:
    """Rows of every table in ``output`` whose header has a ratio column.

    A table is a header line naming a "ratio" or "vs ..." column, followed by
    rows: a name, then numbers (one per remaining header column). Each row
    gives ``{"table": title above the header, "name": ..., "ratios": {column:
    value}}`` with only the ratio columns kept.
    """
    rows, header, title, last_text = [], None, "", ""
    for line in output.splitlines():
        fields = _fields(line)
        if not fields:
            header = None
            continue
        if _is_header(fields):
            header, title = fields, last_text
            continue
        numbers = [f for f in fields[1:] if _NUMBER.match(f)]
        if header and numbers and len(numbers) == len(fields) - 1 and \
                len(numbers) <= len(header) - 1:
            labels = header[len(header) - len(numbers):]
            ratios = {label: value.rstrip("x×") for label, value in zip(labels, numbers,
                                                                          strict=True)
                      if "ratio" in label.lower() or label.lower().startswith("vs ")}
            if ratios:
                rows.append({"table": title, "name": fields[0], "ratios": ratios})
            continue
        header = None
        last_text = line.strip()
    return rows


def speed(args: argparse.Namespace) -> list[dict]:
    results = []
    for framework, script in SPEED_SCRIPTS.items():
        path = HERE / script
        reason = available(framework) or (None if path.is_file() else f"{script} not present")
        if reason:
            print(f"[speed] {framework}: skipped ({reason})\n")
            results.append({"framework": framework, "skipped": reason})
            continue
        command = [sys.executable, str(path)]
        if args.quick:
            code, help_text = run([sys.executable, str(path), "--help"], 120)
            if "--quick" in help_text:
                command += ["--quick"]
            elif "--scale" in help_text:
                command += ["--scale", "0.1"]
            if "--repeats" in help_text:
                command += ["--repeats", "3"]
        code, output = run(command, args.timeout)
        print(output.rstrip() + "\n", flush=True)
        rows = ratio_rows(output) if code == 0 else []
        results.append({"framework": framework, "script": script, "returncode": code,
                        "output": output, "rows": rows})
    results.append(sophia_h_speed(args))
    return results


def sophia_h_speed(args: argparse.Namespace) -> dict:
    """Sophia-H training steps on the demo model, incl. pytorch_optimizer's SophiaH."""
    script = "lm_bench.py sophia-h"
    extra = ["--size", "tiny", "--repeats", "2"] if args.quick else ["--repeats", "5"]
    (result,) = lm_task("sophia-h", argparse.Namespace(**{**vars(args), "frameworks": ["torch"]}),
                        extra)
    if "ratio" not in result:
        return {"framework": "torch", "script": script,
                **({"skipped": result["skipped"]} if "skipped" in result
                   else {"returncode": result.get("failed", 1)})}
    table = f"demo model, train step + Hutchinson every k={result['k']}"
    rows = [{"table": table, "name": name, "ratios": {"vs AdamW": f"{ratio:.2f}"}}
            for name, ratio in result["ratio"].items()]
    return {"framework": "torch", "script": script, "returncode": 0, "rows": rows,
            "output": json.dumps(result)}


def speed_table(results: list[dict]) -> str:
    lines = ["| framework | table | optimizer | time ratios (same process) |", "|---|---|---|---|"]
    for r in results:
        if "skipped" in r:
            lines.append(f"| {r['framework']} | - | skipped: {r['skipped']} | - |")
        elif r["returncode"] != 0:
            failed = f"failed (exit {r['returncode']})"
            lines.append(f"| {r['framework']} | {r['script']} | {failed} | - |")
        else:
            for row in r["rows"]:
                ratios = ", ".join(f"{k} {v}" for k, v in row["ratios"].items())
                table = row["table"][:70] or r["script"]
                lines.append(f"| {r['framework']} | {table} | {row['name']} | {ratios} |")
    return "\n".join(lines)


# -- 2. refresh overhead and 3. convergence ------------------------------------

def lm_task(task: str, args: argparse.Namespace, extra: list[str]) -> list[dict]:
    results = []
    for framework in args.frameworks:
        reason = available(framework)
        if reason:
            print(f"[{task}] {framework}: skipped ({reason})\n")
            results.append({"framework": framework, "skipped": reason})
            continue
        with tempfile.TemporaryDirectory() as tmp:
            record = pathlib.Path(tmp) / "result.json"
            code, output = run([sys.executable, str(HERE / "lm_bench.py"), task, "--framework",
                                framework, "--json", str(record), *extra], args.timeout)
            if code != 0 or not record.is_file():
                print(output[-4000:])
                results.append({"framework": framework, "failed": code})
                continue
            print(output.rstrip() + "\n" if output.strip() else "", end="", flush=True)
            results.append(json.loads(record.read_text()))
    return results


def overhead_table(results: list[dict]) -> str:
    lines = ["| framework | k | AdamW step | Sophia-G step | refresh | refresh share "
             "| Sophia-G time / AdamW time |", "|---|---|---|---|---|---|---|"]
    for r in results:
        if "step_s" not in r:
            lines.append(f"| {r['framework']} | - | {r.get('skipped') or 'failed'} | | | | |")
            continue
        lines.append(
            f"| {r['framework']} | {r['k']} | {1e3 * r['step_s']['adamw']:.0f} ms "
            f"| {1e3 * r['step_s']['sophia-g']:.0f} ms | {1e3 * r['refresh_s']:.0f} ms "
            f"| {100 * r['refresh_share']:.1f} % | {r['sophia_vs_adamw']:.2f} |")
    return "\n".join(lines)


def convergence_table(results: list[dict]) -> str:
    lines = ["| framework | best AdamW lr | AdamW final val loss (steps) | best Sophia-G lr "
             "| Sophia-G final val loss | Sophia-G steps to AdamW's final loss |",
             "|---|---|---|---|---|---|"]
    for r in results:
        if "best" not in r:
            lines.append(f"| {r['framework']} | {r.get('skipped') or 'failed'} | | | | |")
            continue
        a, s = r["best"]["adamw"], r["best"]["sophia-g"]
        reached = (f"{r['sophia_steps_to_target']} ({100 * r['step_ratio']:.0f} % of AdamW's)"
                   if r["sophia_steps_to_target"] else "not reached")
        lines.append(
            f"| {r['framework']} | {a['lr']:g} | {r['target']:.4f} ({r['adamw_steps']}) "
            f"| {s['lr']:g} | {s['validation'][-1][1]:.4f} | {reached} |")
    return "\n".join(lines)


def convergence_plot(results: list[dict], path: pathlib.Path) -> pathlib.Path | None:
    shown = [r for r in results if "best" in r]
    if not shown:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(shown), figsize=(4.6 * len(shown), 3.8), dpi=110,
                             squeeze=False, sharey=True)
    colors = {"adamw": "tab:blue", "sophia-g": "tab:red"}
    for ax, r in zip(axes[0], shown, strict=True):
        for name, runs in r["runs"].items():
            best_lr = r["best"][name]["lr"]
            for run in runs:
                steps, losses = zip(*run["validation"], strict=True)
                is_best = run["lr"] == best_lr
                ax.plot(steps, losses, "-" if is_best else ":", color=colors[name],
                        lw=1.8 if is_best else 1.0, alpha=1.0 if is_best else 0.6,
                        label=f"{name} lr {run['lr']:g}")
        ax.axhline(r["target"], color="gray", lw=0.8, ls="--")
        ax.set_title(r["framework"], fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel("validation loss (nats per byte)")
    fig.suptitle("Learning-rate sweep on the demo task (solid: best of each optimizer)",
                 fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", choices=("speed", "overhead", "convergence"),
                        default=["speed", "overhead", "convergence"])
    parser.add_argument("--frameworks", nargs="+", choices=tuple(ADAPTERS),
                        default=list(ADAPTERS))
    parser.add_argument("--quick", action="store_true", help="small sizes: a smoke run")
    parser.add_argument("--out", default=str(HERE / "results"),
                        help="folder for results.json and the convergence plot")
    parser.add_argument("--timeout", type=float, default=900, help="per subprocess, seconds")
    args = parser.parse_args(argv)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    print(f"machine: {machine()}\nat start: {load()}\n", flush=True)
    report: dict = {"machine": machine(), "load_at_start": load(), "quick": args.quick}
    sections = []
    if "speed" in args.only:
        report["speed"] = speed(args)
        sections.append("## 1. Optimizer step time, ratio to each framework's baseline\n\n"
                        + speed_table(report["speed"]))
    if "overhead" in args.only:
        extra = ["--size", "tiny", "--repeats", "2"] if args.quick else ["--repeats", "5"]
        report["overhead"] = lm_task("overhead", args, extra)
        sections.append("## 2. Hessian refresh overhead on the demo model "
                        f"(paper: about {100 * PAPER_OVERHEAD:.0f} %)\n\n"
                        + overhead_table(report["overhead"]))
    if "convergence" in args.only:
        extra = (["--size", "tiny", "--multipliers", "1"] if args.quick
                 else ["--steps", "150", "--eval-interval", "10"])
        report["convergence"] = lm_task("convergence", args, extra)
        plot = convergence_plot(report["convergence"], out / "convergence.png")
        sections.append("## 3. Convergence on the demo task\n\n"
                        + convergence_table(report["convergence"])
                        + (f"\n\nplot: {plot}" if plot else ""))
    report["load_at_end"] = load()
    report["seconds"] = time.perf_counter() - started
    (out / "results.json").write_text(json.dumps(report, indent=1, default=str))
    print("\n\n".join(sections))
    print(f"\nmachine: {report['machine']}\n{report['load_at_start']} at start, "
          f"{report['load_at_end']} at end; {report['seconds']:.0f} s in all; "
          f"results: {out / 'results.json'}")


if __name__ == "__main__":
    main()
