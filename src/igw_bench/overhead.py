"""``igw bench overhead``: what the Endpoint Picker costs on top of Envoy, and next to the Rust
routers, measured side by side.

Every arm runs at the same time in front of the same fast backend (two aiohttp servers in one
child process that answer a fixed chat completion and a tiny vLLM ``/metrics``):

* ``direct``: no router, the load generator talks to the first backend server (both servers live
  in the same process, so the backend's work per request is the same as behind a router);
* ``envoy``: Envoy alone (its own minimal bootstrap: static pool, least request, no ext_proc);
* ``igw``: the full gateway, ``python -m igw run`` (Envoy + the EPP over ext_proc);
* ``sglang-router`` and ``vllm-router`` (optional, :mod:`igw_bench.peers`): each peer with policy
  ``round_robin``, its pure routing cost: no prefix tree, no tokenization, no load polling.

For each body size (1 KB and 200 KB OpenAI chat requests) the steps run interleaved (every arm
at a fixed concurrency, then every arm at concurrency 1) so that noise on a shared machine hits
all the arms alike. A step is a closed loop of keep-alive HTTP/1.1 connections, bounded in time
(warm-up plus measured window) and in count; only responses completed inside the window are
counted. CPU per request comes from ``utime + stime`` in ``/proc/<pid>/stat`` of each process,
sampled at the window edges; "router CPU" adds up the processes of the arm's router (Envoy and
the EPP for igw). igw's added latency is given against every other arm, and every arm's against
``direct``. Nothing here imports ``igw``: the gateway is a child process reached over loopback.

This module holds the options, the run and the report (JSON and a Markdown table); the pieces
live beside it: :mod:`igw_bench.backend` (the fake model server), :mod:`igw_bench.bodies`
(request bodies), :mod:`igw_bench.loadgen` (the load client and one step),
:mod:`igw_bench.sysstats` (CPU from ``/proc``), :mod:`igw_bench.envoy_alone` (the Envoy arm),
:mod:`igw_bench.peers` (the peer routers) and :mod:`igw_bench.procs` (child processes and ports).
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
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

import aiohttp
import orjson

from igw_bench import peers
from igw_bench.backend import BACKEND_READY, CHAT_PATH
from igw_bench.bodies import chat_body
from igw_bench.client import RequestSpec, send
from igw_bench.envoy_alone import envoy_alone_bootstrap, envoy_path, envoy_version
from igw_bench.loadgen import STOP_GRACE_S, StepResult, run_step
from igw_bench.procs import HOST, Child, free_ports
from igw_bench.sysstats import child_pids, cpu_seconds

GATEWAY_READY = "igw: gateway ready"
REPORT_FORMAT = 2
"""Version of the JSON report: 2 keys the arms by name (1 had arms ``A`` and ``B`` only)."""

REFERENCE = "igw"
"""The arm whose added latency the report gives against every other arm."""
DIRECT = "direct"
PEER_KINDS: tuple[str, ...] = ("sglang-router", "vllm-router")
PEER_POLICY = "round_robin"
"""The peers' policy here: their cheapest, so the arm measures what routing itself costs them."""


# --------------------------------------------------------------------------------------------
# Options


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
    peers: tuple[str, ...] = PEER_KINDS
    """Peer routers run as extra arms (each with :data:`PEER_POLICY`), installed on first use."""
    peers_required: bool = False
    """False: a peer that cannot be installed or started is left out with a warning (the default
    set); True: that fails the run (peers named on the command line)."""

    def sizes(self) -> list[SizeSpec]:
        return [
            SizeSpec("1k", "1 KB", 1024, self.concurrency_1k),
            SizeSpec("200k", "200 KB", 200 * 1024, self.concurrency_200k),
        ]


def parse_peers(text: str) -> tuple[str, ...]:
    """``--peers``: ``none`` or comma-separated peer kinds (duplicates dropped, order kept)."""
    if text.strip().lower() == "none":
        return ()
    names = tuple(dict.fromkeys(name.strip() for name in text.split(",") if name.strip()))
    unknown = [name for name in names if name not in PEER_KINDS]
    if unknown or not names:
        raise ValueError(f"--peers: expected none or some of {', '.join(PEER_KINDS)}, got {text!r}")
    return names


