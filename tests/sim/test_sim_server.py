"""The simulator over real loopback HTTP: OpenAI shapes, SSE streaming, metrics, errors, headers, CLI."""

from __future__ import annotations

import asyncio
import hashlib
import io
import signal
import sys
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from igw_sim import tokenizer
from igw_sim.cli import main
from igw_sim.engine import Engine, EngineConfig
from igw_sim.fleet import SimFleet

CONFIG = EngineConfig(max_num_seqs=2, prefill_overhead_ms=5, prefill_ms_per_token=0, itl_ms=10)
MODELS = ["sim-model", "other-model"]


@pytest.fixture
async def fleet() -> AsyncIterator[SimFleet]:
    async with SimFleet(ports=[0], host="127.0.0.1", engine=CONFIG, models=MODELS) as running:
        yield running


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as client:
        yield client


def _url(fleet: SimFleet, path: str, index: int = 0) -> str:
    return f"http://{fleet.addresses[index]}{path}"


async def _read_sse(response: aiohttp.ClientResponse) -> tuple[list[tuple[float, str]], bytes]:
    """Return ((arrival time, data payload) per event, raw body)."""
    events: list[tuple[float, str]] = []
    raw = bytearray()
    async for line in response.content:
        raw += line
        if line.startswith(b"data: "):
            events.append((time.monotonic(), line[6:].rstrip(b"\n").decode()))
    return events, bytes(raw)


async def _wait_until(predicate: Any, timeout: float = 2.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.005)


def _metrics(text: str) -> dict[str, Any]:
    return {family.name: family for family in text_string_to_metric_families(text)}


# -- streaming -------------------------------------------------------------------------------------


async def test_completion_stream_is_well_formed_sse_arriving_over_time(
    fleet: SimFleet, session: aiohttp.ClientSession
) -> None:
    body = {
        "model": "sim-model",
        "prompt": "hello world",
        "max_tokens": 5,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    async with session.post(_url(fleet, "/v1/completions"), json=body) as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/event-stream")
        events, raw = await _read_sse(response)
    # Exactly "data: ...\n\n" events, ending with [DONE].
    assert raw.endswith(b"data: [DONE]\n\n")
    assert all(part.startswith(b"data: ") for part in raw.split(b"\n\n")[:-1])
    payloads = [data for _, data in events]
    assert payloads[-1] == "[DONE]"
    chunks = [orjson.loads(data) for data in payloads[:-1]]
    token_chunks, usage_chunk = chunks[:-1], chunks[-1]
    assert len(token_chunks) == 5
    assert len({c["id"] for c in chunks}) == 1
    assert all(c["object"] == "text_completion" and c["model"] == "sim-model" for c in chunks)
    assert [c["choices"][0]["finish_reason"] for c in token_chunks] == [None] * 4 + ["length"]
    text = "".join(c["choices"][0]["text"] for c in token_chunks)
    assert tokenizer.count(text) == 5
    assert usage_chunk["choices"] == []
    assert usage_chunk["usage"] == {
        "prompt_tokens": 2,
        "completion_tokens": 5,
        "total_tokens": 7,
        "prompt_tokens_details": {"cached_tokens": 0},
    }
    # Tokens are flushed as produced: 4 ITLs of 10 ms separate the first and the last token chunk.
    stamps = [t for t, _ in events[:5]]
    assert stamps[-1] - stamps[0] >= 0.03
    assert len(set(stamps)) == 5


async def test_chat_stream_carries_role_then_content_and_no_usage_unless_asked(
    fleet: SimFleet, session: aiohttp.ClientSession
) -> None:
    body = {"model": "other-model", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "stream": True}
    async with session.post(_url(fleet, "/v1/chat/completions"), json=body) as response:
        events, _ = await _read_sse(response)
    chunks = [orjson.loads(data) for _, data in events[:-1]]
    assert events[-1][1] == "[DONE]"
    assert len(chunks) == 3
    assert all(c["object"] == "chat.completion.chunk" and "usage" not in c for c in chunks)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert all("role" not in c["choices"][0]["delta"] for c in chunks[1:])
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


# -- non-streaming ---------------------------------------------------------------------------------


async def test_completion_non_streaming_shape(fleet: SimFleet, session: aiohttp.ClientSession) -> None:
    body = {"model": "sim-model", "prompt": "The quick brown fox.", "max_tokens": 4}
    async with session.post(_url(fleet, "/v1/completions"), json=body) as response:
        assert response.status == 200
        data = await response.json()
    assert data["object"] == "text_completion"
    assert data["id"].startswith("cmpl-")
    assert data["model"] == "sim-model"
    (choice,) = data["choices"]
    assert choice["finish_reason"] == "length"
    assert tokenizer.count(choice["text"]) == 4
    assert data["usage"] == {
        "prompt_tokens": 5,
        "completion_tokens": 4,
        "total_tokens": 9,
        "prompt_tokens_details": {"cached_tokens": 0},
    }


async def test_chat_non_streaming_honours_max_completion_tokens_and_defaults_to_16(
    fleet: SimFleet, session: aiohttp.ClientSession
) -> None:
    messages = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": [{"type": "text", "text": "hi"}]},
    ]
    body = {"model": "sim-model", "messages": messages, "max_tokens": 9, "max_completion_tokens": 2}
    async with session.post(_url(fleet, "/v1/chat/completions"), json=body) as response:
        data = await response.json()
    assert data["object"] == "chat.completion"
    assert data["id"].startswith("chatcmpl-")
    assert data["choices"][0]["message"]["role"] == "assistant"
    assert data["usage"]["completion_tokens"] == 2
    assert data["usage"]["prompt_tokens"] == tokenizer.count(tokenizer.render_chat(messages))
    async with session.post(_url(fleet, "/v1/completions"), json={"prompt": "x"}) as response:
        assert (await response.json())["usage"]["completion_tokens"] == 16


