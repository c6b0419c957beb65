"""igw in front of real vLLM CPU engines: routing, streaming, metrics scraping, LoRA, KV events.

Three engines of the tiny local model (``make vllm-env`` builds it; ``make e2e-vllm`` runs these tests,
which ``make test`` deselects) with a small KV cache, prefix caching, one LoRA adapter and KV-cache
events published to a ZMQ socket this module binds on loopback. The EPP and Envoy are the same as in the
other e2e tests; only the model servers are real.
"""

from __future__ import annotations

import asyncio
import os
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import msgpack
import orjson
import pytest
import zmq
from e2e_support import GatewayFactory, eventually, free_port, precise_config
from prometheus_client.parser import text_string_to_metric_families

from igw.config.pool import parse_pool
from igw.config.settings import BodyMode, DataLayerSettings, ObservabilitySettings

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tools" / "vllm"))
import serve  # noqa: E402

pytestmark = [pytest.mark.vllm, pytest.mark.timeout(600)]

HOME = Path(os.environ.get("IGW_VLLM_HOME", Path.home() / ".cache" / "igw-vllm"))
MODEL = "tiny"
LORA = "lora-a"


def _missing() -> str | None:
    for need in (HOME / "venv" / "bin" / "python", HOME / "tiny-model" / "config.json", HOME / "lora-a"):
        if not need.exists():
            return f"{need} is missing: run `make vllm-env`"
    return None


class EventRelay:
    """Forwards every KV-event message the engines publish to two readers: this module's own socket and
    the port a gateway under test binds (a PUB socket connects to both; ZMQ reconnects until the
    gateway binds, and drops what is published while nobody listens)."""

    def __init__(self, ctx: zmq.Context[zmq.Socket[bytes]], inbound: str, outbound: list[str]) -> None:
        self._ctx, self._inbound, self._outbound = ctx, inbound, outbound
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="kv-event-relay", daemon=True)
        self._thread.start()
        self._ready.wait(5)

    def _run(self) -> None:
        front = self._ctx.socket(zmq.SUB)
        front.setsockopt(zmq.SUBSCRIBE, b"")
        front.bind(self._inbound)
        back = self._ctx.socket(zmq.PUB)
        for address in self._outbound:
            back.connect(address)
        self._ready.set()
        try:
            while not self._stop.is_set():
                if front.poll(100):
                    back.send_multipart(front.recv_multipart())
        finally:
            front.close(linger=0)
            back.close(linger=0)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)


class Engines:
    def __init__(self, procs: list[serve.EngineProcess], events: zmq.Socket[bytes], gateway_events_port: int) -> None:
        self.procs = procs
        self.events = events
        self.gateway_events_port = gateway_events_port  # where a gateway under test binds to get the events
        self.addresses = [f"{p.spec.host}:{p.spec.port}" for p in procs]

    def drain_events(self, *, quiet_s: float = 1.0, max_s: float = 10.0) -> list[tuple[str, list[Any]]]:
        """(topic, events) of every message until the socket is quiet for ``quiet_s``."""
        out: list[tuple[str, list[Any]]] = []
        deadline = time.monotonic() + max_s
        last = time.monotonic()
        while time.monotonic() < deadline and time.monotonic() - last < quiet_s:
            if self.events.poll(100):
                topic, _seq, payload = self.events.recv_multipart()
                batch = msgpack.unpackb(payload, raw=False, strict_map_key=False)
                out.append((topic.decode(), list(batch[1])))
                last = time.monotonic()
        return out


