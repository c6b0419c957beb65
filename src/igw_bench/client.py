"""A small async OpenAI client for load: streams or not, measures TTFT and end-to-end time.

It talks HTTP to whatever URL it is given (a gateway, a router, a server) and never imports
the runtime. Each result records which server answered (the simulator's
``x-igw-sim-endpoint`` header) so a run can report the spread over the fleet.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson


@dataclass(slots=True)
class Result:
    ok: bool
    status: int
    ttft_s: float | None
    """Time to the first token of a streamed response (None when not streamed or failed)."""
    e2e_s: float
    output_tokens: int = 0
    endpoint: str | None = None
    error: str | None = None
    prompt_tokens: int = 0
    """From the response's ``usage`` (streamed: the final usage chunk, when asked for)."""
    cached_tokens: int = 0
    """``usage.prompt_tokens_details.cached_tokens``: prompt tokens the server had in its prefix cache."""
    text: str | None = None
    """The generated text (streamed responses, when asked for with ``keep_text``)."""


@dataclass(slots=True)
class RequestSpec:
    path: str
    body: dict[str, Any]
    headers: dict[str, str] = field(default_factory=dict)


async def send(http: aiohttp.ClientSession, base_url: str, spec: RequestSpec, *, keep_text: bool = False) -> Result:
    """Send one request; never raises (transport errors become a failed :class:`Result`).

    ``keep_text`` keeps a streamed response's generated text (a later prompt may quote it).
    """
    started = time.perf_counter()
    stream = bool(spec.body.get("stream"))
    ttft: float | None = None
    tokens = 0
    pieces: list[str] = []
    try:
        headers = {"content-type": "application/json", **spec.headers}
        async with http.post(base_url + spec.path, data=orjson.dumps(spec.body), headers=headers) as resp:
            endpoint = resp.headers.get("x-igw-sim-endpoint")
            if resp.status != 200:
                text = await resp.text()
                return Result(False, resp.status, None, time.perf_counter() - started, 0, endpoint, text[:200])
            usage: dict[str, Any] = {}
            if stream:
                async for line in resp.content:
                    if not line.startswith(b"data: ") or line.startswith(b"data: [DONE]"):
                        continue
                    chunk = orjson.loads(line[6:])
                    choices = chunk.get("choices") or []
                    piece = (
                        choices[0].get("text") or (choices[0].get("delta") or {}).get("content") if choices else None
                    )
                    if piece:
                        if ttft is None:
                            ttft = time.perf_counter() - started
                        tokens += 1
                        if keep_text:
                            pieces.append(piece)
                    if isinstance(chunk.get("usage"), dict):
                        usage = chunk["usage"]
            else:
                data = orjson.loads(await resp.read())
                usage = data.get("usage") or {}
                tokens = int(usage.get("completion_tokens", 0))
            details = usage.get("prompt_tokens_details") or {}
            return Result(True, 200, ttft, time.perf_counter() - started, tokens, endpoint,
                          prompt_tokens=int(usage.get("prompt_tokens") or 0),
                          cached_tokens=int(details.get("cached_tokens") or 0),
                          text="".join(pieces) if keep_text else None)  # fmt: skip
    except (TimeoutError, aiohttp.ClientError, ValueError) as exc:
        return Result(False, 0, None, time.perf_counter() - started, 0, None, f"{type(exc).__name__}: {exc}")


async def run_closed_loop(
    base_url: str,
    specs: list[RequestSpec],
    *,
    concurrency: int,
    deadline_s: float,
    on_result: Callable[[Result], None] | None = None,
    timeout_s: float = 120.0,
) -> list[Result]:
    """Send ``specs`` with ``concurrency`` workers; stop at ``deadline_s`` (bounded in time and count)."""
    results: list[Result] = []
    queue: asyncio.Queue[RequestSpec] = asyncio.Queue()
    for spec in specs:
        queue.put_nowait(spec)
    loop = asyncio.get_running_loop()
    end = loop.time() + deadline_s
    connector = aiohttp.TCPConnector(limit=0, force_close=False)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=timeout_s)) as http:

        async def worker() -> None:
            while loop.time() < end:
                try:
                    spec = queue.get_nowait()
                except asyncio.QueueEmpty:
                    return
                result = await send(http, base_url, spec)
                results.append(result)
                if on_result is not None:
                    on_result(result)

        try:
            async with asyncio.timeout(deadline_s + timeout_s):
                await asyncio.gather(*(worker() for _ in range(concurrency)))
        except TimeoutError:
            pass
    return results


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (``q`` in [0, 100]); NaN for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, math.ceil(q / 100 * len(ordered)) - 1))
    return ordered[rank]
