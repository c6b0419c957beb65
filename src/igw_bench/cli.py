"""``igw bench``: benchmark commands.

``igw bench overhead``: requests/s, latency and router CPU per request of the full gateway
(Envoy + EPP over ext_proc), Envoy alone, the peer routers (round_robin) and no router at all,
side by side in one run, for 1 KB and 200 KB OpenAI chat requests; igw's added p50/p99 over each.
Prints a Markdown table and writes the JSON report.

``igw bench scrape``: the EPP's CPU while it keeps N endpoints' metrics fresh.

``igw bench compare``: arms (igw configurations, Envoy's balancing, sglang-router, vllm-router) side
by side on one workload and a ladder of rates, each in front of a fresh simulated fleet; writes JSON,
Markdown and a PNG plot.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any


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
        help="gateway overhead: requests/s, added latency and router CPU over direct, Envoy alone and the peers",
        description="Runs the backend direct, Envoy alone, the full igw gateway and the peer routers (policy "
        "round_robin) in front of the same fast backend, every arm in turn per step, for 1 KB and 200 KB chat "
        "requests.",
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
    ov.add_argument("--peers", metavar="LIST",
                    help="peer routers as extra arms, each with --policy round_robin: comma-separated "
                    "sglang-router, vllm-router, or none (default: both, installed on first use and left out "
                    "with a warning if that fails; named ones must work)")  # fmt: skip
    sc = sub.add_parser(
        "scrape",
        help="EPP CPU spent keeping N endpoints' metrics fresh (no traffic)",
        description="Runs the EPP alone in front of N simulated servers and measures its CPU while it scrapes.",
    )
    sc.add_argument("--endpoints", type=_positive_int, nargs="+", default=[8, 64], help="fleet sizes (default 8 64)")
    sc.add_argument("--interval", type=_positive_float, default=0.05, help="scrape interval, seconds (default 0.05)")
    sc.add_argument("--duration", type=_positive_float, default=8.0, help="measured seconds per size (default 8)")
    cmp = sub.add_parser(
        "compare",
        help="arms side by side on a workload and a QPS ladder (simulated fleet)",
        description="Each arm in turn gets a fresh simulated fleet, a warm-up, then one open-loop Poisson step "
        "per rate. Times and rates are simulated (the fleet runs --time-dilation times slower than real time).",
    )
    cmp.add_argument("--workload", default="w1:fill=0.73",
                     help="generator spec without qps/duration/seed: w1, w4, w5, w6, w7 (default w1:fill=0.73)")  # fmt: skip
    cmp.add_argument("--arms", default="igw,sglang-router:cache_aware,vllm-router:cache_aware,envoy-lr,envoy-rr",
                     help="comma-separated arms: igw, igw:FILE, envoy-rr, envoy-lr, random, "
                     "sglang-router:POLICY, vllm-router:POLICY")  # fmt: skip
    cmp.add_argument("--qps", default="10,20,30,40,50,60", help="comma-separated simulated rates (default 10..60)")
    cmp.add_argument("--step-s", type=_positive_float, default=20.0, help="simulated seconds per step (default 20)")
    cmp.add_argument(
        "--warmup-s", type=_non_negative_float, default=10.0, help="simulated warm-up seconds (default 10)"
    )
    cmp.add_argument("--warmup-qps", type=_non_negative_float, default=0.0, help="warm-up rate (default: middle step)")
    cmp.add_argument("--load", choices=["builtin", "inference-perf"], default="builtin",
                     help="the load client (inference-perf: w1 and w4 only; default builtin)")  # fmt: skip
    cmp.add_argument("--fleet", choices=["sim", "vllm"], default="sim",
                     help="simulated servers (fresh per arm) or real vLLM CPU engines (shared; make vllm-env)")  # fmt: skip
    cmp.add_argument("--servers", type=_positive_int, default=0, help="servers (default 8 simulated, 3 vLLM)")
    cmp.add_argument("--profile", default="h100-llama3-8b", help="simulator latency profile (default h100-llama3-8b)")
    cmp.add_argument("--kv-blocks", type=_positive_int, default=0,
                     help="KV blocks per server (default 8192 simulated of 16 tokens, 256 vLLM of 32)")  # fmt: skip
    cmp.add_argument("--time-dilation", type=_positive_float, default=5.0,
                     help="real seconds per simulated second (simulated fleet; default 5)")  # fmt: skip
    cmp.add_argument("--loras", type=_positive_int, default=0, help="LoRA adapters lora-0.. the fleet serves (w6)")
    cmp.add_argument("--max-loras", type=_positive_int, help="resident adapter slots per server")
    cmp.add_argument("--tokenizer", type=Path, metavar="DIR",
                     help="simulated fleet: tokenize with this Hugging Face tokenizer directory")  # fmt: skip
    cmp.add_argument("--kv-events-endpoint", metavar="ADDR",
                     help="simulated fleet: publish KV-cache events there (e.g. tcp://127.0.0.1:5557, "
                     "which a precise-prefix igw arm binds)")  # fmt: skip
    cmp.add_argument("--seed", type=int, default=1, help="workload seed (default 1)")
    cmp.add_argument("--saturated-ttft-s", type=_positive_float, default=30.0,
                     help="an arm whose TTFT p90 passes this skips its higher steps (default 30)")  # fmt: skip
    cmp.add_argument("--out", type=Path, default=Path("benchmarks/results"), metavar="DIR",
                     help="where the report goes (default benchmarks/results)")  # fmt: skip
    return parser


def _compare(args: argparse.Namespace) -> int:
    import orjson

    from igw_bench.arms import parse_arm
    from igw_bench.compare import CompareOptions, describe_workload, run_compare
    from igw_bench.fleet import FleetSpec, SimFleetSpec, VllmFleetSpec
    from igw_bench.ipload import shared_prefix_shape
    from igw_bench.procs import run_loop
    from igw_bench.report import format_markdown, write_report

    try:
        arms = tuple(parse_arm(a) for a in args.arms.split(",") if a.strip())
        qps = tuple(float(q) for q in args.qps.split(",") if q.strip())
        if not arms or not qps or any(not q > 0 for q in qps):
            raise ValueError("--arms and --qps need at least one value each, and rates must be > 0")
    except ValueError as exc:
        print(f"igw bench compare: error: {exc}", file=sys.stderr)
        return 2
    loras = tuple(f"lora-{i}" for i in range(args.loras))
    fleet: FleetSpec
    if args.fleet == "vllm":
        fleet = VllmFleetSpec(servers=args.servers or 3, num_blocks=args.kv_blocks or 256, loras=loras,
                              max_loras=args.max_loras or 2)  # fmt: skip
    else:
        fleet = SimFleetSpec(servers=args.servers or 8, profile=args.profile, kv_blocks=args.kv_blocks or 8192,
                             time_dilation=args.time_dilation, loras=loras, max_loras=args.max_loras,
                             tokenizer=args.tokenizer, kv_events_endpoint=args.kv_events_endpoint)  # fmt: skip
    opts = CompareOptions(workload=args.workload, arms=arms, qps=qps, step_s=args.step_s, warmup_s=args.warmup_s,
                          warmup_qps=args.warmup_qps, fleet=fleet, seed=args.seed,
                          saturated_ttft_s=args.saturated_ttft_s, out_dir=args.out, load=args.load)  # fmt: skip
    try:
        describe_workload(opts)
        if args.load == "inference-perf":
            shared_prefix_shape(args.workload, fleet.kv_tokens)
        if isinstance(fleet, VllmFleetSpec) and (problem := fleet.missing()):
            raise ValueError(problem)
    except ValueError as exc:
        print(f"igw bench compare: error: {exc}", file=sys.stderr)
        return 2

    def progress(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    def partial(report: dict[str, Any]) -> None:
        path = args.out / "compare-partial.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(orjson.dumps(report, default=str, option=orjson.OPT_INDENT_2))

    report = run_loop(run_compare(opts, log=progress, on_arm=partial))
    print(format_markdown(report), flush=True)
    for path in write_report(report, args.out):
        print(f"wrote {path}", flush=True)
    return 1 if any("error" in arm for arm in report["arms"]) else 0


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
    from igw_bench.overhead import PEER_KINDS, OverheadOptions, format_table, parse_peers, run_overhead, write_report
    from igw_bench.procs import run_loop

    try:
        peers = parse_peers(args.peers) if args.peers is not None else PEER_KINDS
    except ValueError as exc:
        print(f"igw bench overhead: error: {exc}", file=sys.stderr)
        return 2
    opts = OverheadOptions(
        duration_s=args.duration,
        warmup_s=args.warmup,
        body_mode=args.body_mode,
        out_dir=args.out,
        concurrency_1k=args.concurrency_1k,
        concurrency_200k=args.concurrency_200k,
        max_requests=args.max_requests,
        peers=peers,
        peers_required=args.peers is not None,
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
        f"{arm} {name} c={c}"
        for name, size in report["sizes"].items()
        for c, step in size["by_concurrency"].items()
        for arm, summary in step["arms"].items()
        if not summary["rps"] > 0
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
    if args.command == "compare":
        return _compare(args)
    return 2  # pragma: no cover - argparse only accepts known commands