@pytest.fixture(scope="module")
def engines() -> Iterator[Engines]:
    problem = _missing()
    if problem is not None:
        pytest.skip(problem)
    ctx = zmq.Context.instance()
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub_port, events_port, gateway_port = free_port(), free_port(), free_port()
    sub.bind(f"tcp://127.0.0.1:{sub_port}")
    relay = EventRelay(ctx, f"tcp://127.0.0.1:{events_port}",
                       [f"tcp://127.0.0.1:{sub_port}", f"tcp://127.0.0.1:{gateway_port}"])  # fmt: skip
    specs = [
        serve.EngineSpec(
            port=free_port(), model_dir=str(HOME / "tiny-model"), served_name=MODEL, num_blocks=128,
            max_num_seqs=8, kv_events_endpoint=f"tcp://127.0.0.1:{events_port}",
            lora_modules=[f"{LORA}={HOME / 'lora-a'}"],
        )
        for _ in range(3)
    ]  # fmt: skip
    procs = serve.start_engines(specs, python=str(HOME / "venv" / "bin" / "python"), log_dir=HOME / "e2e-logs")
    try:
        serve.wait_ready(procs, timeout=400)
        yield Engines(procs, sub, gateway_port)
    finally:
        serve.stop_engines(procs)
        relay.close()
        sub.close(linger=0)


def _counters(text: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[sample.name] = out.get(sample.name, 0.0) + float(sample.value)
    return out


async def _metrics(http: aiohttp.ClientSession, address: str) -> str:
    async with http.get(f"http://{address}/metrics") as r:
        assert r.status == 200
        return await r.text()


def _words(seed: int, n: int) -> str:
    words = ("alpha", "river", "stone", "cloud", "maple", "ember", "quartz", "harbor", "violet", "summit")
    return " ".join(words[(seed * 7 + i * 3 + i * i) % len(words)] + str((seed + i) % 13) for i in range(n))


def _completion(prompt: str, *, model: str = MODEL, max_tokens: int = 8, stream: bool = True) -> dict[str, Any]:
    body: dict[str, Any] = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "ignore_eos": True,
                            "temperature": 0, "stream": stream}  # fmt: skip
    if stream:
        body["stream_options"] = {"include_usage": True}
    return body


async def _stream(http: aiohttp.ClientSession, url: str, body: dict[str, Any], **headers: str) -> dict[str, Any]:
    """Send a streamed completion; the text, the usage and the response headers."""
    async with http.post(f"{url}/v1/completions", json=body, headers=headers) as r:
        assert r.status == 200, await r.text()
        text, usage, events, done = [], {}, 0, False
        async for line in r.content:
            if not line.startswith(b"data: "):
                continue
            events += 1
            if line.startswith(b"data: [DONE]"):
                done = True
                continue
            chunk = orjson.loads(line[6:])
            if chunk.get("choices"):
                text.append(chunk["choices"][0].get("text", ""))
            if chunk.get("usage"):
                usage = chunk["usage"]
        headers = {k.lower(): v for k, v in r.headers.items()}
        return {"text": "".join(text), "usage": usage, "headers": headers, "chunks": len(text), "events": events,
                "done": done}  # fmt: skip


def _pool(engines: Engines) -> Any:
    return parse_pool(
        {"name": "vllm", "models": [MODEL, LORA], "endpoints": [{"address": a} for a in engines.addresses]}
    )


async def test_streams_through_igw_and_spreads_distinct_prompts(
    engines: Engines, start_gateway: GatewayFactory, http: aiohttp.ClientSession
) -> None:
    gw = await start_gateway([], pool=_pool(engines), body_mode=BodyMode.BUFFERED,
                             datalayer=DataLayerSettings(scrape_interval=0.05))  # fmt: skip
    before = {a: _counters(await _metrics(http, a)) for a in engines.addresses}
    results = await asyncio.gather(
        *(_stream(http, gw.url, _completion(_words(100 + i, 120), max_tokens=24)) for i in range(12))
    )
    for res in results:
        assert res["usage"]["completion_tokens"] == 24
        # server-sent events passed through as events: content, then usage, then [DONE]. (How many tokens
        # share one content event depends on how fast the engine runs ahead of its API server.)
        assert res["headers"]["content-type"].startswith("text/event-stream")
        assert res["chunks"] >= 1
        assert res["events"] >= res["chunks"] + 2
        assert res["done"]
    after = {a: _counters(await _metrics(http, a)) for a in engines.addresses}
    served = {
        a: after[a].get("vllm:request_success_total", 0) - before[a].get("vllm:request_success_total", 0)
        for a in engines.addresses
    }
    assert sum(served.values()) == 12
    assert sum(1 for n in served.values() if n > 0) >= 2  # concurrent distinct prompts are spread
    picked = {address for address, _ in gw.picks.by_request.values()}
    assert picked == {a for a, n in served.items() if n > 0}


