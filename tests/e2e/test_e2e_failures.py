"""Through real Envoy: bad input gets a clear status, clients can't steer, the EPP can die."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import pytest
from e2e_support import GatewayFactory, Trap, chat, eventually

from igw.app.envoy import UpstreamMode
from igw.config.settings import BodyMode
from igw_sim.fleet import SimFleet

pytestmark = pytest.mark.envoy


async def _post(http: aiohttp.ClientSession, url: str, body: Any, **kw: Any) -> tuple[int, Any]:
    kwargs = {"data": body} if isinstance(body, bytes) else {"json": body}
    async with http.post(url, headers={"content-type": "application/json"}, **kwargs, **kw) as r:
        return r.status, await r.json(content_type=None)


@pytest.mark.parametrize(
    ("path", "body", "status", "words"),
    [
        ("/v1/chat/completions", b'{"model": "sim-model", "messages": [', 400, "not valid JSON"),
        ("/v1/chat/completions", b"[1, 2]", 400, "JSON object"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}]}, 400, "model"),
        ("/v1/chat/completions", {"model": "sim-model"}, 400, "messages"),
        ("/v1/completions", {"model": "sim-model"}, 400, "prompt"),
        ("/v1/chat/completions", chat(model="no-such-model"), 404, "no-such-model"),
        ("/v1/chat/completions", chat(user="x" * 300_000), 413, "limit"),
    ],
    ids=["malformed-json", "not-an-object", "missing-model", "missing-messages", "missing-prompt",
         "unknown-model", "too-large"],
)  # fmt: skip
async def test_bad_input_gets_a_clear_error(
    fleet: SimFleet,
    start_gateway: GatewayFactory,
    http: aiohttp.ClientSession,
    path: str,
    body: Any,
    status: int,
    words: str,
) -> None:
    gw = await start_gateway(fleet.addresses, models=["sim-model"], max_body=256 * 1024)
    got, payload = await _post(http, gw.url + path, body)
    assert got == status
    assert payload["error"]["code"] == status
    assert words in payload["error"]["message"]
    assert await eventually(lambda: all(s.inflight == 0 for s in gw.epp.store.endpoints()))


async def test_empty_pool_answers_503(start_gateway: GatewayFactory, http: aiohttp.ClientSession) -> None:
    gw = await start_gateway([])
    got, payload = await _post(http, gw.url + "/v1/chat/completions", chat())
    assert got == 503
    assert "no endpoints" in payload["error"]["message"]


@pytest.mark.parametrize("upstream", list(UpstreamMode), ids=[m.value for m in UpstreamMode])
@pytest.mark.parametrize("epp_down", [False, True], ids=["epp-up", "epp-down"])
async def test_client_sent_destination_never_decides_the_upstream(
    fleet: SimFleet,
    start_gateway: GatewayFactory,
    http: aiohttp.ClientSession,
    trap: Trap,
    upstream: UpstreamMode,
    epp_down: bool,
) -> None:
    gw = await start_gateway(fleet.addresses, upstream=upstream, fail_open=True, body_mode=BodyMode.BUFFERED)
    if epp_down:
        await gw.epp.stop()
    spoof = {"x-gateway-destination-endpoint": trap.address}
    statuses = []
    for i in range(0, 100, 10):
        batch = [http.post(f"{gw.url}/v1/chat/completions", json=chat(f"s{i + j}"), headers=spoof) for j in range(10)]
        statuses.extend(await asyncio.gather(*(_status(b) for b in batch)))
    assert trap.hits == 0
    assert statuses == [200] * 100


async def _status(ctx: Any) -> int:
    async with ctx as r:
        await r.read()
        return int(r.status)


async def test_epp_down_fail_open_still_serves(
    fleet: SimFleet, start_gateway: GatewayFactory, http: aiohttp.ClientSession
) -> None:
    gw = await start_gateway(fleet.addresses, fail_open=True, body_mode=BodyMode.BUFFERED)
    await gw.epp.stop()
    for i in range(10):
        async with http.post(f"{gw.url}/v1/chat/completions", json=chat(f"o{i}")) as r:
            assert r.status == 200
            assert r.headers["x-igw-sim-endpoint"] in fleet.addresses


@pytest.mark.parametrize("body_mode", list(BodyMode), ids=["duplex", "buffered"])
async def test_epp_down_fail_close_is_a_clean_503(
    fleet: SimFleet, start_gateway: GatewayFactory, http: aiohttp.ClientSession, body_mode: BodyMode
) -> None:
    gw = await start_gateway(fleet.addresses, fail_open=False, body_mode=body_mode)
    await gw.epp.stop()
    for i in range(5):
        async with http.post(f"{gw.url}/v1/chat/completions", json=chat(f"c{i}")) as r:
            assert r.status == 503
            assert "x-igw-sim-endpoint" not in r.headers


@pytest.mark.parametrize("body_mode", list(BodyMode), ids=["duplex", "buffered"])
async def test_client_abort_releases_the_inflight_count(
    start_gateway: GatewayFactory, http: aiohttp.ClientSession, body_mode: BodyMode
) -> None:
    from e2e_support import FAST_ENGINE

    slow = FAST_ENGINE.__class__(max_num_seqs=4, prefill_overhead_ms=1, prefill_ms_per_token=0, itl_ms=50)
    async with SimFleet(ports=[0, 0], engine=slow) as fleet:
        gw = await start_gateway(fleet.addresses, body_mode=body_mode)
        body = chat("long", max_tokens=200, stream=True)
        resp = await http.post(f"{gw.url}/v1/chat/completions", json=body)
        assert resp.status == 200
        await resp.content.readline()
        await asyncio.sleep(0.2)  # the request is still streaming: it is still in flight
        assert sum(s.inflight for s in gw.epp.store.endpoints()) == 1
        resp.close()  # the client goes away mid-stream
        assert await eventually(lambda: sum(s.inflight for s in gw.epp.store.endpoints()) == 0)
        assert gw.epp.tracker.inflight == 0


async def test_over_the_inflight_limit_requests_are_shed_with_429(
    start_gateway: GatewayFactory, http: aiohttp.ClientSession
) -> None:
    from e2e_support import FAST_ENGINE

    slow = FAST_ENGINE.__class__(max_num_seqs=4, prefill_overhead_ms=1, prefill_ms_per_token=0, itl_ms=50)
    async with SimFleet(ports=[0], engine=slow) as fleet:
        gw = await start_gateway(fleet.addresses, max_inflight=1, body_mode=BodyMode.BUFFERED)
        held = await http.post(f"{gw.url}/v1/chat/completions", json=chat("hold", max_tokens=100, stream=True))
        assert held.status == 200
        got, payload = await _post(http, gw.url + "/v1/chat/completions", chat("one more"))
        assert got == 429
        assert "limit 1" in payload["error"]["message"]
        held.close()
        assert await eventually(lambda: gw.epp.tracker.inflight == 0)
        got, _ = await _post(http, gw.url + "/v1/chat/completions", chat("now it fits"))
        assert got == 200
