#!/usr/bin/env python3
"""The replay's speed budget (``docs/simulator.md`` section 6): CPU time per request, per policy.

    .venv/bin/python tools/build_replay_ext.py          # the compiled build (checked below)
    .venv/bin/python tools/replay_speed.py              # 5 alternating rounds of the three policies
    .venv/bin/python tools/replay_speed.py --rounds 3 --policies prefix-load --duration 30

Each run is ``run_replay(build_workload("w4:qps=1000,duration=60"), make_router(policy), engines=64,
config=EngineConfig.from_preset("h100-llama3-8b"))``, generation included (as the CLI runs it), timed as
the process's CPU time. The policies alternate round by round, so a busy machine slows them alike. The
budget is one hour of 1,000 QPS on 64 engines in at most 60 s, i.e. 16.7 us per request; the table gives
the best and the median of the rounds, and the hour that the best one extrapolates to.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import igw_sim.replay as replay
from igw_sim.config import EngineConfig

BUDGET_S_PER_HOUR = 60.0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--duration", type=float, default=60.0, help="simulated seconds of W4 at 1,000 QPS")
    parser.add_argument("--policies", default="round-robin,least-queue,prefix-load")
    parser.add_argument("--engines", type=int, default=64)
    parser.add_argument("--allow-pure", action="store_true", help="run even without an up-to-date compiled build")
    args = parser.parse_args()
    if not replay.compiled() and not args.allow_pure:
        print("not compiled (or stale): run .venv/bin/python tools/build_replay_ext.py first", file=sys.stderr)
        return 2
    config = EngineConfig.from_preset("h100-llama3-8b")
    policies = [p.strip() for p in args.policies.split(",") if p.strip()]
    spec = f"w4:qps=1000,duration={args.duration:g}"
    per_request: dict[str, list[float]] = {p: [] for p in policies}
    for r in range(args.rounds):
        for policy in policies:
            gc.collect()  # the previous run's garbage, which the replay leaves to the collector, is not timed
            t0 = time.process_time()
            run = replay.run_replay(
                replay.build_workload(spec), replay.make_router(policy), engines=args.engines, config=config
            )
            cpu = time.process_time() - t0
            n = run.summary.requests + run.recorder.rejected
            per_request[policy].append(cpu / max(n, 1) * 1e6)
            print(f"round {r + 1}: {policy:12s} {cpu:6.2f} s CPU, {n:,} requests, {per_request[policy][-1]:.1f} us/request",
                  flush=True)  # fmt: skip
    print(f"\n{spec}, {args.engines} engines, compiled={replay.compiled()}")
    print(f"{'policy':12s} {'best us/req':>11s} {'median':>8s} {'s per hour':>10s}  budget ({BUDGET_S_PER_HOUR:g} s/h)")
    for policy, values in per_request.items():
        best = min(values)
        hour = best * 1e-6 * 3_600_000
        ok = "met" if hour <= BUDGET_S_PER_HOUR else "MISSED"
        print(f"{policy:12s} {best:11.1f} {statistics.median(values):8.1f} {hour:10.0f}  {ok}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