async def test_shared_prefix_stays_on_one_engine_and_hits_its_cache(
    engines: Engines, start_gateway: GatewayFactory, http: aiohttp.ClientSession
) -> None:
    gw = await start_gateway([], pool=_pool(engines), body_mode=BodyMode.BUFFERED,
                             datalayer=DataLayerSettings(scrape_interval=0.05))  # fmt: skip
    system = _words(7, 300)
    picks: list[str] = []
    cached: list[int] = []
    for i in range(6):
        res = await _stream(http, gw.url, _completion(f"{system} question {i}: {_words(900 + i, 12)}"))
        cached.append(int((res["usage"].get("prompt_tokens_details") or {}).get("cached_tokens") or 0))
        picks.append(list(gw.picks.by_request.values())[-1][0])
        await asyncio.sleep(0.2)  # let a scrape and the prefix index see it
    assert len(set(picks)) == 1, picks
    assert all(c >= 256 for c in cached[1:]), cached  # the system prompt's blocks (32 tokens each) were reused


async def test_metrics_of_real_engines_drive_the_decision(
    engines: Engines, start_gateway: GatewayFactory, http: aiohttp.ClientSession
) -> None:
    gw = await start_gateway([], pool=_pool(engines), body_mode=BodyMode.BUFFERED,
                             datalayer=DataLayerSettings(scrape_interval=0.05),
                             observability=ObservabilitySettings(decision_header=True))  # fmt: skip
    # keep one engine busy with long generations (more than max_num_seqs = 8, so some wait), wait until its
    # own /metrics says so and a few scrapes have run, then ask for a decision while it is still busy
    busy = engines.addresses[0]
    async with aiohttp.ClientSession() as direct:
        load = [
            asyncio.create_task(_stream(direct, f"http://{busy}", _completion(_words(50 + i, 20), max_tokens=1900)))
            for i in range(11)
        ]
        try:
            deadline = time.monotonic() + 60
            while _counters(await _metrics(http, busy)).get("vllm:num_requests_waiting", 0) < 1:
                assert time.monotonic() < deadline, "the busy engine never queued a request"
                await asyncio.sleep(0.05)
            await asyncio.sleep(0.3)
            async with http.post(f"{gw.url}/v1/completions", json=_completion(_words(3, 30), stream=False),
                                 headers={"x-igw-explain": "1"}) as r:  # fmt: skip
                assert r.status == 200
                decision = orjson.loads(r.headers["x-igw-decision"])
        finally:
            for task in load:
                task.cancel()  # the engine aborts requests whose client went away
            await asyncio.gather(*load, return_exceptions=True)
    scores = {c["endpoint"]: c["scores"] for c in decision["candidates"]}
    assert set(scores) == set(engines.addresses)
    others = [a for a in engines.addresses if a != busy]
    # the busy engine reported waiting requests and KV use in /metrics: it scores lower on both
    assert all(scores[busy]["queue-scorer"] < scores[a]["queue-scorer"] for a in others), scores
    assert all(scores[busy]["kv-cache-utilization-scorer"] < scores[a]["kv-cache-utilization-scorer"] for a in others)
    assert decision["picked"] != busy


