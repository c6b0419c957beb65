"""``igw bench compare``: arms side by side on one workload, a ladder of request rates each.

For every arm in turn: a fresh fleet (the same spec and seeds for all arms, so none inherits another's
cache), the arm in front of it, a warm-up that is not measured, then one step per rate. A step is an
open-loop Poisson workload (:mod:`igw_bench.openloop`) of ``step_s`` simulated seconds; the servers'
counters are read before and after it. An arm whose TTFT p90 passes ``saturated_ttft_s`` (or that fails
more than ``saturated_failures`` of its requests) is saturated: its higher steps are skipped, since
they could only be worse.

Times are simulated seconds: with the fleet's time dilation ``D`` every real duration the client
measures is divided by ``D`` and every rate multiplied by it (the gateway's own latency is divided too,
which the report states). The result is a plain dict (JSON), rendered by :mod:`igw_bench.report`.
"""

from __future__ import annotations

import asyncio
import os
import platform
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp

from igw_bench.arms import ArmSpec, RunningArm, start_arm
from igw_bench.client import percentile
from igw_bench.fleet import (
    Counters,
    FleetSpec,
    SimFleetSpec,
    counter_delta,
    reset_prefix_caches,
    scrape_counters,
    start_fleet,
)
from igw_bench.ipload import run_ip_step, shared_prefix_shape
from igw_bench.openloop import Sent, run_open_loop
from igw_bench.procs import Child
from igw_bench.sysstats import cpu_seconds, descendants, rss_bytes
from igw_bench.textgen import HttpRequest, render_workload
from igw_sim.replay.workloads import build_workload, parse_spec

__all__ = ["CompareOptions", "run_compare", "step_stats"]


@dataclass(frozen=True, slots=True)
class CompareOptions:
    workload: str
    """A generator spec without rate and duration, e.g. ``w1:fill=0.73`` (igw_sim.replay.workloads)."""
    arms: tuple[ArmSpec, ...]
    qps: tuple[float, ...]
    step_s: float = 20.0
    """Simulated seconds of arrivals per step."""
    warmup_s: float = 10.0
    warmup_qps: float = 0.0
    """Rate of the unmeasured warm-up (0: the ladder's middle rate)."""
    fleet: FleetSpec = field(default_factory=SimFleetSpec)
    seed: int = 1
    saturated_ttft_s: float = 30.0
    saturated_failures: float = 0.1
    """An arm that fails (or does not finish within the drain time) more than this share of a step's
    requests is saturated too: its latency percentiles cover only the requests that made it."""
    drain_factor: float = 1.0
    """After a step's last arrival, running requests get ``drain_factor * step_s`` simulated seconds."""
    out_dir: Path = Path("benchmarks/results")
    load: str = "builtin"
    """``builtin`` (:mod:`igw_bench.openloop`) or ``inference-perf`` (:mod:`igw_bench.ipload`, W1/W4)."""


def _workload_spec(base: str, qps: float, duration: float, seed: int) -> str:
    name, params = parse_spec(base)
    for key in ("qps", "duration", "requests", "seed"):
        if key in params:
            raise ValueError(f"workload {base!r}: {key} is set by the bench (use --qps, --step-s, --seed)")
    extra = ",".join(f"{k}={v!r}" for k, v in params.items())
    return f"{name}:{extra + ',' if extra else ''}qps={qps!r},duration={duration!r},seed={seed}"


def build_step(opts: CompareOptions, qps: float, duration: float, seed: int, tag: str) -> list[HttpRequest]:
    """The requests of one step (the same for every arm)."""
    spec = _workload_spec(opts.workload, qps, duration, seed)
    workload = build_workload(spec, cluster_kv_tokens=opts.fleet.kv_tokens)
    return render_workload(workload, opts.fleet.model, tag=tag)


def describe_workload(opts: CompareOptions) -> str:
    spec = _workload_spec(opts.workload, opts.qps[0], opts.step_s, opts.seed)
    text = build_workload(spec, cluster_kv_tokens=opts.fleet.kv_tokens).description.rsplit(";", 1)[0]
    if isinstance(opts.fleet, SimFleetSpec) and opts.fleet.tokenizer is not None:
        # the generator's lengths are words of text; a real tokenizer makes more tokens of each
        text += " (lengths and KV share counted in words: the servers' tokenizer makes more tokens of each)"
    return text


def server_stats(servers: dict[str, Counters]) -> dict[str, Any]:
    """What the servers' counters say about a step: hit rate, preemptions, each endpoint's share."""
    requests = {e: c.get("requests", 0.0) for e, c in servers.items()}
    total = sum(requests.values())
    queries = sum(c.get("queries", 0.0) for c in servers.values())
    hits = sum(c.get("hits", 0.0) for c in servers.values())
    share = {e: (n / total if total else 0.0) for e, n in sorted(requests.items())}
    return {
        "hit_rate_server": hits / queries if queries else 0.0,
        "preemptions": sum(c.get("preemptions", 0.0) for c in servers.values()),
        "endpoint_share": share,
        "hotspot": len(share) * max(share.values()) if share and total else float("nan"),
    }