def concurrencies(size: SizeSpec) -> tuple[int, ...]:
    """The steps of one size: its throughput concurrency, then 1 (once if they are equal)."""
    return tuple(dict.fromkeys((size.concurrency, 1)))


# --------------------------------------------------------------------------------------------
# Arms


@dataclass(slots=True)
class Arm:
    """One way to reach the backend: where the load goes, and which processes are the router."""

    name: str
    description: str
    port: int
    router: dict[str, int] = field(default_factory=dict)
    """The router's own processes (name -> pid), whose CPU is the arm's "router CPU"."""
    version: str | None = None

    def pids(self, backend: int) -> dict[str, int]:
        """Every process whose CPU a step samples."""
        return {**self.router, "backend": backend, "loadgen": os.getpid()}


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


async def _install_peers(opts: OverheadOptions, warnings: list[str], log: Callable[[str], None]) -> list[str]:
    """The peers whose environments are ready (installed here if needed, before any timing)."""
    ready: list[str] = []
    for kind in opts.peers:
        try:
            await asyncio.to_thread(peers.ensure, kind, log)
        except (RuntimeError, TimeoutError, OSError, ValueError) as exc:
            if opts.peers_required:
                raise RuntimeError(f"{kind}: cannot install: {exc}") from exc
            warnings.append(f"{kind}: left out, it could not be installed: {str(exc).splitlines()[0]}")
            log(f"warning: {warnings[-1]}")
            continue
        ready.append(kind)
    return ready


# --------------------------------------------------------------------------------------------
# The whole benchmark


