"""The load generator of ``igw bench overhead``: a raw HTTP/1.1 client and one load step.

A step is a closed loop of keep-alive HTTP/1.1 connections, bounded in time (warm-up plus
measured window) and in count; only responses completed inside the window are counted. The
client is a bare :class:`asyncio.Protocol` that writes one prepared request and parses just
enough of the response (status, content-length or chunked) to know where it ends: much cheaper
than aiohttp, so the load generator stays out of the way of what it measures. CPU per request
of the processes under test is sampled from ``/proc`` at the window edges.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import cast

from igw_bench.backend import CHAT_PATH
from igw_bench.client import percentile
from igw_bench.procs import HOST
from igw_bench.sysstats import sample_cpu

STOP_GRACE_S = 5.0
"""After the window ends, how long in-flight requests may take before they are cancelled."""


# --------------------------------------------------------------------------------------------
# A small HTTP/1.1 client connection (keep-alive, one request at a time), cheaper than aiohttp


def http_request(host: str, port: int, path: str, body: bytes) -> bytes:
    """The raw bytes of one keep-alive HTTP/1.1 POST (sent as is, many times)."""
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    return head.encode("ascii") + body


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
        cpu0 = sample_cpu(pids)
        t_start = perf()
        n_errors0 = len(errors)
        await asyncio.sleep(duration_s)
        cpu1 = sample_cpu(pids)
        t_end = perf()
        n_errors1 = len(errors)
        stopping = True
        _, pending = await asyncio.wait(tasks, timeout=STOP_GRACE_S)
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