def gateway_stats(cpu_s: float | None, rss: int | None, ok: int, real_span_s: float) -> dict[str, Any]:
    """The gateway's CPU (cores busy, ms per successful request) and resident memory over a step."""
    return {
        "gateway_cpu_cores": (cpu_s / real_span_s) if cpu_s is not None and real_span_s > 0 else None,
        "gateway_cpu_ms_per_request": (cpu_s * 1000 / ok) if cpu_s is not None and ok else None,
        "gateway_rss_mib": rss / 2**20 if rss is not None else None,
    }


def step_stats(
    sent: list[Sent], servers: dict[str, Counters], *, dilation: float, cpu_s: float | None, rss: int | None
) -> dict[str, Any]:
    """A step's figures in simulated time (see the module docstring)."""
    ok = [s for s in sent if s.result.ok]
    ttft = [s.result.ttft_s / dilation for s in ok if s.result.ttft_s is not None]
    e2e = [s.result.e2e_s / dilation for s in ok]
    itl = [
        (s.result.e2e_s - s.result.ttft_s) / (s.result.output_tokens - 1) / dilation
        for s in ok
        if s.result.ttft_s is not None and s.result.output_tokens > 1
    ]
    end = max((s.sent_at + s.result.e2e_s for s in sent), default=0.0)
    span = end / dilation if end > 0 else float("nan")
    tokens = sum(s.result.output_tokens for s in ok)
    prompt = sum(s.result.prompt_tokens for s in ok)
    cached = sum(s.result.cached_tokens for s in ok)
    errors: dict[str, int] = {}
    for s in sent:
        if not s.result.ok:
            key = f"{s.result.status} {(s.result.error or '')[:60]}".strip()
            errors[key] = errors.get(key, 0) + 1
    return {
        "requests": len(sent),
        "ok": len(ok),
        "failed": len(sent) - len(ok),
        "errors": errors,
        "span_s": span,
        "output_tokens_per_s": tokens / span if span > 0 else 0.0,
        "requests_per_s": len(ok) / span if span > 0 else 0.0,
        "ttft_s": {"p50": percentile(ttft, 50), "p90": percentile(ttft, 90), "p99": percentile(ttft, 99)},
        "itl_s": {"p50": percentile(itl, 50), "p90": percentile(itl, 90)},
        "e2e_s": {"p50": percentile(e2e, 50), "p90": percentile(e2e, 90), "p99": percentile(e2e, 99)},
        "hit_rate_usage": cached / prompt if prompt else 0.0,
        **server_stats(servers),
        **gateway_stats(cpu_s, rss, len(ok), end),
    }


def _gateway_pids(arm: RunningArm) -> list[int]:
    pids: list[int] = []
    for pid in arm.pids.values():
        pids.extend(p for p in descendants(pid) if p not in pids)
    return pids


def _cpu(pids: list[int]) -> float:
    return sum(cpu_seconds(p) or 0.0 for p in pids)


def _rss(pids: list[int]) -> int:
    return sum(rss_bytes(p) or 0 for p in pids)


