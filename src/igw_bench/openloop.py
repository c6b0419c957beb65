"""An open-loop load client: requests leave at their workload's arrival times, whatever the latency.

Arrival times are simulated seconds; with a time dilation ``D`` (real seconds per simulated second, the
simulator's ``--time-dilation``) a request due at ``t`` leaves ``t * D`` real seconds after the start,
so a fleet slowed down ``D`` times sees the workload's rate divided by ``D`` and the same queueing.

A request that quotes an earlier answer (multi-turn chat) also waits for that answer. Bounded: after
the last arrival, requests still running get ``drain_s`` real seconds, then are cancelled and counted
as failed (``error="unfinished"``), so a step always ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import aiohttp

from igw_bench.client import RequestSpec, Result, send
from igw_bench.textgen import HttpRequest, Quote

__all__ = ["Sent", "run_open_loop"]

COMPLETIONS_PATH = "/v1/completions"


@dataclass(slots=True)
class Sent:
    """One request of a step: when it left (real seconds after the step's start) and how it went."""

    request: HttpRequest
    sent_at: float
    result: Result


async def run_open_loop(
    base_url: str,
    requests: Sequence[HttpRequest],
    *,
    dilation: float = 1.0,
    drain_s: float = 60.0,
    timeout_s: float = 600.0,
    headers: dict[str, str] | None = None,
    on_result: Callable[[Sent], None] | None = None,
) -> list[Sent]:
    """Send ``requests`` (sorted by arrival) on schedule; every request gets a :class:`Sent`, in order."""
    loop = asyncio.get_running_loop()
    answers: dict[str, str] = {}
    ready: dict[str, asyncio.Future[None]] = {
        r.output_key: loop.create_future() for r in requests if r.output_key is not None
    }
    done: dict[int, Sent] = {}
    departures: dict[int, float] = {}
    start = loop.time()
    perf0 = time.perf_counter()

    async def one(http: aiohttp.ClientSession, req: HttpRequest) -> None:
        quoted = [ready[p.key] for p in req.parts if isinstance(p, Quote) and p.key in ready]
        if quoted:
            await asyncio.gather(*quoted)
        departures[req.index] = time.perf_counter() - perf0
        spec = RequestSpec(COMPLETIONS_PATH, req.body(answers), dict(headers or {}))
        result = await send(http, base_url, spec, keep_text=req.output_key is not None)
        if req.output_key is not None:
            answers[req.output_key] = result.text or ""
            future = ready[req.output_key]
            if not future.done():
                future.set_result(None)
        sent = Sent(req, departures[req.index], result)
        done[req.index] = sent
        if on_result is not None:
            on_result(sent)

    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=timeout_s)
    last = (requests[-1].at * dilation) if requests else 0.0
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as http:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(last + drain_s), asyncio.TaskGroup() as group:
                for req in requests:
                    delay = start + req.at * dilation - loop.time()
                    if delay > 0:
                        await asyncio.sleep(delay)
                    group.create_task(one(http, req))
    out: list[Sent] = []
    for req in requests:
        sent = done.get(req.index)
        if sent is None:
            left = departures.get(req.index, time.perf_counter() - perf0)
            sent = Sent(req, left, Result(False, 0, None, time.perf_counter() - perf0 - left, error="unfinished"))
        out.append(sent)
    return out