async def test_tokenize_count_matches_completion_usage(fleet: SimFleet, session: aiohttp.ClientSession) -> None:
    prompt = "Tokenize me, please: it's (almost) a real sentence!\n"
    messages = [{"role": "user", "content": prompt}]
    for route, extra in (("/v1/completions", {"prompt": prompt}), ("/v1/chat/completions", {"messages": messages})):
        async with session.post(_url(fleet, "/tokenize"), json={"model": "sim-model", **extra}) as response:
            tokenized = await response.json()
        async with session.post(_url(fleet, route), json={"model": "sim-model", "max_tokens": 1, **extra}) as response:
            usage = (await response.json())["usage"]
        assert tokenized["count"] == usage["prompt_tokens"] == len(tokenized["tokens"])
        assert tokenized["max_model_len"] == CONFIG.max_model_len
    assert tokenized["tokens"] == tokenizer.encode(tokenizer.render_chat(messages))


# -- errors ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("route", ["/v1/completions", "/v1/chat/completions"])
async def test_unknown_model_is_an_openai_style_404(
    fleet: SimFleet, session: aiohttp.ClientSession, route: str
) -> None:
    body = {"model": "nope", "prompt": "x", "messages": [{"role": "user", "content": "x"}]}
    async with session.post(_url(fleet, route), json=body) as response:
        assert response.status == 404
        error = (await response.json())["error"]
    assert "nope" in error["message"]
    assert error["type"] == "NotFoundError"
    assert error["code"] == 404


@pytest.mark.parametrize(
    ("payload", "needle"),
    [
        (b"{not json", "Invalid JSON"),
        (b"[1, 2]", "JSON object"),
        (b'{"prompt": "x", "max_tokens": 0}', "max_tokens"),
        (b'{"prompt": {"a": 1}}', "prompt"),
        (b'{"prompt": "x", "max_tokens": 200000}', "maximum context length"),
    ],
    ids=["malformed", "not-object", "max-tokens", "prompt-type", "too-long"],
)
async def test_bad_requests_are_400_with_a_clear_message(
    fleet: SimFleet, session: aiohttp.ClientSession, payload: bytes, needle: str
) -> None:
    async with session.post(_url(fleet, "/v1/completions"), data=payload) as response:
        assert response.status == 400
        error = (await response.json())["error"]
    assert needle in error["message"]
    assert error["type"] == "BadRequestError"