async def _run_arm(
    opts: CompareOptions, spec: ArmSpec, workdir: Path, steps: list[tuple[float, list[HttpRequest]]],
    warmup: list[HttpRequest], log: Callable[[str], None], shared: list[str] | None,
) -> dict[str, Any]:  # fmt: skip
    """One arm through the ladder, on a fresh fleet (or on ``shared`` endpoints, their caches reset)."""
    d = opts.fleet.time_dilation
    fleet: Child | None = None
    arm: RunningArm | None = None
    result: dict[str, Any] = {"arm": spec.name, "describe": spec.describe(), "steps": []}
    try:
        if shared is None:
            fleet, endpoints = await start_fleet(opts.fleet, workdir / f"fleet-{_slug(spec.name)}.log")
        else:
            endpoints = shared
            await reset_prefix_caches(endpoints)
        arm = await start_arm(spec, endpoints, workdir, dilation=d, model=opts.fleet.model)
        result["version"] = arm.version
        pids = _gateway_pids(arm)
        log(f"{spec.name}: up at {arm.base_url} (gateway pids {pids}); warm-up {len(warmup)} requests")
        warm = await run_open_loop(arm.base_url, warmup, dilation=d, drain_s=opts.warmup_s * d)
        bad = sum(1 for s in warm if not s.result.ok)
        if bad == len(warm) and warm:
            raise RuntimeError(f"{spec.name}: every warm-up request failed, e.g. {warm[0].result.error}")
        saturated_at: float | None = None
        for i, (qps, requests) in enumerate(steps):
            if saturated_at is not None:
                result["steps"].append({"qps": qps, "skipped": f"saturated at {saturated_at:g} QPS"})
                continue
            before = await scrape_counters(endpoints)
            cpu0 = _cpu(pids)
            t0 = time.perf_counter()
            if opts.load == "inference-perf":
                stats = await run_ip_step(
                    base_url=arm.base_url, model=opts.fleet.model, qps=qps, step_s=opts.step_s, dilation=d,
                    data=shared_prefix_shape(opts.workload, opts.fleet.kv_tokens), seed=opts.seed + i,
                    workdir=workdir / f"ip-{_slug(spec.name)}-{i}", log=log,
                )  # fmt: skip
                cpu = _cpu(pids) - cpu0
                after = await scrape_counters(endpoints)
                stats |= server_stats(counter_delta(before, after))
                stats |= gateway_stats(cpu, _rss(pids), stats["ok"], time.perf_counter() - t0)
            else:
                drain = opts.drain_factor * opts.step_s * d
                sent = await run_open_loop(arm.base_url, requests, dilation=d, drain_s=drain)
                cpu = _cpu(pids) - cpu0
                after = await scrape_counters(endpoints)
                stats = step_stats(sent, counter_delta(before, after), dilation=d, cpu_s=cpu, rss=_rss(pids))
            stats["qps"] = qps
            stats["wall_s"] = time.perf_counter() - t0
            result["steps"].append(stats)
            log(
                f"{spec.name} @ {qps:g} QPS: {stats['ok']}/{stats['requests']} ok, "
                f"{stats['output_tokens_per_s']:,.0f} out tok/s, TTFT p90 {stats['ttft_s']['p90']:.3f} s, "
                f"hit {stats['hit_rate_server']:.1%}, hotspot {stats['hotspot']:.2f} ({stats['wall_s']:.0f} s)"
            )
            p90 = stats["ttft_s"]["p90"]
            if stats["failed"] > opts.saturated_failures * stats["requests"] or not p90 <= opts.saturated_ttft_s:
                saturated_at = qps
    finally:
        if arm is not None:
            await arm.stop()
        if fleet is not None:
            await fleet.stop(timeout=40.0)
    return result


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "-" for c in name)


async def run_compare(
    opts: CompareOptions,
    *,
    log: Callable[[str], None] = print,
    on_arm: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Run every arm through the ladder; the report (see :mod:`igw_bench.report`).

    ``on_arm`` gets the report so far after each arm (a long run that is stopped keeps what it did).
    """
    started = datetime.now(UTC)
    warm_qps = opts.warmup_qps or sorted(opts.qps)[len(opts.qps) // 2]
    warmup = build_step(opts, warm_qps, opts.warmup_s, opts.seed + 10_000, "warmup")
    steps = [(q, build_step(opts, q, opts.step_s, opts.seed + i, f"step{i}")) for i, q in enumerate(opts.qps)]
    workdir = opts.out_dir / "logs" / started.strftime("compare-%Y%m%dT%H%M%SZ")
    await asyncio.to_thread(workdir.mkdir, parents=True, exist_ok=True)
    arms: list[dict[str, Any]] = []
    shared_fleet: Child | None = None
    shared: list[str] | None = None
    try:
        if not opts.fleet.fresh_per_arm:
            log(f"starting {opts.fleet.servers} {opts.fleet.describe()['kind']} (shared by the arms)")
            shared_fleet, shared = await start_fleet(opts.fleet, workdir / "fleet.log")
        for spec in opts.arms:
            try:
                arms.append(await _run_arm(opts, spec, workdir, steps, warmup, log, shared))
            except (RuntimeError, TimeoutError, OSError, aiohttp.ClientError) as exc:
                log(f"{spec.name}: failed: {exc}")
                arms.append({"arm": spec.name, "describe": spec.describe(), "error": str(exc), "steps": []})
            if on_arm is not None:
                on_arm(_report(opts, started, warm_qps, workdir, arms))
    finally:
        if shared_fleet is not None:
            await shared_fleet.stop(timeout=40.0)
    return _report(opts, started, warm_qps, workdir, arms)


def _report(
    opts: CompareOptions, started: datetime, warm_qps: float, workdir: Path, arms: list[dict[str, Any]]
) -> dict[str, Any]:
    return {
        "benchmark": "igw bench compare",
        "started": started.isoformat(timespec="seconds"),
        "finished": datetime.now(UTC).isoformat(timespec="seconds"),
        "workload": {
            "spec": opts.workload,
            "description": describe_workload(opts),
            "qps": list(opts.qps),
            "step_s": opts.step_s,
            "warmup_s": opts.warmup_s,
            "warmup_qps": warm_qps,
            "seed": opts.seed,
            "load": opts.load,
        },
        "fleet": opts.fleet.describe(),
        "options": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(opts).items() if k != "arms"},
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "load_avg": os.getloadavg()},
        "logs": str(workdir),
        "arms": arms,
    }
