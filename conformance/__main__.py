"""``python -m conformance``: the conformance report; exits non-zero on any failure."""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

from . import configure_environment


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m conformance",
        description="Run every backend on the scenario table and compare with the numpy "
                    "reference; print a backend x scenario x dtype table.",
    )
    parser.add_argument("--backends", default=None,
                        help="comma-separated backend names from sophia_core.backends "
                             "(default: every certified backend that imports here)")
    parser.add_argument("--device", default=os.environ.get("SOPHIA_DEVICE", "cpu"),
                        help="cpu or cuda (default: $SOPHIA_DEVICE or cpu)")
    parser.add_argument("--scenarios", default=None, help="comma-separated scenario names")
    parser.add_argument("--dtypes", default=None, help="comma-separated dtypes")
    parser.add_argument("--steps", type=int, default=None,
                        help="run only the first N steps of every scenario (quick checks)")
    parser.add_argument("--parts", default="trajectories,errors,estimators,portable,nonfinite",
                        help="which parts to run (default: all)")
    parser.add_argument("--no-fma-guard", action="store_true",
                        help="leave XLA's FMA contraction on (JAX/TF are then compared "
                             "with the tolerance model instead of bitwise)")
    parser.add_argument("--json", default=None, help="also write the rows to this JSON file")
    parser.add_argument("--list", action="store_true", help="list scenarios and backends")
    parser.add_argument("-v", "--verbose", action="store_true", help="print progress")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    configure_environment(fma_guard=not args.no_fma_guard)

    from . import report, run
    from .scenarios import DTYPES, SCENARIOS, by_name

    if args.list:
        for scenario in SCENARIOS:
            print(f"{scenario.name:<22} {scenario.description}")
        print("certified backends:", ", ".join(run.certified_backends()))
        return 0
    if args.backends:
        backends = [b.strip() for b in args.backends.split(",") if b.strip()]
        known = run.certified_backends()
        unknown = [b for b in backends if b not in known]
        if unknown:
            print(f"no conformance driver for {unknown}; certified: {known}", file=sys.stderr)
            return 2
        missing = [b for b in backends if b not in run.available_backends()]
        if missing:
            print(f"backends {missing} do not import here (framework or adapter missing)",
                  file=sys.stderr)
            return 2
    else:
        backends = run.available_backends()
        from sophia_core.backends import REQUIRED_ENV, required_backends

        missing = sorted(set(run.certified_backends()) & required_backends() - set(backends))
        if missing:  # nox names the backends a session must have: no silent skip
            print(f"{REQUIRED_ENV} requires {missing}, which do not import here",
                  file=sys.stderr)
            return 2
    scenarios = ([by_name(s.strip()) for s in args.scenarios.split(",")]
                 if args.scenarios else list(SCENARIOS))
    dtypes = [d.strip() for d in args.dtypes.split(",")] if args.dtypes else list(DTYPES)
    parts = {p.strip() for p in args.parts.split(",")}
    progress = (lambda line: print(line, file=sys.stderr, flush=True)) if args.verbose else None

    start = time.perf_counter()
    print(f"sophia-xp conformance: backends {', '.join(backends)}; device {args.device}; "
          f"python {platform.python_version()}; {report.versions(backends)}")
    print(f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}")
    failed = False
    records: dict[str, list[dict]] = {}
    if "trajectories" in parts:
        rows, seconds = run.run_trajectories(backends, scenarios=scenarios, dtypes=dtypes,
                                             device=args.device, steps=args.steps,
                                             progress=progress)
        print()
        print(report.trajectory_table(rows))
        print(report.seconds_line(seconds))
        failed |= any(not r.passed for r in rows)
        records["trajectories"] = [report.as_record(r) for r in rows]
    for part in ("errors", "estimators", "portable", "nonfinite"):
        if part not in parts:
            continue
        module = __import__(f"conformance.{part}", fromlist=["run_part"])
        part_rows = module.run_part(backends, device=args.device)
        print()
        print(report.part_table(part, part_rows))
        failed |= any(not r["passed"] for r in part_rows)
        records[part] = part_rows
    elapsed = time.perf_counter() - start
    print()
    print(f"{'FAILED' if failed else 'PASSED'} in {elapsed:.1f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": args.device, "backends": backends, "seconds": elapsed,
                       "passed": not failed, **records}, f, indent=1, default=str)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