async def run_overhead(opts: OverheadOptions, *, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Start the backend and every arm, run the interleaved steps, stop everything; the report."""
    sizes = opts.sizes()
    bodies = {s.name: chat_body(s.body_bytes) for s in sizes}
    warnings: list[str] = []
    kinds = await _install_peers(opts, warnings, log)
    n_steps = (3 + len(kinds)) * sum(len(concurrencies(s)) for s in sizes)
    lifetime = n_steps * (opts.warmup_s + opts.duration_s + STOP_GRACE_S) + (3 + len(kinds)) * opts.start_timeout_s
    envoy_bin = envoy_path()
    envoy_release = envoy_version(envoy_bin)
    (a_port, a_admin, b_port, b_admin, grpc, grpc_health, metrics) = free_ports(7)
    started = datetime.now(UTC)
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="igw-bench-overhead-") as tmp:
        tmpdir = Path(tmp)
        backend = Child(
            "backend",
            [sys.executable, "-m", "igw_bench.backend", "--count", "2", "--max-seconds", f"{lifetime + 120:.0f}"],
            tmpdir / "backend.log",
        )
        config = tmpdir / "envoy-a.json"
        envoy_a = Child(
            "envoy (arm envoy)",
            [envoy_bin, "-c", str(config), "--disable-hot-restart", "--concurrency", "1", "-l", "warning"],
            tmpdir / "envoy-a.log",
        )
        igw = Child("igw run (arm igw)", [], tmpdir / "igw.log")
        peer_children: list[Child] = []
        peer_arms: dict[str, Arm] = {}
        envoy_b_pid: int | None = None

        async def add_peer(kind: str, backends: Sequence[str]) -> None:
            peer = peers.Peer(cast(peers.PeerKind, kind), PEER_POLICY)
            try:
                process = await peers.start_peer(peer, backends, tmpdir, log=log, timeout=opts.start_timeout_s)
            except (RuntimeError, TimeoutError, OSError, ValueError) as exc:
                if opts.peers_required:
                    raise
                warnings.append(f"{kind}: left out, it did not start: {str(exc).splitlines()[0]}")
                log(f"warning: {warnings[-1]}")
                return
            peer_children.append(process.child)
            version = f"{kind} {peer.version}"
            peer_arms[kind] = Arm(
                kind,
                f"{version}, --policy {PEER_POLICY} (its pure routing cost), its default threads",
                int(process.base_url.rsplit(":", 1)[1]),
                {"router": process.child.pid},
                version,
            )

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
                    for kind in kinds:
                        group.create_task(add_peer(kind, backends))
            except ExceptionGroup as group_error:
                raise group_error.exceptions[0] from None
            children = child_pids(igw.pid, "envoy")
            envoy_b_pid = children[0] if children else None
            igw_router = {"epp": igw.pid} | ({"envoy": envoy_b_pid} if envoy_b_pid is not None else {})
            direct_port = int(backends[0].rsplit(":", 1)[1])
            arms = [
                Arm(DIRECT, "no router: the load generator talks to the first backend server", direct_port),
                Arm("envoy", "Envoy alone (static pool, least request, no ext_proc, 1 worker thread)", a_port,
                    {"envoy": envoy_a.pid}, f"envoy {envoy_release}"),
                Arm(REFERENCE, f"igw run --body-mode {opts.body_mode} --fail-close: Envoy (1 worker thread) "
                    "+ EPP over ext_proc", b_port, igw_router),
                *(peer_arms[kind] for kind in kinds if kind in peer_arms),
            ]  # fmt: skip
            for arm in arms:
                log(f"arm {arm.name}: {HOST}:{arm.port} {arm.router or ''}")
                for s in sizes:
                    await _preflight(arm.port, bodies[s.name], arm.name)

            # The EPP's cost when idle (metrics scraping), for reading the per-request figures.
            cpu0 = cpu_seconds(igw.pid)
            t0 = time.perf_counter()
            await asyncio.sleep(min(2.0, max(0.5, opts.warmup_s)))
            cpu1 = cpu_seconds(igw.pid)
            idle_pct = (
                (cpu1 - cpu0) * 100 / (time.perf_counter() - t0) if cpu0 is not None and cpu1 is not None else None
            )

            steps: list[StepResult] = []
            for s in sizes:
                for concurrency in concurrencies(s):
                    for arm in arms:
                        result = await run_step(
                            arm=arm.name, size=s.name, port=arm.port, body=bodies[s.name], concurrency=concurrency,
                            warmup_s=opts.warmup_s, duration_s=opts.duration_s, max_requests=opts.max_requests,
                            pids=arm.pids(backend.pid),
                        )  # fmt: skip
                        steps.append(result)
                        log(
                            f"  {arm.name:<13} {s.label:>6} c={concurrency:<3} {result.rps:8.0f} req/s  "
                            f"p50 {result.p50_ms:6.2f} ms  p99 {result.p99_ms:6.2f} ms  errors {result.errors}"
                        )
            ext_proc = await envoy_stats(b_admin, "ext_proc")
        finally:
            for child in peer_children:
                await child.stop()
            await igw.stop()
            await envoy_a.stop()
            await backend.stop()
            if envoy_b_pid is not None and cpu_seconds(envoy_b_pid) is not None:
                # igw stops its Envoy; only if igw had to be killed could it be left behind.
                with contextlib.suppress(OSError):
                    os.kill(envoy_b_pid, signal.SIGTERM)
    machine = {
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "envoy": envoy_release,
        "loadavg_before": list(load_before),
        "loadavg_after": list(os.getloadavg()),
    }
    report = build_report(opts, sizes, arms, steps, ext_proc, warnings)
    report.update(started=started.isoformat(timespec="seconds"), machine=machine, epp_idle_cpu_pct=idle_pct)
    return report


# --------------------------------------------------------------------------------------------
# The report


def _ratio(b: float, a: float) -> float:
    return b / a if a > 0 else float("nan")


def _router_cpu(step: StepResult, router: Sequence[str]) -> float | None:
    """CPU µs per request of the router's processes together (None without a router or a sample)."""
    values = [step.cpu_us_per_req.get(name) for name in router]
    if not values or any(v is None for v in values):
        return None
    return sum(v for v in values if v is not None)


def _summary(step: StepResult, router: Sequence[str]) -> dict[str, Any]:
    return {
        "rps": step.rps,
        "p50_ms": step.p50_ms,
        "p99_ms": step.p99_ms,
        "mean_ms": step.mean_ms,
        "ok": step.ok,
        "errors": step.errors,
        "router_cpu_us_per_req": _router_cpu(step, router),
        "cpu_us_per_req": step.cpu_us_per_req,
        "cpu_pct": step.cpu_pct,
    }


def _added(step: StepResult, base: StepResult) -> dict[str, float]:
    return {
        "p50_ms": step.p50_ms - base.p50_ms,
        "p99_ms": step.p99_ms - base.p99_ms,
        "mean_ms": step.mean_ms - base.mean_ms,
    }


def build_report(
    opts: OverheadOptions,
    sizes: Sequence[SizeSpec],
    arms: Sequence[Arm],
    steps: Sequence[StepResult],
    ext_proc: dict[str, int],
    warnings: Sequence[str] = (),
) -> dict[str, Any]:
    """The JSON report from the step results (``started``, ``machine`` and the EPP's idle CPU are
    added by the caller)."""
    by_key = {(r.arm, r.size, r.concurrency): r for r in steps}
    names = [arm.name for arm in arms]
    per_size: dict[str, Any] = {}
    for s in sizes:
        per_concurrency: dict[str, Any] = {}
        for c in concurrencies(s):
            got = {arm.name: by_key[arm.name, s.name, c] for arm in arms if (arm.name, s.name, c) in by_key}
            ref, direct = got.get(REFERENCE), got.get(DIRECT)
            per_concurrency[str(c)] = {
                "arms": {arm.name: _summary(got[arm.name], list(arm.router)) for arm in arms if arm.name in got},
                f"{REFERENCE}_added_ms": {
                    name: _added(ref, step) for name, step in got.items() if ref is not None and name != REFERENCE
                },
                f"{REFERENCE}_rps_ratio": {
                    name: _ratio(ref.rps, step.rps) for name, step in got.items() if ref is not None and name != REFERENCE
                },
                "added_over_direct_ms": {
                    name: _added(step, direct) for name, step in got.items() if direct is not None and name != DIRECT
                },
            }  # fmt: skip
        per_size[s.name] = {"label": s.label, "body_bytes": s.body_bytes, "by_concurrency": per_concurrency}
    all_warnings = list(warnings)
    if ext_proc.get("failure_mode_allowed", 0) or ext_proc.get("streams_failed", 0):
        all_warnings.append(
            f"igw: Envoy's ext_proc counted {ext_proc.get('streams_failed', 0)} failed streams and "
            f"{ext_proc.get('failure_mode_allowed', 0)} fail-open requests (those skipped the EPP)"
        )
    issued = sum(r.issued for r in steps if r.arm == REFERENCE)
    if ext_proc and ext_proc.get("streams_started", 0) < issued:
        all_warnings.append(f"igw: {ext_proc.get('streams_started', 0)} ext_proc streams for {issued} requests")
    all_warnings.extend(
        f"{r.arm} {r.size} c={r.concurrency}: {r.errors} errors {r.statuses} {r.error_samples}"
        for r in steps
        if r.errors
    )
    return {
        "benchmark": "overhead",
        "format": REPORT_FORMAT,
        "finished": datetime.now(UTC).isoformat(timespec="seconds"),
        "options": {
            "duration_s": opts.duration_s,
            "warmup_s": opts.warmup_s,
            "body_mode": opts.body_mode,
            "max_requests_per_step": opts.max_requests,
            "concurrency": {s.name: s.concurrency for s in sizes},
            "peers": list(opts.peers),
            "peer_policy": PEER_POLICY,
        },
        "reference_arm": REFERENCE,
        "arm_order": names,
        "arms": {
            arm.name: {"description": arm.description, "router_processes": list(arm.router), "version": arm.version}
            for arm in arms
        },
        "load_generator": "closed loop, raw HTTP/1.1 keep-alive over asyncio (uvloop), non-streaming",
        "ext_proc_stats_igw": ext_proc,
        "sizes": per_size,
        "steps": [asdict(r) for r in steps],
        "warnings": all_warnings,
    }


# --------------------------------------------------------------------------------------------
# Output


def _f(value: float | None, fmt: str = ".2f", sign: bool = False) -> str:
    if value is None or value != value:  # None or NaN
        return "-"
    return format(value, ("+" if sign else "") + fmt)


def _pair(added: dict[str, float] | None) -> str:
    if added is None:
        return "-"
    return f"{_f(added['p50_ms'], sign=True)} / {_f(added['p99_ms'], sign=True)}"


def _cpu_cell(summary: dict[str, Any]) -> str:
    total = summary["router_cpu_us_per_req"]
    per = summary["cpu_us_per_req"]
    if "epp" in per and total is not None:  # igw: show the EPP's share
        return f"{total:,.0f} (EPP {_f(per['epp'], ',.0f')})"
    return _f(total, ",.0f")


_Row = tuple[str, str, dict[str, Any], dict[str, Any]]


def _rows(report: dict[str, Any], size: dict[str, Any]) -> list[_Row]:
    """``(concurrency, arm, arm summary, step)`` in run order (a report read back from JSON has its
    keys sorted)."""
    order = report["arm_order"]
    rows: list[_Row] = []
    for c in sorted(size["by_concurrency"], key=int, reverse=True):
        step = size["by_concurrency"][c]
        rows.extend((c, name, step["arms"][name], step) for name in order if name in step["arms"])
    return rows


def format_table(report: dict[str, Any]) -> str:
    """The Markdown table of a report, with the arms described above it and notes below."""
    opts, machine = report["options"], report["machine"]
    ref = report["reference_arm"]
    load = machine["loadavg_before"][0], machine["loadavg_after"][0]
    lines = [
        f"igw bench overhead: {opts['duration_s']:g} s per step after {opts['warmup_s']:g} s warm-up, every arm "
        f"in turn per step; {machine['cpus']} CPUs, Envoy {machine['envoy']}, "
        f"load average {load[0]:.1f} before / {load[1]:.1f} after",
        "",
        *(f"- {name}: {report['arms'][name]['description']}" for name in report["arm_order"]),
        "",
        f"| body | c | arm | req/s | p50 ms | p99 ms | added over direct p50 / p99 ms | router CPU µs/req "
        f"| {ref} added p50 / p99 ms | {ref} req/s ÷ arm |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for size in report["sizes"].values():
        body = f"{size['label']} ({size['body_bytes']:,} B)"
        for c, name, arm, step in _rows(report, size):
            ratio = _f(step[f"{ref}_rps_ratio"].get(name))
            lines.append(
                f"| {body} | {c} | {name} | {arm['rps']:,.0f} | {_f(arm['p50_ms'])} | {_f(arm['p99_ms'])} "
                f"| {_pair(step['added_over_direct_ms'].get(name))} | {_cpu_cell(arm)} "
                f"| {_pair(step[f'{ref}_added_ms'].get(name))} | {ratio}{'' if ratio == '-' else 'x'} |"
            )
    lines.append("")
    lines.append(
        f"{ref} added = {ref} minus that arm in the same step. Router CPU: the arm's router processes "
        f"(Envoy + EPP for {ref}), per request. The peers run --policy {opts['peer_policy']}: what routing "
        f"itself costs them, not their cache-aware policies."
    )
    loadgen = "; ".join(
        f"{size['label']} "
        + ", ".join(f"{name} {_f(arm['cpu_pct'].get('loadgen'), '.0f')}%" for _, name, arm, _ in rows)
        for size in report["sizes"].values()
        if (rows := [row for row in _rows(report, size) if row[0] == max(size["by_concurrency"], key=int)])
    )
    lines.append(
        f"EPP idle (metrics scraping): {_f(report.get('epp_idle_cpu_pct'), '.1f')}% of a core. "
        f"Load generator CPU at the throughput concurrency: {loadgen}."
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
