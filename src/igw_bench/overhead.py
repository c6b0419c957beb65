"""``igw bench overhead``: what the Endpoint Picker costs on top of Envoy, measured side by side.

Two arms run at the same time in front of the same fast backend (two aiohttp servers in a child
process that answer a fixed chat completion and a tiny vLLM ``/metrics``):

* **A**: Envoy alone (its own minimal bootstrap: static pool, least request, no ext_proc);
* **B**: the full gateway, ``python -m igw run`` (Envoy + the EPP over ext_proc).

For each body size (1 KB and 200 KB OpenAI chat requests) the steps run interleaved (A then B at
a fixed concurrency, then A then B at concurrency 1) so that noise on a shared machine hits both
arms. A step is a closed loop of keep-alive HTTP/1.1 connections, bounded in time (warm-up plus
measured window) and in count; only responses completed inside the window are counted. CPU per
request comes from ``utime + stime`` in ``/proc/<pid>/stat`` of each process, sampled at the
window edges. Nothing here imports ``igw``: the gateway is a child process reached over loopback.

This module holds the options, the run and the report (JSON and a Markdown table); the pieces
live beside it: :mod:`igw_bench.backend` (the fake model server), :mod:`igw_bench.bodies`
(request bodies), :mod:`igw_bench.loadgen` (the load client and one step),
:mod:`igw_bench.sysstats` (CPU from ``/proc``), :mod:`igw_bench.envoy_alone` (arm A) and
:mod:`igw_bench.procs` (child processes and ports).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import platform
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import orjson

from igw_bench.backend import BACKEND_READY, CHAT_PATH
from igw_bench.bodies import chat_body
from igw_bench.client import RequestSpec, send
from igw_bench.envoy_alone import envoy_alone_bootstrap, envoy_path, envoy_version
from igw_bench.loadgen import STOP_GRACE_S, StepResult, run_step
from igw_bench.procs import HOST, Child, free_ports
from igw_bench.sysstats import child_pids, cpu_seconds

GATEWAY_READY = "igw: gateway ready"


# --------------------------------------------------------------------------------------------
# The whole benchmark


@dataclass(frozen=True, slots=True)
class SizeSpec:
    name: str
    label: str
    body_bytes: int
    concurrency: int


@dataclass(frozen=True, slots=True)
class OverheadOptions:
    duration_s: float = 8.0
    warmup_s: float = 2.0
    body_mode: str = "buffered"
    out_dir: Path = Path("benchmarks/results")
    concurrency_1k: int = 32
    concurrency_200k: int = 8
    max_requests: int = 1_000_000
    """Per step, a bound on requests sent (the step also ends after warm-up + duration)."""
    start_timeout_s: float = 60.0

    def sizes(self) -> list[SizeSpec]:
        return [
            SizeSpec("1k", "1 KB", 1024, self.concurrency_1k),
            SizeSpec("200k", "200 KB", 200 * 1024, self.concurrency_200k),
        ]


async def _preflight(port: int, body: bytes, arm: str) -> None:
    spec = RequestSpec(CHAT_PATH, orjson.loads(body))
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as http:
        for _ in range(3):
            result = await send(http, f"http://{HOST}:{port}", spec)
            if not result.ok:
                raise RuntimeError(f"arm {arm}: preflight request failed: {result.status} {result.error}")


async def envoy_stats(admin_port: int, contains: str) -> dict[str, int]:
    """Counters from an Envoy admin whose name contains ``contains`` (last name component -> value)."""
    out: dict[str, int] = {}
    with contextlib.suppress(aiohttp.ClientError, TimeoutError):
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=3)) as http,
            http.get(f"http://{HOST}:{admin_port}/stats", params={"filter": contains}) as resp,
        ):
            text = await resp.text()
        for line in text.splitlines():
            name, _, value = line.partition(": ")
            if value.strip().isdigit():
                out[name.rsplit(".", 1)[-1]] = out.get(name.rsplit(".", 1)[-1], 0) + int(value)
    return out


def _ratio(b: float, a: float) -> float:
    return b / a if a > 0 else float("nan")


async def run_overhead(opts: OverheadOptions, *, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Start the backend and both arms, run the interleaved steps, stop everything; the report."""
    sizes = opts.sizes()
    bodies = {s.name: chat_body(s.body_bytes) for s in sizes}
    step_budget = opts.warmup_s + opts.duration_s + STOP_GRACE_S
    lifetime = 4 * len(sizes) * step_budget + 3 * opts.start_timeout_s + 120
    envoy_bin = envoy_path()
    (a_port, a_admin, b_port, b_admin, grpc, grpc_health, metrics) = free_ports(7)
    started = datetime.now(UTC)
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="igw-bench-overhead-") as tmp:
        tmpdir = Path(tmp)
        backend = Child(
            "backend",
            [sys.executable, "-m", "igw_bench.backend", "--count", "2", "--max-seconds", f"{lifetime:.0f}"],
            tmpdir / "backend.log",
        )
        config = tmpdir / "envoy-a.json"
        envoy_a = Child(
            "envoy (arm A)",
            [envoy_bin, "-c", str(config), "--disable-hot-restart", "--concurrency", "1", "-l", "warning"],
            tmpdir / "envoy-a.log",
        )
        igw = Child("igw run (arm B)", [], tmpdir / "igw.log")
        envoy_b_pid: int | None = None
        try:
            line = await backend.start(lambda ln: ln.startswith(BACKEND_READY), timeout=opts.start_timeout_s)
            backends = line.removeprefix(BACKEND_READY).split()
            log(f"backend: {' '.join(backends)} (pid {backend.pid})")
            config.write_text(json.dumps(envoy_alone_bootstrap(a_port, a_admin, backends), indent=2))
            envoy_a.spawn()  # ready when its admin says so (below)
            igw.argv = [
                sys.executable, "-m", "igw", "run",
                *(arg for b in backends for arg in ("--endpoint", b)),
                "--listen", f"{HOST}:{b_port}", "--admin-port", str(b_admin),
                "--grpc-port", str(grpc), "--grpc-health-port", str(grpc_health), "--metrics-port", str(metrics),
                "--body-mode", opts.body_mode, "--fail-close",
            ]  # fmt: skip
            try:
                async with asyncio.TaskGroup() as group:
                    group.create_task(igw.start(GATEWAY_READY, timeout=opts.start_timeout_s))
                    group.create_task(
                        envoy_a.wait_http_ok(f"http://{HOST}:{a_admin}/ready", timeout=opts.start_timeout_s)
                    )
            except ExceptionGroup as group_error:
                raise group_error.exceptions[0] from None
            children = child_pids(igw.pid, "envoy")
            envoy_b_pid = children[0] if children else None
            log(f"arm A: Envoy alone on {HOST}:{a_port} (pid {envoy_a.pid})")
            log(f"arm B: igw run on {HOST}:{b_port} (EPP pid {igw.pid}, Envoy pid {envoy_b_pid}, {opts.body_mode})")
            for s in sizes:
                await _preflight(a_port, bodies[s.name], "A")
                await _preflight(b_port, bodies[s.name], "B")

            # The EPP's cost when idle (metrics scraping), for reading the per-request figures.
            cpu0 = cpu_seconds(igw.pid)
            t0 = time.perf_counter()
            await asyncio.sleep(min(2.0, max(0.5, opts.warmup_s)))
            cpu1 = cpu_seconds(igw.pid)
            idle_pct = (
                (cpu1 - cpu0) * 100 / (time.perf_counter() - t0) if cpu0 is not None and cpu1 is not None else None
            )

            pids_a = {"envoy": envoy_a.pid, "backend": backend.pid, "loadgen": os.getpid()}
            pids_b = {"epp": igw.pid, "backend": backend.pid, "loadgen": os.getpid()}
            if envoy_b_pid is not None:
                pids_b["envoy"] = envoy_b_pid
            steps: list[StepResult] = []
            for s in sizes:
                for concurrency in (s.concurrency, 1):
                    for arm, port, pids in (("A", a_port, pids_a), ("B", b_port, pids_b)):
                        result = await run_step(
                            arm=arm, size=s.name, port=port, body=bodies[s.name], concurrency=concurrency,
                            warmup_s=opts.warmup_s, duration_s=opts.duration_s, max_requests=opts.max_requests,
                            pids=pids,
                        )  # fmt: skip
                        steps.append(result)
                        log(
                            f"  {arm} {s.label:>6} c={concurrency:<3} {result.rps:8.0f} req/s  "
                            f"p50 {result.p50_ms:6.2f} ms  p99 {result.p99_ms:6.2f} ms  errors {result.errors}"
                        )
            ext_proc = await envoy_stats(b_admin, "ext_proc")
        finally:
            await igw.stop()
            await envoy_a.stop()
            await backend.stop()
            if envoy_b_pid is not None and cpu_seconds(envoy_b_pid) is not None:
                # igw stops its Envoy; only if igw had to be killed could it be left behind.
                with contextlib.suppress(OSError):
                    os.kill(envoy_b_pid, signal.SIGTERM)
    return _report(opts, sizes, steps, started, load_before, idle_pct, ext_proc, envoy_version(envoy_bin))


