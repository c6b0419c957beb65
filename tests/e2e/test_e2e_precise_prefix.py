"""Precise prefix-cache routing through real Envoy: simulated engines that tokenize with a real model's
tokenizer publish their KV-cache events to the EPP, which tokenizes requests the same way."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from e2e_support import GatewayFactory, eventually, free_port, precise_config

from igw.config.settings import BodyMode, DataLayerSettings, ObservabilitySettings
from igw.scheduling.plugins.precise_prefix import PrecisePrefixCacheScorer
from igw_sim.engine import EngineConfig
from igw_sim.fleet import SimFleet
from igw_sim.hf_tokenizer import HFTokenizer
from igw_sim.kvpublisher import KVEventsConfig

TOKENIZER = Path(__file__).resolve().parents[1] / "sim" / "data" / "hf-tokenizer"
MODEL = "sim-model"


def _config(zmq_port: int, *, tokenizer_model: str = MODEL) -> str:
    return precise_config(zmq_port, {tokenizer_model: str(TOKENIZER)})


@pytest.fixture
async def zmq_port() -> int:
    return free_port()


@pytest.fixture
async def hf_fleet(zmq_port: int) -> AsyncIterator[SimFleet]:
    config = EngineConfig(tokenizer=HFTokenizer.load(TOKENIZER), kv_blocks=2048, block_size=16, max_num_seqs=8)
    events = KVEventsConfig(endpoint=f"tcp://127.0.0.1:{zmq_port}")
    async with SimFleet(ports=[0, 0, 0], engine=config, models=(MODEL,), kv_events=events) as fleet:
        yield fleet


def _words(seed: int, n: int) -> str:
    words = ("river", "stone", "cloud", "maple", "ember", "harbor", "violet", "summit", "meadow", "canyon")
    return " ".join(words[(seed * 7 + i * 3 + i * i) % len(words)] for i in range(n))


def _completion(prompt: str, *, max_tokens: int = 4) -> dict[str, Any]:
    return {"model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "ignore_eos": True}


def _scorer(gw: Any) -> PrecisePrefixCacheScorer:
    plugin = gw.epp.config.plugins["precise-prefix-cache-scorer"]
    assert isinstance(plugin, PrecisePrefixCacheScorer)
    return plugin


async def _send(http: aiohttp.ClientSession, url: str, body: dict[str, Any], **headers: str) -> aiohttp.ClientResponse:
    async with http.post(f"{url}/v1/completions", json=body, headers=headers) as r:
        assert r.status == 200, await r.text()
        await r.read()
        return r


async def test_groups_follow_the_engines_that_really_hold_them(
    hf_fleet: SimFleet, zmq_port: int, start_gateway: GatewayFactory, http: aiohttp.ClientSession
) -> None:
    gw = await start_gateway(hf_fleet.addresses, config_text=_config(zmq_port), body_mode=BodyMode.BUFFERED,
                             datalayer=DataLayerSettings(scrape_interval=0.05))  # fmt: skip
    scorer = _scorer(gw)
    systems = [_words(100 + g, 300) for g in range(6)]
    served: dict[int, set[str]] = {g: set() for g in range(6)}
    cached: list[int] = []
    for round_ in range(3):
        for g, system in enumerate(systems):
            async with http.post(f"{gw.url}/v1/completions",
                                 json=_completion(f"{system}\nquestion {round_}: {_words(g * 10 + round_, 12)}")) as r:  # fmt: skip
                assert r.status == 200
                served[g].add(r.headers["x-igw-sim-endpoint"])
                usage = orjson.loads(await r.read())["usage"]
                if round_:
                    cached.append(int(usage["prompt_tokens_details"]["cached_tokens"]))
        await eventually(lambda: scorer.index.stats().keys > 0, within=3.0)
    assert all(len(endpoints) == 1 for endpoints in served.values()), served
    assert len({next(iter(e)) for e in served.values()}) >= 2  # the groups are spread over the engines
    assert all(c >= 256 for c in cached), cached  # every repeat hit the system prompt's blocks
    assert "no-tokens" not in scorer.fallbacks  # (a group's first request has no holder yet)
    assert scorer.index.stats().keys > 0


async def test_a_burst_sharing_a_prefix_lands_together_before_any_event(
    hf_fleet: SimFleet, zmq_port: int, start_gateway: GatewayFactory, http: aiohttp.ClientSession
) -> None:
    gw = await start_gateway(hf_fleet.addresses, config_text=_config(zmq_port), body_mode=BodyMode.BUFFERED,
                             datalayer=DataLayerSettings(scrape_interval=0.05))  # fmt: skip
    system = _words(7, 400)
    picks: list[str] = []

    async def one(i: int) -> None:
        async with http.post(f"{gw.url}/v1/completions", json=_completion(f"{system}\nq{i}", max_tokens=30)) as r:
            assert r.status == 200
            picks.append(r.headers["x-igw-sim-endpoint"])
            await r.read()

    async with asyncio.TaskGroup() as group:  # all sent at once: only speculative entries can guide them
        for i in range(6):
            group.create_task(one(i))
    assert len(set(picks)) == 1, picks


async def test_the_decision_shows_the_precise_score_of_the_holder(
    hf_fleet: SimFleet, zmq_port: int, start_gateway: GatewayFactory, http: aiohttp.ClientSession
) -> None:
    gw = await start_gateway(hf_fleet.addresses, config_text=_config(zmq_port), body_mode=BodyMode.BUFFERED,
                             observability=ObservabilitySettings(decision_header=True))  # fmt: skip
    scorer = _scorer(gw)
    # ZMQ's slow joiner: what an engine publishes before its connection to the EPP is up is lost
    # (vLLM's replay endpoint covers that in production); wait until events flow.
    for i in range(20):
        await _send(http, gw.url, _completion(f"warm-up {i} " + _words(i, 40)))
        if await eventually(lambda: scorer.index.stats().engine_hashes > 0, within=0.3):
            break
    system = _words(3, 320)
    async with http.post(f"{gw.url}/v1/completions", json=_completion(f"{system}\nfirst")) as r:
        holder = r.headers["x-igw-sim-endpoint"]
        await r.read()
    await asyncio.sleep(2.5)  # the speculative entry expires: what is left came from the engine's events
    assert await eventually(lambda: holder in scorer.index.endpoints(), within=3.0)
    async with http.post(f"{gw.url}/v1/completions", json=_completion(f"{system}\nsecond"),
                         headers={"x-igw-explain": "1"}) as r:  # fmt: skip
        decision = orjson.loads(r.headers["x-igw-decision"])
        await r.read()
    scores = {c["endpoint"]: c["scores"]["precise-prefix-cache-scorer"] for c in decision["candidates"]}
    assert scores[holder] > 0.8
    assert all(s == 0.0 for e, s in scores.items() if e != holder)
    assert decision["picked"] == holder


async def test_without_a_tokenizer_for_the_model_it_falls_back_and_counts_it(
    hf_fleet: SimFleet, zmq_port: int, start_gateway: GatewayFactory, http: aiohttp.ClientSession
) -> None:
    config = _config(zmq_port, tokenizer_model="some-other-model")
    gw = await start_gateway(hf_fleet.addresses, config_text=config, body_mode=BodyMode.BUFFERED)
    system = _words(5, 200)
    served = set()
    for i in range(4):
        async with http.post(f"{gw.url}/v1/completions", json=_completion(f"{system}\nq{i}")) as r:
            assert r.status == 200
            served.add(r.headers["x-igw-sim-endpoint"])
            await r.read()
    assert _scorer(gw).fallbacks == {"no-tokens": 4}
    assert len(served) == 1  # the approximate index still keeps the prefix together
    async with http.get(f"http://127.0.0.1:{gw.epp.metrics_port}/metrics") as r:
        text = await r.text()
    assert 'igw_precise_prefix_fallbacks_total{reason="no-tokens"} 4.0' in text
    assert "igw_kv_events_received_total" in text
