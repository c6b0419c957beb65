"""Model rewrites through a real Envoy: the server gets the target model, the client sees its own."""

from __future__ import annotations

import aiohttp
import pytest
from e2e_support import GatewayFactory

from igw.config.settings import BodyMode
from igw.datalayer.rewrites import RewriteRule, RewriteTarget
from igw_sim.fleet import SimFleet


@pytest.mark.parametrize("body_mode", [BodyMode.BUFFERED, BodyMode.FULL_DUPLEX_STREAMED], ids=["buffered", "duplex"])
@pytest.mark.parametrize("stream", [False, True], ids=["json", "sse"])
async def test_rewritten_model_is_served_and_restored(
    fleet: SimFleet, start_gateway: GatewayFactory, http: aiohttp.ClientSession, body_mode: BodyMode, stream: bool
) -> None:
    gw = await start_gateway(fleet.addresses, body_mode=body_mode)
    gw.epp.rewrites.set_rules([RewriteRule("test/rule", frozenset({"alias"}), (RewriteTarget("sim-model"),))])
    body = {"model": "alias", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8, "stream": stream}
    async with http.post(f"{gw.url}/v1/chat/completions", json=body) as r:
        assert r.status == 200, await r.text()
        text = await r.text()
    assert '"model":"sim-model"' not in text.replace(" ", "")
    assert text.count('"model":"alias"') + text.count('"model": "alias"') >= (3 if stream else 1)
    # the untouched path: no rule for this model, no rewrite
    async with http.post(f"{gw.url}/v1/chat/completions", json={**body, "model": "sim-model"}) as r:
        assert r.status == 200
        assert '"model":"sim-model"' in (await r.text()).replace(" ", "")
