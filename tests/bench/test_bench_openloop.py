"""The open-loop client: schedule order, time dilation, quoted answers, and the drain bound.

Two servers: a tiny aiohttp handler written here (it echoes what it received, answers deterministically,
and can be slow, fail or never answer), and the in-process simulator (real token counts and caching).
"""

from __future__ import annotations

import asyncio
import zlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import aiohttp
import orjson
import pytest
from aiohttp import web

from igw_bench.openloop import Sent, run_open_loop
from igw_bench.textgen import HttpRequest, Quote, render_workload
from igw_sim import tokenizer
from igw_sim.engine import EngineConfig
from igw_sim.fleet import SimFleet
from igw_sim.replay.workloads import build_workload

pytestmark = pytest.mark.timeout(30)


def _answer(prompt: str, n: int) -> list[str]:
    """What the echo server generates for ``prompt``: ``n`` one-token pieces that depend on it."""
    salt = zlib.crc32(prompt.encode()) % 100_000
    return [f" w{salt}x{i}" for i in range(n)]


@dataclass
class Echo:
    url: str
    events: list[tuple[str, str]] = field(default_factory=list)
    """``("recv", prompt)`` when a request arrives, ``("done", prompt)`` just before its stream ends."""
    bodies: list[dict[str, object]] = field(default_factory=list)
    headers: list[dict[str, str]] = field(default_factory=list)

    def received(self) -> list[str]:
        return [prompt for kind, prompt in self.events if kind == "recv"]


