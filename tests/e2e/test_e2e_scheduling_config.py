"""EndpointPickerConfig profiles through a real Envoy: filters, affinity, explanations, shedding,
prefix affinity with the default configuration, the recent-decisions endpoint, LoRA affinity."""

from __future__ import annotations

import asyncio

import aiohttp
import orjson
from e2e_support import GatewayFactory, chat, eventually

from igw.config.pool import PoolSpec, parse_pool
from igw.config.settings import BodyMode, ObservabilitySettings
from igw_sim.config import EngineConfig
from igw_sim.fleet import SimFleet

HEAD = "apiVersion: inference.networking.x-k8s.io/v1alpha1\nkind: EndpointPickerConfig\n"

ZONED = (
    HEAD
    + """\
plugins:
- type: label-selector-filter
  name: zone-a
  parameters: {matchLabels: {zone: a}}
- type: session-affinity-scorer
- type: queue-scorer
- type: kv-cache-utilization-scorer
schedulingProfiles:
- name: default
  plugins:
  - pluginRef: zone-a
  - {pluginRef: session-affinity-scorer, weight: 10}
  - {pluginRef: queue-scorer, weight: 2}
  - {pluginRef: kv-cache-utilization-scorer, weight: 2}
"""
)


def zoned_pool(fleet: SimFleet, zones: list[str]) -> PoolSpec:
    endpoints = [{"address": a, "labels": {"zone": z}} for a, z in zip(fleet.addresses, zones, strict=True)]
    return parse_pool({"name": "zoned", "endpoints": endpoints, "objectives": [{"name": "batch", "priority": -1}]})


async def test_profile_from_a_config_file_filters_explains_and_sticks(
    fleet: SimFleet, start_gateway: GatewayFactory, http: aiohttp.ClientSession
) -> None:
    pool = zoned_pool(fleet, ["a", "b", "a"])
    zone_a = {fleet.addresses[0], fleet.addresses[2]}
    gw = await start_gateway(
        [], pool=pool, config_text=ZONED, body_mode=BodyMode.BUFFERED,
        observability=ObservabilitySettings(decision_header=True),
    )  # fmt: skip
    served: set[str] = set()
    for i in range(12):
        async with http.post(f"{gw.url}/v1/chat/completions", json=chat(f"z{i}")) as r:
            assert r.status == 200
            served.add(r.headers["x-igw-sim-endpoint"])
            assert "x-igw-decision" not in r.headers  # not asked for
    assert served <= zone_a

    async with http.post(f"{gw.url}/v1/chat/completions", json=chat("explain"), headers={"x-igw-explain": "1"}) as r:
        assert r.status == 200
        decision = orjson.loads(r.headers["x-igw-decision"])
        endpoint = r.headers["x-igw-sim-endpoint"]
        token = r.headers["x-session-token"]
    assert decision["picked"] == endpoint
    assert decision["filters"] == [{"name": "(pool)", "left": 3}, {"name": "zone-a", "left": 2}]
    assert {c["endpoint"] for c in decision["candidates"]} == zone_a
    assert decision["weights"] == {
        "session-affinity-scorer": 10.0,
        "queue-scorer": 2.0,
        "kv-cache-utilization-scorer": 2.0,
    }

    for i in range(8):  # the session token keeps a conversation on its endpoint
        async with http.post(
            f"{gw.url}/v1/chat/completions", json=chat(f"turn {i}"), headers={"x-session-token": token}
        ) as r:
            assert r.status == 200
            assert r.headers["x-igw-sim-endpoint"] == endpoint

    async with http.get(f"http://127.0.0.1:{gw.epp.metrics_port}/debug/decisions?limit=2&top=1") as r:
        assert r.status == 200
        recent = await r.json()
    assert len(recent["decisions"]) == 2
    assert all(len(d["candidates"]) == 1 for d in recent["decisions"])
    async with http.get(f"http://127.0.0.1:{gw.epp.metrics_port}/debug/decisions?limit=x") as r:
        assert r.status == 400


