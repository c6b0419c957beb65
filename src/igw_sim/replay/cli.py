"""``python -m igw_sim replay`` (and ``igw sim replay``): compare routing policies on one workload.

Prints a one-line description of the workload and engines, then a Markdown table with one row per
policy (:func:`markdown_table`); ``--json PATH`` also writes every figure, including per-engine shares.
Exit status 2 means bad arguments.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from igw_sim.config import EngineConfig
from igw_sim.profiles import PRESETS
from igw_sim.replay import compiled
from igw_sim.replay.driver import run_replay
from igw_sim.replay.results import PolicySummary
from igw_sim.replay.routers import ROUTERS, make_router
from igw_sim.replay.workloads import GENERATORS, build_workload, save_jsonl

__all__ = ["build_parser", "main", "markdown_table"]

_ENGINE_FLAGS = ("max_num_seqs", "max_num_batched_tokens", "max_waiting", "max_model_len", "kv_blocks", "block_size",
                 "max_loras", "lora_load_ms")  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="igw-sim replay",
        description="Replay a workload against N virtual-time engines, once per routing policy.",
    )
    p.add_argument("--engines", type=int, default=8, help="number of engines (default 8)")
    p.add_argument(
        "--workload",
        required=True,
        help=f"generator spec ({', '.join(GENERATORS)}), e.g. w1:qps=40,duration=120,fill=0.73; or a .jsonl file",
    )
    p.add_argument(
        "--policies",
        default="all",
        help=f"comma-separated, from: {', '.join(ROUTERS)}; or 'all' (default)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the policies' random choices (default 0)")
    p.add_argument(
        "--scrape-interval-ms", type=float, default=50.0, help="metrics age seen by realistic policies (default 50)"
    )
    p.add_argument(
        "--engine-model",
        choices=["fast", "exact"],
        default="fast",
        help="fast: event-jumping model (default); exact: the real-time simulator's EngineCore, step by step",
    )
    p.add_argument(
        "--warmup-s", type=float, default=0.0, help="simulate but do not measure requests before this time (default 0)"
    )
    p.add_argument("--json", metavar="PATH", help="write the results as JSON")
    p.add_argument("--save-workload", metavar="PATH", help="write the workload as JSONL and exit")
    eng = p.add_argument_group("engines (each flag overrides --profile)")
    eng.add_argument(
        "--profile", choices=sorted(PRESETS), default="h100-llama3-8b", help="preset (default h100-llama3-8b)"
    )
    eng.add_argument("--max-num-seqs", type=int)
    eng.add_argument("--max-num-batched-tokens", type=int)
    eng.add_argument("--max-waiting", type=int)
    eng.add_argument("--max-model-len", type=int)
    eng.add_argument("--kv-blocks", type=int)
    eng.add_argument("--block-size", type=int)
    eng.add_argument("--max-loras", type=int, help="LoRA slots (default 1)")
    eng.add_argument("--lora-load-ms", type=float, help="time to load an adapter into a slot (default 10)")
    eng.add_argument("--no-prefix-caching", action="store_true")
    return p


def _config(args: argparse.Namespace) -> EngineConfig:
    overrides: dict[str, Any] = {f: getattr(args, f) for f in _ENGINE_FLAGS if getattr(args, f) is not None}
    if args.no_prefix_caching:
        overrides["enable_prefix_caching"] = False
    return EngineConfig.from_preset(args.profile, **overrides)


def _fmt(value: float, unit: str = "s") -> str:
    if math.isnan(value):
        return "-"
    if unit == "s":
        return f"{value * 1000:.0f} ms" if value < 1.0 else f"{value:.2f} s"
    return f"{value:,.0f}"


def markdown_table(rows: Sequence[PolicySummary]) -> str:
    """Policies side by side: one row each."""
    head = (
        "| policy | TTFT p50 | TTFT p90 | TTFT p99 | e2e p50 | e2e p99 | ITL mean | output tok/s | prefix hit "
        "| share min-max | hotspot | max queue | preempt | done / rejected | wall |"
    )
    sep = "|" + "---|" * (head.count("|") - 1)
    lines = [head, sep]
    lines.extend(
        (
            f"| {s.policy} | {_fmt(s.ttft_p50)} | {_fmt(s.ttft_p90)} | {_fmt(s.ttft_p99)} | {_fmt(s.e2e_p50)} "
            f"| {_fmt(s.e2e_p99)} | {_fmt(s.itl_mean)} | {_fmt(s.output_tokens_per_s, '')} "
            f"| {s.prefix_hit_rate:.1%} | {s.share_min:.1%}-{s.share_max:.1%} | {s.hotspot:.2f} | {s.max_queue} "
            f"| {s.preemptions} | {s.completed} / {s.rejected} | {s.wall_s:.2f} s |"
        )
        for s in rows
    )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.engines < 1:
            raise ValueError("--engines must be >= 1")
        config = _config(args)
        cluster = args.engines * config.kv_blocks * config.block_size
        workload = build_workload(args.workload, cluster_kv_tokens=cluster)
        names = list(ROUTERS) if args.policies == "all" else [n.strip() for n in args.policies.split(",") if n.strip()]
        routers = [make_router(name, args.seed) for name in names]
        if not args.scrape_interval_ms > 0:
            raise ValueError("--scrape-interval-ms must be > 0")
    except ValueError as exc:
        parser.error(str(exc))  # exits with status 2
    if args.save_workload:
        count = save_jsonl(workload, args.save_workload)
        print(f"igw-sim replay: wrote {count} requests to {args.save_workload}")
        return 0
    print(
        f"{workload.description}\n{args.engines} x {args.profile} engines ({config.max_num_seqs} seqs, "
        f"{config.kv_blocks:,} KV blocks of {config.block_size}), {args.engine_model} model "
        f"({'compiled' if compiled() else 'pure Python'}), "
        f"scrape every {args.scrape_interval_ms:g} ms, warm-up {args.warmup_s:g} s\n",
        flush=True,
    )
    results: list[PolicySummary] = []
    for router in routers:
        run = run_replay(
            workload,
            router,
            engines=args.engines,
            config=config,
            model=args.engine_model,
            scrape_interval=args.scrape_interval_ms / 1000.0,
            warmup=args.warmup_s,
        )
        results.append(run.summary)
        s = run.summary
        print(
            f"  {s.policy}: {s.requests:,} requests in {s.wall_s:.1f} s wall ({s.requests_per_wall_s:,.0f} requests/s)",
            file=sys.stderr,
            flush=True,
        )
    print(markdown_table(results))
    if args.json:
        doc = {
            "workload": args.workload,
            "description": workload.description,
            "engines": args.engines,
            "profile": args.profile,
            "engine_model": args.engine_model,
            "scrape_interval_ms": args.scrape_interval_ms,
            "warmup_s": args.warmup_s,
            "config": {f: getattr(config, f) for f in (*_ENGINE_FLAGS, "enable_prefix_caching")},
            "results": [s.to_json() for s in results],
        }
        Path(args.json).write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
    return 0