async def test_lora_adapter_requests_are_served_and_reported(
    engines: Engines, start_gateway: GatewayFactory, http: aiohttp.ClientSession
) -> None:
    gw = await start_gateway([], pool=_pool(engines), body_mode=BodyMode.BUFFERED,
                             datalayer=DataLayerSettings(scrape_interval=0.05))  # fmt: skip
    res = await _stream(http, gw.url, _completion(_words(11, 20), model=LORA, max_tokens=12))
    assert res["usage"]["completion_tokens"] == 12
    address = list(gw.picks.by_request.values())[-1][0]
    families = {f.name: f for f in text_string_to_metric_families(await _metrics(http, address))}
    info = families["vllm:lora_requests_info"]
    assert {"max_lora", "running_lora_adapters", "waiting_lora_adapters"} <= set(info.samples[0].labels)
    async with http.post(f"{gw.url}/v1/completions", json=_completion("x", model="no-such-adapter", stream=False)) as r:
        assert r.status == 404  # the engine's own answer for an unknown model, passed through


async def test_kv_events_arrive_per_engine_topic(
    engines: Engines, start_gateway: GatewayFactory, http: aiohttp.ClientSession
) -> None:
    engines.drain_events(quiet_s=0.5, max_s=5)
    gw = await start_gateway([], pool=_pool(engines), body_mode=BodyMode.BUFFERED)
    for i in range(6):
        await _stream(http, gw.url, _completion(_words(300 + i, 100), max_tokens=4))
    served = {address for address, _ in gw.picks.by_request.values()}
    events = engines.drain_events()
    stored: dict[str, int] = {}
    for topic, batch in events:
        for event in batch:
            kind = event.get("type") if isinstance(event, dict) else event[0]
            if kind == "BlockStored":
                stored[topic] = stored.get(topic, 0) + 1
    assert {f"kv@{a}@{MODEL}" for a in served} <= set(stored), (served, stored)


async def test_igw_tokenizes_like_the_engines_tokenize_endpoint(engines: Engines, http: aiohttp.ClientSession) -> None:
    """The gateway's tokenizer (the model's tokenizer.json and chat template) against vLLM's own
    ``POST /tokenize``, for completion prompts and chats: what precise prefix routing relies on."""
    from igw.parsing.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_dir(HOME / "tiny-model")
    base = f"http://{engines.addresses[0]}"
    prompts = ["hello", "  leading spaces and\ttabs\n\nnew lines", "ünïcödé ✓ 🚀 text", _words(1, 300)]
    chats: list[dict[str, Any]] = [
        {"messages": [{"role": "user", "content": "hi there"}]},
        {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "two\nlines"},
                      {"role": "assistant", "content": "ok"}, {"role": "user", "content": _words(2, 80)}]},
        {"messages": [{"role": "user", "content": [{"type": "text", "text": "part one"},
                                                   {"type": "text", "text": "part two"}]}]},
        {"messages": [{"role": "user", "content": "no prompt"}], "add_generation_prompt": False},
    ]  # fmt: skip
    for prompt in prompts:
        async with http.post(f"{base}/tokenize", json={"model": MODEL, "prompt": prompt}) as r:
            assert r.status == 200
            assert tokenizer.encode_completion(prompt) == (await r.json())["tokens"], prompt
    for chat in chats:
        async with http.post(f"{base}/tokenize", json={"model": MODEL, **chat}) as r:
            assert r.status == 200
            expected = (await r.json())["tokens"]
        got = tokenizer.encode_chat(chat["messages"], add_generation_prompt=chat.get("add_generation_prompt", True))
        assert got == expected, chat


