"""``python -m benchmarks run|list``: the benchmark command line."""

from __future__ import annotations

import argparse
import datetime
import shlex
import signal
import sys
import tempfile
import time
from pathlib import Path
from types import FrameType
from typing import Any

from . import environment, plots, procs, report
from .core import Progress, RunConfig, ScenarioResult
from .scenarios import all_scenarios, get
from .servers import ServerError

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="list the scenarios")
    run = sub.add_parser("run", help="run scenarios and print a Markdown table")
    run.add_argument(
        "--scenario",
        action="append",
        metavar="NAME",
        help="scenario to run (repeatable; default: all)",
    )
    size = run.add_mutually_exclusive_group()
    size.add_argument(
        "--quick", action="store_true", help="1 repetition, short periods (CI smoke, < 2 min)"
    )
    size.add_argument(
        "--full", action="store_true", help="also the very long or big cases (1M idle sessions)"
    )
    run.add_argument("--json", type=Path, metavar="FILE", help="write all results as JSON")
    run.add_argument(
        "--report", type=Path, metavar="DIR", help="write DIR/RESULTS.md and its PNG plots"
    )
    run.add_argument("--repetitions", type=int, help="repetitions per subject (default 3)")
    run.add_argument("--connections", type=int, help="keep-alive connections (default 64)")
    run.add_argument(
        "--concurrency",
        type=_levels,
        metavar="N,N,...",
        help="concurrency levels of the sweeping scenarios (default 1,4,16,64,256 for "
        "orchestrator-rps; 1,64 with --quick)",
    )
    run.add_argument("--warmup", type=float, help="seconds of warm-up per sample")
    run.add_argument("--duration", type=float, help="measured seconds per sample")
    run.add_argument(
        "--backend",
        action="append",
        choices=["asyncio", "trio"],
        help="event loop backend (repeatable; default: both)",
    )
    run.add_argument("--no-pin", action="store_true", help="do not pin processes to CPUs")
    return parser


def _levels(text: str) -> tuple[int, ...]:
    try:
        levels = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a list of integers: {text!r}") from None
    if not levels or min(levels) < 1:
        raise argparse.ArgumentTypeError("levels must be integers >= 1")
    return levels


def _sigterm(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt  # unwind through every `finally`, stopping the children


def _run(args: argparse.Namespace) -> int:
    for flag in ("repetitions", "connections", "duration"):
        value = getattr(args, flag)
        if value is not None and value <= 0:
            print(f"error: --{flag} must be positive", file=sys.stderr)
            return 2
    if args.warmup is not None and args.warmup < 0:
        print("error: --warmup must be >= 0", file=sys.stderr)
        return 2
    names = args.scenario or list(all_scenarios())
    try:
        scenarios = [get(name) for name in names]
    except KeyError as exc:
        print(f"error: {exc.args[0]}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="ppio-bench-") as workdir:
        config = RunConfig.make(
            quick=args.quick,
            full=args.full or None,
            repetitions=args.repetitions,
            connections=args.connections,
            warmup=args.warmup,
            duration=args.duration,
            backends=tuple(args.backend) if args.backend else None,
            pin=False if args.no_pin else None,
            workdir=Path(workdir),
            levels=args.concurrency,
        )
        meta: dict[str, Any] = {
            "command": shlex.join([Path(sys.executable).name, "-m", "benchmarks", *sys.argv[1:]]),
            "started": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "machine": environment.machine(),
            "packages": environment.packages(),
            "config": config.to_json(),
        }
        plot_note = plots.missing() if args.report else None
        if plot_note is not None:
            print(f"note: no plots: {plot_note}", file=sys.stderr)
        plan = [(s, s.steps(config)) for s in scenarios]
        started = time.monotonic()
        results: list[ScenarioResult] = []
        with Progress(sum(steps for _, steps in plan)) as progress:
            try:
                for scenario, steps in plan:
                    progress.begin(scenario.name, steps)
                    results.append(scenario.run(config, progress))
            except (ServerError, RuntimeError) as exc:
                progress.close("failed")
                print(f"error: {exc}", file=sys.stderr)
                return 1
        meta["seconds"] = round(time.monotonic() - started, 1)
    print(report.table(results))
    for result in results:
        for note in result.notes:
            print(f"\n{result.name}: {note}")
    failed = [
        f"{r.scenario} {r.backend} {r.subject}"
        for result in results
        for r in result.rows
        if r.errors or not r.rps.min
    ]
    failed += [failure for result in results for failure in result.failures]
    if failed:
        print(f"\nwarning: request errors or no requests in: {', '.join(failed)}", file=sys.stderr)
    if args.json:
        report.write_json(args.json, results, meta)
        print(f"\nwrote {args.json}", file=sys.stderr)
    if args.report:
        path = report.write_report(args.report, results, meta)
        print(f"wrote {path}", file=sys.stderr)
    print(f"took {meta['seconds']:.0f} s", file=sys.stderr)
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv`` and run the chosen command."""
    args = _parser().parse_args(argv)
    if args.command == "list":
        for name, scenario in all_scenarios().items():
            print(f"{name}\t{scenario.description}")
        return 0
    signal.signal(signal.SIGTERM, _sigterm)
    try:
        return _run(args)
    except KeyboardInterrupt:
        # Every `finally` has run; kill whatever one cut short left, undisturbed.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        left = procs.stop_all()
        extra = f" (killed {len(left)} left running)" if left else ""
        print(f"\ninterrupted: servers and load generators stopped{extra}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
