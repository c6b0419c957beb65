"""Through real Envoy: picks are followed, streams stay streams, big bodies pass, hints and fallbacks."""

from __future__ import annotations

import asyncio
import hashlib
import io
import time
from typing import Any

import aiohttp
import orjson
import pytest
from e2e_support import FAST_ENGINE, GatewayFactory, chat, eventually, free_port

from igw.config.settings import BodyMode, DataLayerSettings
from igw_sim.fleet import SimFleet

pytestmark = pytest.mark.envoy

BOTH_MODES = pytest.mark.parametrize(
    "body_mode", [BodyMode.FULL_DUPLEX_STREAMED, BodyMode.BUFFERED], ids=["duplex", "buffered"]
)


@BOTH_MODES
async def test_requests_land_on_the_picked_endpoint(
    fleet: SimFleet, start_gateway: GatewayFactory, http: aiohttp.ClientSession, body_mode: BodyMode
) -> None:
    gw = await start_gateway(fleet.addresses, body_mode=body_mode)
    served: dict[str, str] = {}
    for i in range(30):
        async with http.post(
            f"{gw.url}/v1/chat/completions", json=chat(f"q{i}"), headers={"x-request-id": f"r{i}"}
        ) as r:
            assert r.status == 200, await r.text()
            served[f"r{i}"] = r.headers["x-igw-sim-endpoint"]
    for rid, endpoint in served.items():
        assert gw.picks.by_request[rid][0] == endpoint
    assert len(set(served.values())) > 1, "the load-aware picker should use more than one endpoint"
    assert await eventually(lambda: all(s.inflight == 0 for s in gw.epp.store.endpoints()))


async def test_request_id_is_generated_when_missing(
    fleet: SimFleet, start_gateway: GatewayFactory, http: aiohttp.ClientSession
) -> None:
    gw = await start_gateway(fleet.addresses)
    async with http.post(f"{gw.url}/v1/chat/completions", json=chat(), skip_auto_headers=["x-request-id"]) as r:
        assert r.status == 200
        request_id = r.headers.get("x-request-id")  # the simulator echoes what it received
    assert request_id
    assert request_id in gw.picks.by_request


@BOTH_MODES
async def test_streamed_response_arrives_chunk_by_chunk_and_intact(
    start_gateway: GatewayFactory, http: aiohttp.ClientSession, body_mode: BodyMode
) -> None:
    slow = FAST_ENGINE.__class__(max_num_seqs=4, prefill_overhead_ms=1, prefill_ms_per_token=0, itl_ms=25)
    async with SimFleet(ports=[0, 0], engine=slow) as fleet:
        gw = await start_gateway(fleet.addresses, body_mode=body_mode)
        body = chat("tell me", max_tokens=12, stream=True, stream_options={"include_usage": True})
        arrivals: list[float] = []
        events: list[Any] = []
        async with http.post(f"{gw.url}/v1/chat/completions", json=body) as r:
            assert r.status == 200
            assert r.headers["content-type"].startswith("text/event-stream")
            async for line in r.content:
                if line.startswith(b"data: "):
                    arrivals.append(time.perf_counter())
                    payload = line[6:].strip()
                    events.append(payload if payload == b"[DONE]" else orjson.loads(payload))
    assert events[-1] == b"[DONE]"
    usage = events[-2]["usage"]
    tokens = [e for e in events[:-2] if e["choices"]]
    assert len(tokens) == 12 == usage["completion_tokens"]
    # 12 tokens 25 ms apart: a buffered response would deliver them all at once
    assert arrivals[len(tokens) - 1] - arrivals[0] > 0.15


@BOTH_MODES
async def test_10_mib_body_passes_intact(
    fleet: SimFleet, start_gateway: GatewayFactory, http: aiohttp.ClientSession, body_mode: BodyMode
) -> None:
    gw = await start_gateway(fleet.addresses, body_mode=body_mode)
    body = orjson.dumps(chat("big", user="u" * (10 * 1024 * 1024)))
    async with http.post(
        f"{gw.url}/v1/chat/completions", data=io.BytesIO(body), headers={"content-type": "application/json"}
    ) as r:
        assert r.status == 200, await r.text()
        assert int(r.headers["x-igw-sim-body-bytes"]) == len(body)
        assert r.headers["x-igw-sim-body-sha256"] == hashlib.sha256(body).hexdigest()


async def test_17_mib_body_passes_in_duplex_mode(
    fleet: SimFleet, start_gateway: GatewayFactory, http: aiohttp.ClientSession
) -> None:
    gw = await start_gateway(fleet.addresses)
    body = orjson.dumps(chat("bigger", user="v" * (17 * 1024 * 1024)))
    async with http.post(
        f"{gw.url}/v1/chat/completions", data=io.BytesIO(body), headers={"content-type": "application/json"}
    ) as r:
        assert r.status == 200, await r.text()
        assert r.headers["x-igw-sim-body-sha256"] == hashlib.sha256(body).hexdigest()