async def test_precise_prefix_routing_follows_the_real_engines_events(
    engines: Engines, start_gateway: GatewayFactory, http: aiohttp.ClientSession
) -> None:
    """The engines' own KV-cache events, keyed from igw's tokenization, locate prompts igw never saw
    (sent straight to an engine): completions and chats, and an engine's cleared cache."""
    from igw.datalayer.kvevents.index import KVBlockIndex
    from igw.parsing.tokenizer import Tokenizer
    from igw.scheduling.plugins.precise_prefix import PrecisePrefixCacheScorer

    config = precise_config(engines.gateway_events_port, {MODEL: str(HOME / "tiny-model")}, queue=2, kv=2)
    gw = await start_gateway([], pool=_pool(engines), body_mode=BodyMode.BUFFERED, config_text=config,
                             datalayer=DataLayerSettings(scrape_interval=0.05),
                             observability=ObservabilitySettings(decision_header=True))  # fmt: skip
    scorer = gw.epp.config.plugins["precise-prefix-cache-scorer"]
    assert isinstance(scorer, PrecisePrefixCacheScorer)
    index: KVBlockIndex = scorer.index
    tokenizer = Tokenizer.from_dir(HOME / "tiny-model")
    block = 32  # tools/vllm/serve.py's block size

    async def direct(address: str, path: str, body: dict[str, Any]) -> dict[str, Any]:
        async with http.post(f"http://{address}{path}", json={**body, "stream": False}) as r:
            assert r.status == 200, await r.text()
            return dict(await r.json())

    # the relay connects to the EPP's socket once it is bound; until then events are dropped
    for i in range(40):
        await direct(
            engines.addresses[1], "/v1/completions", _completion(f"warm-up {i} " + _words(i, 40), stream=False)
        )
        if await eventually(lambda: index.stats().engine_hashes > 0, within=0.5):
            break
    assert index.stats().engine_hashes > 0, "no KV event reached the EPP"

    def held(keys: list[int], address: str) -> int:
        found = index.match_prefix(keys, engines.addresses)
        return found[address].blocks if address in found else 0

    # a completion prompt sent straight to one engine: the EPP finds every one of its full blocks there
    holder = engines.addresses[2]
    prompt = _words(21, 300)
    keys = index.request_keys(tokenizer.encode_completion(prompt), block)
    assert len(keys) >= 10
    await direct(holder, "/v1/completions", _completion(prompt, max_tokens=2, stream=False))
    assert await eventually(lambda: held(keys, holder) == len(keys), within=5.0), held(keys, holder)
    assert all(held(keys, a) == 0 for a in engines.addresses if a != holder)

    # a request through the gateway sharing that prompt goes to the engine that holds it, and hits
    async with http.post(f"{gw.url}/v1/completions", json=_completion(f"{prompt} and then", stream=False),
                         headers={"x-igw-explain": "1"}) as r:  # fmt: skip
        assert r.status == 200
        decision = orjson.loads(r.headers["x-igw-decision"])
        usage = (await r.json())["usage"]
    scores = {c["endpoint"]: c["scores"]["precise-prefix-cache-scorer"] for c in decision["candidates"]}
    assert scores[holder] > 0.8, scores
    assert all(s == 0.0 for a, s in scores.items() if a != holder), scores
    assert decision["picked"] == holder
    assert int(usage["prompt_tokens_details"]["cached_tokens"]) >= (len(keys) - 1) * block
    assert scorer.fallbacks == {}

    # a chat: the keys of igw's rendering of the chat template match the engine's blocks
    messages = [{"role": "system", "content": _words(31, 120)}, {"role": "user", "content": _words(32, 60)}]
    chat_keys = index.request_keys(tokenizer.encode_chat(messages, add_generation_prompt=True), block)
    await direct(engines.addresses[0], "/v1/chat/completions",
                 {"model": MODEL, "messages": messages, "max_tokens": 2, "temperature": 0})  # fmt: skip
    assert await eventually(lambda: held(chat_keys, engines.addresses[0]) == len(chat_keys), within=5.0)

    # the engine empties its cache (AllBlocksCleared): the EPP forgets what it held
    async with http.post(f"http://{holder}/reset_prefix_cache") as r:
        assert r.status == 200, await r.text()
    # the engine publishes its pending events when it next runs a step: give it one
    await direct(holder, "/v1/completions", _completion("one more", max_tokens=1, stream=False))
    assert await eventually(lambda: held(keys, holder) == 0, within=5.0), held(keys, holder)
