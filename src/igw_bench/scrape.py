"""``igw bench scrape``: what keeping the metrics of N model servers fresh costs the EPP.

Starts N simulated vLLM servers (one process) and the EPP alone (``igw run --no-envoy``) in front
of them, lets it scrape every endpoint at its interval with no traffic, and reports the EPP's CPU
as a share of one core and per scrape, for each N in one run.
"""

from __future__ import annotations

import asyncio
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from igw_bench.procs import HOST, Child, free_ports
from igw_bench.sysstats import cpu_seconds


@dataclass(frozen=True, slots=True)
class ScrapeOptions:
    endpoints: tuple[int, ...] = (8, 64)
    interval_s: float = 0.05
    duration_s: float = 8.0
    warmup_s: float = 2.0


async def _one(n: int, opts: ScrapeOptions, logdir: Path) -> dict[str, Any]:
    sim_ports = free_ports(n + 3)
    grpc_port, health_port, metrics_port = sim_ports[n:]
    sim = Child("simulator", [sys.executable, "-m", "igw_sim", "--ports", ",".join(map(str, sim_ports[:n]))],
                logdir / f"sim-{n}.log")  # fmt: skip
    argv = [sys.executable, "-m", "igw", "run", "--no-envoy", "--grpc-port", str(grpc_port),
            "--grpc-health-port", str(health_port), "--metrics-port", str(metrics_port),
            "--refresh-metrics-interval", str(opts.interval_s)]  # fmt: skip
    for port in sim_ports[:n]:
        argv += ["--endpoint", f"{HOST}:{port}"]
    epp = Child("epp", argv, logdir / f"epp-{n}.log")
    try:
        await sim.start("igw-sim: ready", timeout=60)
        await epp.start("igw: EPP ext_proc", timeout=60)
        await asyncio.sleep(opts.warmup_s)
        cpu0, t0 = cpu_seconds(epp.pid), time.perf_counter()
        await asyncio.sleep(opts.duration_s)
        cpu1, t1 = cpu_seconds(epp.pid), time.perf_counter()
    finally:
        await epp.stop()
        await sim.stop()
    if cpu0 is None or cpu1 is None:
        raise RuntimeError("the EPP exited during the measurement")
    wall = t1 - t0
    scrapes = n * wall / opts.interval_s
    return {
        "endpoints": n,
        "interval_s": opts.interval_s,
        "core_share": (cpu1 - cpu0) / wall,
        "cpu_us_per_scrape": 1e6 * (cpu1 - cpu0) / scrapes,
    }


async def run_scrape(opts: ScrapeOptions) -> list[dict[str, Any]]:
    with tempfile.TemporaryDirectory(prefix="igw-bench-scrape-") as tmp:
        return [await _one(n, opts, Path(tmp)) for n in opts.endpoints]


def format_table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| endpoints | scrape interval | EPP CPU (share of one core) | CPU per scrape |",
        "|---|---|---|---|",
    ]
    lines += [
        f"| {r['endpoints']} | {r['interval_s'] * 1000:.0f} ms | {100 * r['core_share']:.1f}% "
        f"| {r['cpu_us_per_scrape']:.0f} µs |"
        for r in rows
    ]
    return "\n".join(lines)