async def test_full_waiting_queue_is_429(session: aiohttp.ClientSession) -> None:
    cfg = EngineConfig(max_num_seqs=1, max_waiting=0, itl_ms=5)
    async with SimFleet(ports=[0], engine=cfg) as fleet:
        url = _url(fleet, "/v1/completions")
        async with session.post(url, json={"prompt": "a", "max_tokens": 50, "stream": True}) as first:
            assert first.status == 200
            async with session.post(url, json={"prompt": "b"}) as second:
                assert second.status == 429
                assert (await second.json())["error"]["code"] == 429


# -- capacity, metrics, disconnects -----------------------------------------------------------------


async def test_batching_limit_is_visible_in_metrics(fleet: SimFleet, session: aiohttp.ClientSession) -> None:
    engine: Engine = fleet.engines[0]
    # Distinct first words: no two requests share a cached block, so KV use is 2 blocks per running request.
    bodies = [
        {"model": "sim-model", "prompt": f"r{i} b c d e f g h i j k l m n o p q", "max_tokens": 10} for i in range(5)
    ]
    posts = [asyncio.create_task(session.post(_url(fleet, "/v1/completions"), json=body)) for body in bodies]
    await _wait_until(lambda: engine.running + engine.waiting == 5)
    async with session.get(_url(fleet, "/metrics")) as response:
        assert response.headers["Content-Type"].startswith("text/plain")
        families = _metrics(await response.text())
    responses = await asyncio.gather(*posts)
    for response in responses:
        assert response.status == 200
        response.release()

    def value(name: str) -> float:
        (sample,) = families[name].samples
        assert sample.labels == {"engine": "0", "model_name": "sim-model"}
        return float(sample.value)

    assert value("vllm:num_requests_running") == 2
    assert value("vllm:num_requests_waiting") == 3
    assert value("vllm:kv_cache_usage_perc") == pytest.approx(2 * 2 / (CONFIG.kv_blocks - 1))  # a null block
    (info,) = families["vllm:cache_config_info"].samples
    assert info.value == 1.0
    expected = {
        "block_size": "16",
        "num_gpu_blocks": str(CONFIG.kv_blocks),
        "enable_prefix_caching": "True",
        "engine": "0",
    }
    assert info.labels.items() >= expected.items()

    async with session.get(_url(fleet, "/metrics")) as response:
        after = _metrics(await response.text())
    assert after["vllm:num_requests_running"].type == "gauge"
    assert after["vllm:num_requests_waiting"].samples[0].value == 0
    for name, expected in (("vllm:prompt_tokens", 5 * 17), ("vllm:generation_tokens", 5 * 10)):
        assert after[name].type == "counter"
        totals = [s for s in after[name].samples if s.name == name + "_total"]
        assert [s.value for s in totals] == [expected]
    success = {
        s.labels["finished_reason"]: s.value
        for s in after["vllm:request_success"].samples
        if s.name == "vllm:request_success_total"
    }
    assert success["length"] == 5
    for name in (
        "vllm:time_to_first_token_seconds",
        "vllm:inter_token_latency_seconds",
        "vllm:e2e_request_latency_seconds",
    ):
        family = after[name]
        assert family.type == "histogram"
        counts = {s.name: s.value for s in family.samples if not s.name.endswith("_bucket")}
        assert counts[name + "_count"] == (45 if "inter_token" in name else 5)
    # TTFT includes queueing: the 3 requests that waited spent >= one whole request (~140 ms) in the queue.
    ttft_buckets = {
        s.labels["le"]: s.value for s in after["vllm:time_to_first_token_seconds"].samples if "le" in s.labels
    }
    assert ttft_buckets["0.1"] <= 2
    assert ttft_buckets["+Inf"] == 5


async def test_streaming_client_disconnect_frees_the_slot(fleet: SimFleet, session: aiohttp.ClientSession) -> None:
    engine = fleet.engines[0]
    body = {"model": "sim-model", "prompt": "long", "max_tokens": 100_000, "stream": True}
    response = await session.post(_url(fleet, "/v1/completions"), json=body)
    await response.content.readline()
    await response.content.readline()
    assert engine.running == 1
    response.close()  # drops the connection
    await _wait_until(lambda: engine.running == 0)
    assert engine.aborted_total == 1
    async with session.get(_url(fleet, "/sim/stats")) as stats:
        assert (await stats.json())["running"] == 0


