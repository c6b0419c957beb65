"""The EPP's health and metrics ports, as a gateway and a Prometheus server see them."""

from __future__ import annotations

import aiohttp
import grpc
import pytest
from e2e_support import GatewayFactory, chat
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from igw.app.epp import Epp
from igw.config.pool import pool_from_addresses
from igw.config.settings import EppSettings, ServerSettings
from igw_sim.fleet import SimFleet

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


async def _check(port: int, service: str) -> int:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        reply = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
        return int(reply.status)


async def test_grpc_health_services_follow_readiness() -> None:
    settings = EppSettings(server=ServerSettings(grpc_port=0, health_port=0, metrics_port=0))
    epp = Epp(settings, pool_from_addresses(["127.0.0.1:1"]))
    await epp.start()
    try:
        for service in ("liveness", "readiness", "envoy.service.ext_proc.v3.ExternalProcessor", ""):
            assert await _check(epp.health_port, service) == SERVING, service
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await _check(epp.health_port, "no-such-service")
        assert info.value.code() == grpc.StatusCode.NOT_FOUND
        await epp.health.set_ready(False)  # e.g. shutting down
        assert await _check(epp.health_port, "liveness") == SERVING
        assert await _check(epp.health_port, "readiness") == NOT_SERVING
        assert await _check(epp.health_port, "envoy.service.ext_proc.v3.ExternalProcessor") == NOT_SERVING
    finally:
        await epp.stop()


@pytest.mark.envoy
async def test_metrics_port_reports_requests_errors_and_the_pool(
    fleet: SimFleet, start_gateway: GatewayFactory, http: aiohttp.ClientSession
) -> None:
    gw = await start_gateway(fleet.addresses)
    for i in range(5):
        async with http.post(f"{gw.url}/v1/chat/completions", json=chat(f"m{i}")) as r:
            assert r.status == 200
    async with http.post(f"{gw.url}/v1/chat/completions", data=b"{oops") as r:
        assert r.status == 400
    epp = gw.epp
    async with http.get(f"http://127.0.0.1:{epp.metrics_port}/metrics") as r:
        assert r.status == 200
        text = await r.text()
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }
    ok = samples[("inference_objective_request_total",
                  (("model_name", "sim-model"), ("priority", "0"), ("target_model_name", "sim-model")))]  # fmt: skip
    assert ok == 5
    bad = samples[("inference_objective_request_error_total",
                   (("error_code", "BadRequest"), ("model_name", ""), ("target_model_name", "")))]  # fmt: skip
    assert bad == 1
    assert samples[("inference_pool_ready_pods", (("name", "default"),))] == 3
    assert any(name == "inference_extension_scheduler_e2e_duration_seconds_count" for name, _ in samples)