@pytest.fixture
async def echo() -> AsyncIterator[Echo]:
    """Models: ``slow`` waits 0.2 s before answering, ``fail`` answers 500, ``stall`` never answers."""
    state = Echo(url="")

    async def completions(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        prompt = body["prompt"]
        state.events.append(("recv", prompt))
        state.bodies.append(body)
        state.headers.append(dict(request.headers))
        if body["model"] == "stall":
            await asyncio.Event().wait()
        if body["model"] == "fail":
            return web.json_response({"error": {"message": "boom"}}, status=500)
        if body["model"] == "slow":
            await asyncio.sleep(0.2)
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        pieces = _answer(prompt, body["max_tokens"])
        for piece in pieces:
            await resp.write(b"data: " + orjson.dumps({"choices": [{"index": 0, "text": piece}]}) + b"\n\n")
        usage = {"prompt_tokens": tokenizer.count(prompt), "completion_tokens": len(pieces)}
        await resp.write(b"data: " + orjson.dumps({"choices": [], "usage": usage}) + b"\n\n")
        state.events.append(("done", prompt))
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp

    app = web.Application()
    app.router.add_post("/v1/completions", completions)
    runner = web.AppRunner(app, handler_cancellation=True, shutdown_timeout=0.1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    state.url = f"http://{host}:{port}"
    try:
        yield state
    finally:
        await runner.cleanup()


def _req(
    index: int, at: float, *parts: str | Quote, model: str = "m", output_key: str | None = None, max_tokens: int = 3
) -> HttpRequest:
    return HttpRequest(
        index=index, at=at, parts=parts, max_tokens=max_tokens, model=model, output_key=output_key, prompt_tokens=0
    )


async def test_every_request_is_sent_once_and_reported_in_schedule_order(echo: Echo) -> None:
    requests = [
        _req(0, 0.0, "zero"),
        _req(1, 0.01, "one", output_key="k1"),
        _req(2, 0.01, "two"),
        _req(3, 0.02, "three"),
        _req(4, 0.03, "four"),
    ]
    seen: list[Sent] = []

    sent = await run_open_loop(echo.url, requests, drain_s=10, headers={"x-bench": "yes"}, on_result=seen.append)

    assert [s.request.index for s in sent] == [0, 1, 2, 3, 4]
    assert all(s.result.ok for s in sent)
    assert [s.sent_at for s in sent] == sorted(s.sent_at for s in sent)
    assert sorted(echo.received()) == sorted(["zero", "one", "two", "three", "four"])
    assert all(h.get("x-bench") == "yes" for h in echo.headers)
    assert sorted(s.request.index for s in seen) == [0, 1, 2, 3, 4]
    # Only an answer somebody may quote is kept.
    assert sent[1].result.text == "".join(_answer("one", 3))
    assert sent[0].result.text is None
    assert sent[0].result.output_tokens == 3


async def test_no_request_leaves_before_its_dilated_arrival(echo: Echo) -> None:
    requests = [_req(0, 0.0, "a"), _req(1, 0.02, "b"), _req(2, 0.05, "c")]

    sent = await run_open_loop(echo.url, requests, dilation=3.0, drain_s=10)

    assert all(s.result.ok for s in sent)
    for s in sent:
        # A lower bound only (loop wake-ups can be late, never early); 2 ms for the two clocks' reads.
        assert s.sent_at >= s.request.at * 3.0 - 0.002


async def test_a_quote_is_filled_with_the_answer_actually_received(echo: Echo) -> None:
    first = _req(0, 0.0, "What is it?", model="slow", output_key="a0", max_tokens=4)
    second = _req(1, 0.01, "Then:", Quote("a0"), " and?")

    sent = await run_open_loop(echo.url, [first, second], drain_s=10)

    answer = "".join(_answer("What is it?", 4))
    assert sent[0].result.text == answer
    assert echo.received() == ["What is it?", "Then:" + answer + " and?"]
    # The follow-up waited for the whole answer, though it was due while the first was still running.
    assert echo.events.index(("done", "What is it?")) < echo.events.index(("recv", "Then:" + answer + " and?"))
    assert sent[1].result.ok
    assert sent[1].result.prompt_tokens == tokenizer.count("Then:" + answer + " and?")


async def test_the_answer_of_a_failed_request_is_quoted_as_nothing(echo: Echo) -> None:
    first = _req(0, 0.0, "Q", model="fail", output_key="a0")
    second = _req(1, 0.01, "Then:", Quote("a0"), " and?")

    sent = await run_open_loop(echo.url, [first, second], drain_s=10)

    assert not sent[0].result.ok
    assert sent[0].result.status == 500
    assert sent[1].result.ok
    assert echo.received()[1] == "Then: and?"


async def test_requests_still_running_after_the_drain_bound_are_counted_unfinished(echo: Echo) -> None:
    requests = [
        _req(0, 0.0, "fine"),
        _req(1, 0.0, "hangs", model="stall", output_key="h"),
        _req(2, 0.01, "quotes the hung one:", Quote("h")),
    ]
    seen: list[Sent] = []

    sent = await run_open_loop(echo.url, requests, drain_s=0.3, on_result=seen.append)

    assert [s.request.index for s in sent] == [0, 1, 2]
    assert sent[0].result.ok
    for s in sent[1:]:
        assert not s.result.ok
        assert s.result.status == 0
        assert s.result.error == "unfinished"
        assert s.result.ttft_s is None
    assert [s.request.index for s in seen] == [0]
    # The follow-up never left: it was still waiting for the answer it quotes.
    assert not any(p.startswith("quotes the hung one") for p in echo.received())


async def test_no_requests_is_no_results(echo: Echo) -> None:
    assert await run_open_loop(echo.url, [], drain_s=0.1) == []


# --------------------------------------------------------------------------------------------
# Against the simulator

FAST = EngineConfig(
    block_size=4, kv_blocks=256, max_num_seqs=4, prefill_overhead_ms=1, prefill_ms_per_token=0, itl_ms=1
)


@pytest.fixture
async def sim() -> AsyncIterator[str]:
    async with SimFleet(ports=[0], engine=FAST) as fleet:
        yield f"http://{fleet.addresses[0]}"


async def test_a_chat_turn_quotes_the_previous_answer_token_for_token(sim: str) -> None:
    spec = "w5:users=1,rounds=2,system=8,history=8,question=4,answer=5,qps=20,requests=2,seed=1"
    requests = render_workload(build_workload(spec), "sim-model", tag="t")
    assert isinstance(requests[1].parts[3], Quote)

    first, second = await run_open_loop(sim, requests, drain_s=10)

    assert first.result.ok
    assert second.result.ok
    assert first.result.text is not None
    assert tokenizer.count(first.result.text) == 5
    # The server counted the quoted answer: 8 + 8 + 4 + 5 + 4 tokens, as the workload defines the turn.
    assert second.result.prompt_tokens == second.request.prompt_tokens == 29
    # And found it in its cache: more than the first turn's 20 prompt tokens (blocks of 4) were cached,
    # which only the very tokens it generated can give.
    assert second.result.cached_tokens > 20


async def test_a_stalled_simulator_leaves_requests_unfinished(sim: str) -> None:
    async with aiohttp.ClientSession() as http, http.post(f"{sim}/sim/faults", json={"stall_s": 30}) as resp:
        assert resp.status == 200
    requests = [_req(0, 0.0, " the question", model="sim-model")]

    (sent,) = await run_open_loop(sim, requests, drain_s=0.3)

    assert not sent.result.ok
    assert sent.result.error == "unfinished"