async def test_sheddable_objective_gets_429_from_a_saturated_pool(
    fleet: SimFleet, start_gateway: GatewayFactory, http: aiohttp.ClientSession
) -> None:
    # Metrics older than 1 ns are stale, so the utilization detector sees a saturated pool.
    config = HEAD + (
        "plugins:\n- type: queue-scorer\n"
        "- type: utilization-detector\n  name: strict\n  parameters: {metricsStalenessThreshold: 1ns}\n"
        "schedulingProfiles:\n- name: p\n  plugins: [{pluginRef: queue-scorer}]\n"
        "saturationDetector: {pluginRef: strict}\n"
    )
    gw = await start_gateway([], pool=zoned_pool(fleet, ["a", "a", "a"]), config_text=config)
    async with http.post(
        f"{gw.url}/v1/chat/completions", json=chat("later"), headers={"x-gateway-inference-objective": "batch"}
    ) as r:
        assert r.status == 429
        assert "sheddable" in (await r.json())["error"]["message"]
    async with http.post(f"{gw.url}/v1/chat/completions", json=chat("now")) as r:
        assert r.status == 200


async def test_default_configuration_keeps_a_shared_prefix_on_one_endpoint(
    fleet: SimFleet, start_gateway: GatewayFactory, http: aiohttp.ClientSession
) -> None:
    gw = await start_gateway(fleet.addresses)
    system = "You are a meticulous assistant who answers in full sentences. " * 20
    served = []
    for i in range(10):
        body = {"model": "sim-model", "max_tokens": 2,
                "messages": [{"role": "system", "content": system}, {"role": "user", "content": f"question {i}"}]}  # fmt: skip
        async with http.post(f"{gw.url}/v1/chat/completions", json=body) as r:
            assert r.status == 200
            served.append(r.headers["x-igw-sim-endpoint"])
    assert len(set(served)) == 1, served


LORA = (
    HEAD
    + """\
plugins:
- type: lora-affinity-scorer
- type: queue-scorer
schedulingProfiles:
- name: default
  plugins:
  - {pluginRef: lora-affinity-scorer, weight: 10}
  - {pluginRef: queue-scorer, weight: 1}
"""
)


async def test_lora_affinity_follows_the_adapters_the_servers_report(
    start_gateway: GatewayFactory, http: aiohttp.ClientSession
) -> None:
    engine = EngineConfig(max_num_seqs=8, prefill_overhead_ms=1, prefill_ms_per_token=0.0, itl_ms=40, max_loras=1,
                          lora_modules=(("sql-lora", "/adapters/sql"), ("chat-lora", "/adapters/chat")))  # fmt: skip
    async with SimFleet(ports=[0, 0, 0], engine=engine) as lora_fleet:
        gw = await start_gateway(lora_fleet.addresses, config_text=LORA, body_mode=BodyMode.BUFFERED)

        async def ask(model: str, tokens: int) -> str:
            body = {"model": model, "messages": [{"role": "user", "content": "q"}], "max_tokens": tokens}
            async with http.post(f"{gw.url}/v1/chat/completions", json=body) as r:
                assert r.status == 200, await r.text()
                return r.headers["x-igw-sim-endpoint"]

        # A long sql-lora request occupies the only adapter slot of one server...
        long_sql = asyncio.ensure_future(ask("sql-lora", 60))
        await eventually(lambda: any(e.running for e in lora_fleet.engines), within=3.0)
        sql_home = next(a for a, e in zip(lora_fleet.addresses, lora_fleet.engines, strict=True) if e.running)
        await asyncio.sleep(0.2)  # a few scrapes: the EPP sees sql-lora running there
        # ... further sql-lora requests join it (adapter active: 10 x 1.0 against 10 x 0.8 + at most 1 for the queue),
        sql = await asyncio.gather(*(ask("sql-lora", 2) for _ in range(4)))
        # ... and chat-lora requests stay away from the server whose slot is taken (0.0 there).
        chat = await asyncio.gather(*(ask("chat-lora", 2) for _ in range(4)))
        assert await long_sql == sql_home
        assert set(sql) == {sql_home}
        assert sql_home not in chat
