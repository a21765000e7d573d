"""Formatting the report: plain-text tables (pasteable into markdown)."""

from __future__ import annotations

import dataclasses
import importlib
import math

from sophia_core.backends import by_name

from .compare import Comparison

__all__ = ["as_record", "part_table", "seconds_line", "trajectory_table", "versions"]


def versions(backends: list[str]) -> str:
    parts = []
    for name in ["numpy", *backends]:
        module = by_name(name).module
        try:
            version = importlib.import_module(module).__version__
        except (ImportError, AttributeError):
            version = "?"
        parts.append(f"{module} {version}")
    return ", ".join(dict.fromkeys(parts))


def _num(x: float) -> str:
    if x == 0:
        return "0"
    if not math.isfinite(x):
        return "inf"
    if abs(x) >= 1e4 or abs(x) < 1e-2:
        return f"{x:.1e}"
    return f"{x:.2f}"


def _table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h)
              for i, h in enumerate(header)]

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"

    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(header), sep, *(line(r) for r in rows)])


def trajectory_table(rows: list[Comparison]) -> str:
    """backend x scenario x dtype: max ulp, max abs deviation, bitwise, pass/fail."""
    header = ["backend", "scenario", "dtype", "mode", "max ulp", "max abs dev", "bitwise",
              "budget used", "sign-sens/flips", "result"]
    body = []
    for r in rows:
        result = "pass" if r.passed else "FAIL: " + "; ".join(r.problems)[:120]
        tolerance = r.mode == "tolerance"
        body.append([r.backend, r.scenario, r.dtype, r.mode, _num(r.max_ulp), _num(r.max_abs),
                     "yes" if r.bitwise else "no",
                     _num(r.budget_ratio) if tolerance else "-",
                     f"{r.sign_sensitive}/{r.sign_flips}" if tolerance else "-",
                     result])
    reasons = sorted({(r.backend, r.reason) for r in rows if r.mode == "tolerance" and r.reason})
    failed = sum(not r.passed for r in rows)
    bitwise = sum(r.bitwise for r in rows)
    summary = (f"trajectories: {len(rows)} runs, {bitwise} bitwise identical, "
               f"{failed} failed")
    notes = "".join(f"\ntolerance mode, {backend}: {reason}" for backend, reason in reasons)
    return _table(header, body) + "\n" + summary + notes


def seconds_line(seconds: dict[str, float]) -> str:
    return "time per backend (s): " + ", ".join(f"{k} {v:.1f}" for k, v in seconds.items())


def part_table(part: str, rows: list[dict]) -> str:
    """A generic table of dict rows (every row has 'passed' and 'detail')."""
    if not rows:
        return f"{part}: nothing to run"
    keys = [k for k in rows[0] if k not in ("passed", "detail")]
    header = [*keys, "result"]
    def result(r: dict) -> str:
        detail = str(r.get("detail", "")).replace("\n", " ")
        if r["passed"]:
            return f"pass ({detail[:90]})" if detail else "pass"
        return "FAIL: " + detail[:120]

    body = [[str(r.get(k, "")) for k in keys] + [result(r)] for r in rows]
    failed = sum(not r["passed"] for r in rows)
    return f"{part}:\n" + _table(header, body) + f"\n{part}: {len(rows)} checks, {failed} failed"


def as_record(row: Comparison) -> dict:
    record = dataclasses.asdict(row)
    record["passed"] = row.passed
    return record