async def test_non_streaming_client_disconnect_frees_the_slot(fleet: SimFleet, session: aiohttp.ClientSession) -> None:
    engine = fleet.engines[0]
    body = {"model": "sim-model", "prompt": "long", "max_tokens": 100_000}
    with pytest.raises(asyncio.TimeoutError):
        await session.post(_url(fleet, "/v1/completions"), json=body, timeout=aiohttp.ClientTimeout(total=0.1))
    await _wait_until(lambda: engine.running == 0)
    assert engine.aborted_total == 1


# -- headers, small routes, fleet ------------------------------------------------------------------


async def test_headers_identify_endpoint_body_and_request_id(fleet: SimFleet, session: aiohttp.ClientSession) -> None:
    payload = orjson.dumps({"prompt": "a" * (2 * 1024 * 1024), "max_tokens": 1})  # above aiohttp's 1 MiB default
    headers = {"x-request-id": "req-42", "Content-Type": "application/json"}
    async with session.post(_url(fleet, "/v1/completions"), data=io.BytesIO(payload), headers=headers) as response:
        assert response.status == 200
        assert (await response.json())["usage"]["prompt_tokens"] == 1
    assert response.headers["x-igw-sim-endpoint"] == fleet.addresses[0]
    assert response.headers["x-request-id"] == "req-42"
    assert response.headers["x-igw-sim-body-bytes"] == str(len(payload))
    assert response.headers["x-igw-sim-body-sha256"] == hashlib.sha256(payload).hexdigest()
    async with session.get(_url(fleet, "/health")) as health:
        assert health.status == 200
    assert health.headers["x-igw-sim-endpoint"] == fleet.addresses[0]
    assert "x-igw-sim-body-bytes" not in health.headers
    async with session.post(_url(fleet, "/unknown"), data=b"xyz") as missing:
        assert missing.status == 404
    assert missing.headers["x-igw-sim-body-bytes"] == "3"


async def test_models_and_stats_routes(fleet: SimFleet, session: aiohttp.ClientSession) -> None:
    async with session.get(_url(fleet, "/v1/models")) as response:
        models = await response.json()
    assert [m["id"] for m in models["data"]] == MODELS
    assert all(m["object"] == "model" for m in models["data"])
    for path in ("/metrics", "/health", "/sim/stats"):  # not counted
        async with session.get(_url(fleet, path)):
            pass
    async with session.post(_url(fleet, "/v1/completions"), json={"prompt": "x", "max_tokens": 1}):
        pass
    async with session.get(_url(fleet, "/sim/stats")) as response:
        stats = await response.json()
    assert stats == {"endpoint": fleet.addresses[0], "requests_total": 2, "running": 0, "waiting": 0}


async def test_fleet_serves_each_endpoint_on_its_own_port(session: aiohttp.ClientSession) -> None:
    async with SimFleet(ports=[0, 0, 0], engine=CONFIG) as fleet:
        assert len(set(fleet.addresses)) == 3
        assert len(fleet.engines) == 3
        for index, address in enumerate(fleet.addresses):
            async with session.post(_url(fleet, "/v1/completions", index), json={"prompt": "x", "max_tokens": 1}) as r:
                assert r.headers["x-igw-sim-endpoint"] == address
        assert [e.requests_total for e in fleet.engines] == [1, 1, 1]


# -- CLI -------------------------------------------------------------------------------------------


def test_cli_main_runs_for_duration(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--ports", "0,0", "--duration", "0.1", "--model", "m1", "--model", "m2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 3
    assert all(line.startswith("igw-sim: serving m1, m2 on http://127.0.0.1:") for line in lines[:2])
    assert lines[-1] == "igw-sim: ready"


async def test_cli_subprocess_serves_and_stops_on_sigterm(session: aiohttp.ClientSession) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "igw_sim", "--ports", "0", "--itl-ms", "1",
        stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert proc.stdout is not None
    try:
        serving = (await asyncio.wait_for(proc.stdout.readline(), timeout=15)).decode()
        assert serving.startswith("igw-sim: serving sim-model on http://127.0.0.1:")
        assert (await asyncio.wait_for(proc.stdout.readline(), timeout=5)).decode().strip() == "igw-sim: ready"
        url = serving.split(" on ")[1].strip()
        async with session.post(url + "/v1/completions", json={"prompt": "x", "max_tokens": 2}) as response:
            assert response.status == 200
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), timeout=10) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
