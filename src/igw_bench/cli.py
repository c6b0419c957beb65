"""``igw bench``: benchmark commands.

``igw bench overhead``: requests/s, added latency and EPP CPU per request of the full gateway
(Envoy + EPP over ext_proc) against Envoy alone, side by side in one run, for 1 KB and 200 KB
OpenAI chat requests. Prints a Markdown table and writes the JSON report.

``igw bench scrape``: the EPP's CPU while it keeps N endpoints' metrics fresh.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def _non_negative_float(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="igw bench", description="igw benchmarks")
    sub = parser.add_subparsers(dest="command", required=True)
    ov = sub.add_parser(
        "overhead",
        help="gateway overhead: requests/s, added latency and EPP CPU over Envoy alone",
        description="Runs Envoy alone (A) and the full igw gateway (B) in front of the same fast backend, "
        "interleaved, for 1 KB and 200 KB chat requests.",
    )
    ov.add_argument("--duration", type=_positive_float, default=8.0, help="measured seconds per step (default 8)")
    ov.add_argument("--warmup", type=_non_negative_float, default=2.0, help="warm-up seconds per step (default 2)")
    ov.add_argument("--body-mode", choices=["buffered", "duplex"], default="buffered",
                    help="arm B's ext_proc request body mode (default buffered, as igw run)")  # fmt: skip
    ov.add_argument("--out", type=Path, default=Path("benchmarks/results"), metavar="DIR",
                    help="where the JSON report goes (default benchmarks/results)")  # fmt: skip
    ov.add_argument("--concurrency-1k", type=_positive_int, default=32, help="throughput step, 1 KB (default 32)")
    ov.add_argument("--concurrency-200k", type=_positive_int, default=8, help="throughput step, 200 KB (default 8)")
    ov.add_argument("--max-requests", type=_positive_int, default=1_000_000,
                    help="upper bound on requests per step (default 1000000)")  # fmt: skip
    sc = sub.add_parser(
        "scrape",
        help="EPP CPU spent keeping N endpoints' metrics fresh (no traffic)",
        description="Runs the EPP alone in front of N simulated servers and measures its CPU while it scrapes.",
    )
    sc.add_argument("--endpoints", type=_positive_int, nargs="+", default=[8, 64], help="fleet sizes (default 8 64)")
    sc.add_argument("--interval", type=_positive_float, default=0.05, help="scrape interval, seconds (default 0.05)")
    sc.add_argument("--duration", type=_positive_float, default=8.0, help="measured seconds per size (default 8)")
    return parser


def _scrape(args: argparse.Namespace) -> int:
    from igw_bench.procs import run_loop
    from igw_bench.scrape import ScrapeOptions, format_table, run_scrape

    opts = ScrapeOptions(endpoints=tuple(args.endpoints), interval_s=args.interval, duration_s=args.duration)
    try:
        rows = run_loop(run_scrape(opts))
    except (RuntimeError, TimeoutError, OSError) as exc:
        print(f"igw bench scrape: error: {exc}", file=sys.stderr)
        return 1
    print(format_table(rows), flush=True)
    return 0


def _overhead(args: argparse.Namespace) -> int:
    from igw_bench.overhead import OverheadOptions, format_table, run_overhead, write_report
    from igw_bench.procs import run_loop

    opts = OverheadOptions(
        duration_s=args.duration,
        warmup_s=args.warmup,
        body_mode=args.body_mode,
        out_dir=args.out,
        concurrency_1k=args.concurrency_1k,
        concurrency_200k=args.concurrency_200k,
        max_requests=args.max_requests,
    )

    def progress(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    try:
        report = run_loop(run_overhead(opts, log=progress))
    except (RuntimeError, TimeoutError, OSError) as exc:
        print(f"igw bench overhead: error: {exc}", file=sys.stderr)
        return 1
    print(format_table(report), flush=True)
    path = write_report(report, opts.out_dir)
    print(f"\nwrote {path}", flush=True)
    failed = [
        f"{name} {arm}"
        for name, size in report["sizes"].items()
        for arm in ("A", "B")
        if not size["throughput"][arm]["rps"] > 0
    ]
    if failed:
        print(f"igw bench overhead: no successful requests for {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "overhead":
        return _overhead(args)
    if args.command == "scrape":
        return _scrape(args)
    return 2  # pragma: no cover - argparse only accepts known commands