def _report(
    opts: OverheadOptions,
    sizes: list[SizeSpec],
    steps: list[StepResult],
    started: datetime,
    load_before: tuple[float, float, float],
    idle_pct: float | None,
    ext_proc: dict[str, int],
    envoy_release: str,
) -> dict[str, Any]:
    def find(arm: str, size: str, concurrency: int) -> StepResult:
        return next(r for r in steps if r.arm == arm and r.size == size and r.concurrency == concurrency)

    per_size: dict[str, Any] = {}
    for s in sizes:
        ta, tb = find("A", s.name, s.concurrency), find("B", s.name, s.concurrency)
        la, lb = find("A", s.name, 1), find("B", s.name, 1)
        per_size[s.name] = {
            "label": s.label,
            "body_bytes": s.body_bytes,
            "throughput": {
                "concurrency": s.concurrency,
                "A": asdict(ta),
                "B": asdict(tb),
                "ratio_b_over_a": _ratio(tb.rps, ta.rps),
            },
            "latency_c1": {
                "A": asdict(la),
                "B": asdict(lb),
                "added_p50_ms": lb.p50_ms - la.p50_ms,
                "added_p99_ms": lb.p99_ms - la.p99_ms,
                "added_mean_ms": lb.mean_ms - la.mean_ms,
            },
            "epp_cpu_us_per_req": {
                "throughput": tb.cpu_us_per_req.get("epp"),
                "c1": lb.cpu_us_per_req.get("epp"),
            },
        }
    warnings = []
    if ext_proc.get("failure_mode_allowed", 0) or ext_proc.get("streams_failed", 0):
        warnings.append(
            f"arm B: Envoy's ext_proc counted {ext_proc.get('streams_failed', 0)} failed streams and "
            f"{ext_proc.get('failure_mode_allowed', 0)} fail-open requests (those skipped the EPP)"
        )
    b_issued = sum(r.issued for r in steps if r.arm == "B")
    if ext_proc and ext_proc.get("streams_started", 0) < b_issued:
        warnings.append(f"arm B: {ext_proc.get('streams_started', 0)} ext_proc streams for {b_issued} requests")
    warnings.extend(
        f"{r.arm} {r.size} c={r.concurrency}: {r.errors} errors {r.statuses} {r.error_samples}"
        for r in steps
        if r.errors
    )
    return {
        "benchmark": "overhead",
        "started": started.isoformat(timespec="seconds"),
        "finished": datetime.now(UTC).isoformat(timespec="seconds"),
        "options": {
            "duration_s": opts.duration_s,
            "warmup_s": opts.warmup_s,
            "body_mode": opts.body_mode,
            "max_requests_per_step": opts.max_requests,
            "concurrency": {s.name: s.concurrency for s in sizes},
        },
        "arms": {
            "A": "Envoy alone (static pool, least request, no ext_proc)",
            "B": f"igw run --body-mode {opts.body_mode} --fail-close: Envoy + EPP over ext_proc",
        },
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "envoy": envoy_release,
            "loadavg_before": list(load_before),
            "loadavg_after": list(os.getloadavg()),
        },
        "load_generator": "closed loop, raw HTTP/1.1 keep-alive over asyncio (uvloop), non-streaming",
        "epp_idle_cpu_pct": idle_pct,
        "ext_proc_stats_b": ext_proc,
        "sizes": per_size,
        "steps": [asdict(r) for r in steps],
        "warnings": warnings,
    }