async def test_subset_hint_restricts_the_choice(
    fleet: SimFleet, start_gateway: GatewayFactory, http: aiohttp.ClientSession
) -> None:
    allowed = fleet.addresses[1]

    def send_hint(bootstrap: dict[str, Any]) -> None:
        """Act like a gateway that narrows the candidates: set the hint metadata, forward it."""
        hcm = bootstrap["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
        ext_proc = hcm["http_filters"][0]["typed_config"]
        ext_proc["metadata_options"]["forwarding_namespaces"] = {"untyped": ["envoy.lb.subset_hint"]}
        hcm["http_filters"].insert(0, {
            "name": "envoy.filters.http.set_metadata",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.http.set_metadata.v3.Config",
                "metadata": [{"metadata_namespace": "envoy.lb.subset_hint",
                              "value": {"x-gateway-destination-endpoint-subset": [allowed]}}],
            },
        })  # fmt: skip

    gw = await start_gateway(fleet.addresses, edit_bootstrap=send_hint)
    for i in range(12):
        async with http.post(f"{gw.url}/v1/chat/completions", json=chat(f"h{i}")) as r:
            assert r.status == 200
            assert r.headers["x-igw-sim-endpoint"] == allowed


async def test_fallbacks_are_listed_and_walked_when_the_pick_is_down(
    fleet: SimFleet, start_gateway: GatewayFactory, http: aiohttp.ClientSession
) -> None:
    dead = f"127.0.0.1:{free_port()}"  # nothing listens here
    # Keep the dead endpoint eligible (no staleness, no failure limit) so that it gets picked.
    blind = DataLayerSettings(scrape_interval=0.02, staleness_threshold=float("inf"), max_consecutive_failures=10**9)
    gw = await start_gateway([*fleet.addresses, dead], fallbacks=2, datalayer=blind)
    for i in range(24):
        async with http.post(
            f"{gw.url}/v1/chat/completions", json=chat(f"f{i}"), headers={"x-request-id": f"f{i}"}
        ) as r:
            assert r.status == 200, await r.text()
            assert r.headers["x-igw-sim-endpoint"] != dead
    destinations = [dest for _, dest in gw.picks.by_request.values()]
    for dest in destinations:
        hosts = dest.split(",")
        assert len(hosts) == 3
        assert len(set(hosts)) == 3
        assert set(hosts) <= {*fleet.addresses, dead}
    assert any(dest.startswith(dead) for dest in destinations), "the dead endpoint should have been picked first"


async def test_an_endpoint_that_stops_answering_stops_being_picked(
    start_gateway: GatewayFactory, http: aiohttp.ClientSession
) -> None:
    async with SimFleet(ports=[0, 0, 0], engine=FAST_ENGINE) as fleet:
        gw = await start_gateway(fleet.addresses, datalayer=DataLayerSettings(scrape_interval=0.02))
        gone = fleet.addresses[0]
        await fleet.stop_endpoint(0)
        await asyncio.sleep(0.3)
        for i in range(20):
            async with http.post(f"{gw.url}/v1/chat/completions", json=chat(f"s{i}")) as r:
                assert r.status == 200
                assert r.headers["x-igw-sim-endpoint"] != gone
        state = gw.epp.store.get(gone)
        assert state is not None
        assert state.failures >= 3


@BOTH_MODES
async def test_chunked_upload_without_content_length(
    fleet: SimFleet, start_gateway: GatewayFactory, http: aiohttp.ClientSession, body_mode: BodyMode
) -> None:
    gw = await start_gateway(fleet.addresses, body_mode=body_mode)
    body = orjson.dumps(chat("chunked", user="c" * 300_000))

    async def pieces() -> Any:
        for i in range(0, len(body), 50_000):
            yield body[i : i + 50_000]
            await asyncio.sleep(0.01)

    async with http.post(
        f"{gw.url}/v1/chat/completions", data=pieces(), headers={"content-type": "application/json"}
    ) as r:
        assert r.status == 200, await r.text()
        assert r.headers["x-igw-sim-body-sha256"] == hashlib.sha256(body).hexdigest()


async def test_envoy_reaches_a_tls_endpoint_picker(
    fleet: SimFleet, start_gateway: GatewayFactory, http: aiohttp.ClientSession
) -> None:
    gw = await start_gateway(fleet.addresses, secure=True, body_mode=BodyMode.BUFFERED)
    for i in range(6):
        async with http.post(
            f"{gw.url}/v1/chat/completions", json=chat(f"tls{i}"), headers={"x-request-id": f"t{i}"}
        ) as r:
            assert r.status == 200, await r.text()
            assert r.headers["x-igw-sim-endpoint"] == gw.picks.by_request[f"t{i}"][0]
