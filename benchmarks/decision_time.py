"""The EPP's own time per request, in process and without gRPC: session state machine, parsing,
the default EndpointPickerConfig (queue 2, KV-cache 2, approximate prefix 3: hashing, index
lookup and insertion included; the pick plus 2 fallbacks, as `igw run` asks), building the
replies (buffered mode, response headers).

    .venv/bin/python benchmarks/decision_time.py

What is left of the ~1 ms of EPP CPU per request that `igw bench overhead` measures is gRPC and
the event loop. Fleet sizes and prompt sizes are a grid; each cell runs a fixed number of
requests and prints p50/p99 of the per-request time.
"""

from __future__ import annotations

import asyncio
import time

import orjson
from envoy.config.core.v3 import base_pb2
from envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2 as pm
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep

from igw.api.context import RequestContext
from igw.api.types import EndpointMetrics
from igw.app.epp import Epp
from igw.config.pool import pool_from_addresses
from igw.config.settings import EppSettings, SchedulingSettings
from igw.extproc.session import ExtProcSession

REQUESTS = 2000
PREFIXES = 64
"""Requests share one of this many long system prompts (the prefix index fills and hits)."""


def _messages(body: bytes) -> list[bytes]:
    def header_map(pairs: list[tuple[str, str]]) -> base_pb2.HeaderMap:
        return base_pb2.HeaderMap(headers=[base_pb2.HeaderValue(key=k, raw_value=v.encode()) for k, v in pairs])

    headers = ep.ProcessingRequest(
        request_headers=ep.HttpHeaders(headers=header_map([(":path", "/v1/chat/completions"), (":method", "POST"),
                                                           ("content-type", "application/json"), ("x-request-id", "r")])),
        protocol_config=ep.ProtocolConfiguration(request_body_mode=pm.ProcessingMode.BUFFERED),
    )  # fmt: skip
    body_msg = ep.ProcessingRequest(request_body=ep.HttpBody(body=body, end_of_stream=True))
    response = ep.ProcessingRequest(response_headers=ep.HttpHeaders(headers=header_map([(":status", "200")])))
    return [m.SerializeToString() for m in (headers, body_msg, response)]


def _pct(times: list[float], q: float) -> float:
    ordered = sorted(times)
    return ordered[min(len(ordered) - 1, int(len(ordered) * q))] * 1e6


async def cell(endpoints: int, prompt_bytes: int) -> tuple[float, float, float, float]:
    """(decision p50, p99, whole EPP path p50, p99) in µs."""
    settings = EppSettings(scheduling=SchedulingSettings(fallbacks=2))  # as `igw run` (override-host)
    epp = Epp(settings, pool_from_addresses([f"10.0.{i // 250}.{i % 250 + 1}:8000" for i in range(endpoints)]))
    now = time.monotonic()
    for i, state in enumerate(epp.store.endpoints()):
        epp.store.update_metrics(state.address, EndpointMetrics(waiting=i % 7, running=4, kv_usage=(i % 10) / 10,
                                                                scraped_at=now))  # fmt: skip
    prefixes = [(f"system prompt {p}: " * (prompt_bytes // 16 + 1))[: prompt_bytes - 40] for p in range(PREFIXES)]

    def body(i: int) -> bytes:
        return orjson.dumps({"model": "m", "messages": [
            {"role": "system", "content": prefixes[i % PREFIXES]}, {"role": "user", "content": f"question {i}"}]})  # fmt: skip

    director = epp.director
    decide: list[float] = []
    path: list[float] = []
    for i in range(REQUESTS):
        # The decision alone: parse, objective, candidates, admission, producers, scheduling, hooks.
        ctx = RequestContext(request_id=f"d{i}", path="/v1/chat/completions", headers={}, started_at=now)
        data = body(i)
        t0 = time.perf_counter()
        await director.handle_request(ctx, data)
        decide.append(time.perf_counter() - t0)
        director.on_stream_end(ctx)
        # The whole EPP path of a request: protobuf messages in and out around the decision.
        raw = _messages(body(i + REQUESTS))
        t0 = time.perf_counter()
        session = ExtProcSession(director, epp.settings.server)
        for message in raw:
            await session.handle(ep.ProcessingRequest.FromString(message))
        session.finish()
        path.append(time.perf_counter() - t0)
    return _pct(decide, 0.5), _pct(decide, 0.99), _pct(path, 0.5), _pct(path, 0.99)


async def main() -> None:
    print("| endpoints | prompt | decision p50 µs | decision p99 µs | EPP path p50 µs | EPP path p99 µs |")
    print("|---|---|---|---|---|---|")
    for endpoints in (8, 64, 1000):
        for label, size in (("1 KB", 1000), ("16 KiB", 16 * 1024), ("200 KiB", 200 * 1024)):
            d50, d99, p50, p99 = await cell(endpoints, size)
            print(f"| {endpoints} | {label} | {d50:.0f} | {d99:.0f} | {p50:.0f} | {p99:.0f} |", flush=True)


if __name__ == "__main__":
    asyncio.run(main())