# --------------------------------------------------------------------------------------------
# Output


def _f(value: float | None, fmt: str = ".2f", sign: bool = False) -> str:
    if value is None or value != value:  # None or NaN
        return "-"
    return format(value, ("+" if sign else "") + fmt)


def format_table(report: dict[str, Any]) -> str:
    opts = report["options"]
    lines = [
        f"igw bench overhead — A: Envoy alone, B: Envoy + igw EPP (ext_proc {opts['body_mode']}); "
        f"{opts['duration_s']:g} s per step after {opts['warmup_s']:g} s warm-up; "
        f"{report['machine']['cpus']} CPUs, Envoy {report['machine']['envoy']}",
        "",
        "| body | c | A req/s | B req/s | B/A | c=1 p50 A / B ms | c=1 p99 A / B ms | added p50 / p99 ms "
        "| EPP CPU µs/req (c / c=1) | Envoy CPU µs/req A / B |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for size in report["sizes"].values():
        tp, lat, cpu = size["throughput"], size["latency_c1"], size["epp_cpu_us_per_req"]
        ta, tb, la, lb = tp["A"], tp["B"], lat["A"], lat["B"]
        lines.append(
            f"| {size['label']} ({size['body_bytes']:,} B) | {tp['concurrency']} | {ta['rps']:,.0f} | {tb['rps']:,.0f} "
            f"| {_f(tp['ratio_b_over_a'])}x | {_f(la['p50_ms'])} / {_f(lb['p50_ms'])} "
            f"| {_f(la['p99_ms'])} / {_f(lb['p99_ms'])} "
            f"| {_f(lat['added_p50_ms'], sign=True)} / {_f(lat['added_p99_ms'], sign=True)} "
            f"| {_f(cpu['throughput'], '.0f')} / {_f(cpu['c1'], '.0f')} "
            f"| {_f(ta['cpu_us_per_req'].get('envoy'), '.0f')} / {_f(tb['cpu_us_per_req'].get('envoy'), '.0f')} |"
        )
    lines.append("")
    idle = report.get("epp_idle_cpu_pct")
    lines.append(
        f"EPP idle (metrics scraping): {_f(idle, '.1f')}% of a core. Load generator CPU at c: "
        + ", ".join(
            f"{name} A {_f(s['throughput']['A']['cpu_pct'].get('loadgen'), '.0f')}% / "
            f"B {_f(s['throughput']['B']['cpu_pct'].get('loadgen'), '.0f')}%"
            for name, s in report["sizes"].items()
        )
        + "."
    )
    lines.extend(f"warning: {warning}" for warning in report["warnings"])
    return "\n".join(lines)


def write_report(report: dict[str, Any], out_dir: Path) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    path = out_dir / f"overhead-{stamp}.json"
    n = 1
    while path.exists():
        n += 1
        path = out_dir / f"overhead-{stamp}-{n}.json"
    path.write_bytes(orjson.dumps(report, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS))
    return path
