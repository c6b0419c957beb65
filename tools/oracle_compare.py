"""Compare the oracle of ``igw_sim.replay.oracle`` with the old one and the realistic policies.

Runs :func:`igw_sim.replay.run_replay` once per (workload, policy) on the same engines, as
``igw sim replay`` does, and prints one Markdown table per workload: TTFT mean / p50 / p90 / p99,
output tokens/s, prefix hit rate, preemptions. ``oracle`` is the new oracle, ``oracle-old`` the one in
``routers.py``; the others are ``make_router``'s.

    .venv/bin/python tools/oracle_compare.py                       # the W1 sweep and W4/W5/W7
    .venv/bin/python tools/oracle_compare.py --workload w1:qps=50,duration=200,fill=0.73
    .venv/bin/python tools/oracle_compare.py --set w1_balance=0.5  # a knob of the new oracle
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable, Sequence
from typing import Any

from igw_sim.config import EngineConfig
from igw_sim.replay import Router, build_workload, make_router, run_replay
from igw_sim.replay.oracle import OracleRouter
from igw_sim.replay.results import PolicySummary
from igw_sim.replay.routers import MissPricedOracleRouter as OldOracleRouter

DEFAULT_WORKLOADS = (
    "w1:qps=20,duration=200,fill=0.73",
    "w1:qps=40,duration=200,fill=0.73",
    "w1:qps=50,duration=200,fill=0.73",
    "w1:qps=60,duration=200,fill=0.73",
    "w4:qps=40,duration=200",
    "w5:qps=20,duration=200",
    "w7:qps=20,duration=200",
)
DEFAULT_POLICIES = ("oracle", "oracle-old", "cache-aware", "prefix-load", "least-queue", "round-robin")


def _router(name: str, seed: int, knobs: dict[str, Any]) -> Router:
    if name == "oracle":
        return OracleRouter(seed, **knobs)
    if name == "oracle-old":
        old = OldOracleRouter(seed)
        old.name = "oracle-old"
        return old
    return make_router(name, seed)


def _ms(value: float) -> str:
    if math.isnan(value):
        return "-"
    return f"{value * 1000:.0f} ms" if value < 10.0 else f"{value:.1f} s"


def table(rows: Sequence[PolicySummary]) -> str:
    lines = [
        "| policy | TTFT mean | TTFT p50 | TTFT p90 | TTFT p99 | ITL mean | output tok/s | prefix hit | preempt |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    lines.extend(
        f"| {s.policy} | {_ms(s.ttft_mean)} | {_ms(s.ttft_p50)} | {_ms(s.ttft_p90)} | {_ms(s.ttft_p99)} "
        f"| {_ms(s.itl_mean)} | {s.output_tokens_per_s:,.0f} | {s.prefix_hit_rate:.1%} | {s.preemptions} |"
        for s in rows
    )
    return "\n".join(lines)


def verdict(rows: Sequence[PolicySummary]) -> str:
    """Where the new oracle is not at least as good as the best other policy (an empty string if nowhere)."""
    new = next((s for s in rows if s.policy == "oracle"), None)
    others = [s for s in rows if s.policy != "oracle"]
    if new is None or not others:
        return ""
    checks: list[tuple[str, Callable[[PolicySummary], float], bool]] = [
        ("throughput", lambda s: s.output_tokens_per_s, True),
        ("TTFT p90", lambda s: s.ttft_p90, False),
        ("TTFT mean", lambda s: s.ttft_mean, False),
    ]
    worse: list[str] = []
    for label, key, higher in checks:
        best = max(others, key=key) if higher else min(others, key=key)
        a, b = key(new), key(best)
        if (a < b) if higher else (a > b):
            worse.append(f"{label}: {a:.4g} vs {best.policy} {b:.4g}")
    return "; ".join(worse)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--workload", action="append", help="generator spec (repeatable; default: the sweep)")
    p.add_argument("--policies", default=",".join(DEFAULT_POLICIES))
    p.add_argument("--engines", type=int, default=8)
    p.add_argument("--warmup-s", type=float, default=60.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--profile", default="h100-llama3-8b")
    p.add_argument("--set", action="append", default=[], metavar="KNOB=VALUE", help="a knob of the new oracle")
    args = p.parse_args(argv)
    knobs: dict[str, Any] = {}
    for item in args.set:
        key, _, value = item.partition("=")
        knobs[key] = int(value) if key == "group_depth" else float(value)
    config = EngineConfig.from_preset(args.profile)
    cluster = args.engines * config.kv_blocks * config.block_size
    policies = [n.strip() for n in args.policies.split(",") if n.strip()]
    bad = 0
    for spec in args.workload or DEFAULT_WORKLOADS:
        workload = build_workload(spec, cluster_kv_tokens=cluster)
        rows = [
            run_replay(
                workload, _router(name, args.seed, knobs), engines=args.engines, config=config, warmup=args.warmup_s
            ).summary
            for name in policies
        ]
        print(f"\n### {spec}\n\n{workload.description}\n\n{table(rows)}")
        worse = verdict(rows)
        if worse:
            bad += 1
            print(f"\nnew oracle behind on {worse}")
        sys.stdout.flush()
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
