"""Fixtures for tests through a real Envoy: a simulated fleet and an in-process EPP + Envoy.

The EPP runs on the test's event loop so tests can look at its state (picks, in-flight
counts); Envoy is a real child process with the bootstrap ``igw run`` generates.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from igw.api.context import RequestContext
from igw.app.envoy import EnvoySettings, UpstreamMode
from igw.app.gateway import Gateway, GatewaySettings
from igw.config.pool import PoolSpec, pool_from_addresses
from igw.config.settings import (
    AdmissionSettings,
    BodyMode,
    DataLayerSettings,
    EppSettings,
    ObservabilitySettings,
    SchedulingSettings,
    ServerSettings,
)
from igw_sim.engine import EngineConfig
from igw_sim.fleet import SimFleet

pytestmark = pytest.mark.envoy


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Picks:
    """Every pick the EPP made: request id -> (primary, destination list)."""

    by_request: dict[str, tuple[str, str]] = field(default_factory=dict)


@dataclass
class RunningGateway:
    gateway: Gateway
    url: str
    picks: Picks

    @property
    def epp(self) -> Any:
        return self.gateway.epp


class _EditableGateway(Gateway):
    """Lets a test change the generated bootstrap (to act like a gateway that sends subset hints)."""

    def __init__(
        self,
        settings: GatewaySettings,
        pool: Any,
        edit: Callable[[dict[str, Any]], None] | None,
        config_text: str | None = None,
    ) -> None:
        super().__init__(settings, pool, config_text=config_text, config_source="test configuration")
        self._edit = edit

    def bootstrap(self) -> dict[str, Any]:
        bootstrap = super().bootstrap()
        if self._edit is not None:
            self._edit(bootstrap)
        return bootstrap


GatewayFactory = Callable[..., Awaitable[RunningGateway]]

FAST_ENGINE = EngineConfig(max_num_seqs=8, prefill_overhead_ms=1, prefill_ms_per_token=0.0, itl_ms=2)


@pytest.fixture
async def fleet() -> AsyncIterator[SimFleet]:
    async with SimFleet(ports=[0, 0, 0], engine=FAST_ENGINE) as f:
        yield f


@pytest.fixture
async def start_gateway() -> AsyncIterator[GatewayFactory]:
    started: list[Gateway] = []

    async def start(
        addresses: list[str],
        *,
        body_mode: BodyMode = BodyMode.FULL_DUPLEX_STREAMED,
        fail_open: bool | None = None,
        upstream: UpstreamMode = UpstreamMode.OVERRIDE_HOST,
        fallbacks: int = 0,
        max_body: int = 32 * 1024 * 1024,
        datalayer: DataLayerSettings | None = None,
        models: list[str] | None = None,
        max_inflight: int = 0,
        edit_bootstrap: Callable[[dict[str, Any]], None] | None = None,
        config_text: str | None = None,
        pool: PoolSpec | None = None,
        observability: ObservabilitySettings | None = None,
        secure: bool = False,
    ) -> RunningGateway:
        if fail_open is None:  # Envoy fails open only in buffered mode
            fail_open = body_mode is BodyMode.BUFFERED
        epp_settings = EppSettings(
            server=ServerSettings(
                grpc_port=0,
                health_port=0,
                metrics_port=0,
                max_request_body_bytes=max_body,
                default_body_mode=body_mode,
                drain_seconds=0.5,
                secure_serving=secure,
                health_checking=secure,
            ),
            datalayer=datalayer or DataLayerSettings(scrape_interval=0.02),
            scheduling=SchedulingSettings(fallbacks=fallbacks),
            admission=AdmissionSettings(max_inflight_requests=max_inflight),
            observability=observability or ObservabilitySettings(),
        )
        envoy = EnvoySettings(
            listen_port=free_port(), admin_port=free_port(), upstream=upstream, fail_open=fail_open,
            body_mode=body_mode, max_request_body_bytes=max_body, retries=fallbacks, message_timeout_s=5,
            epp_tls=secure,
        )  # fmt: skip
        if pool is None:
            pool = pool_from_addresses(addresses, models=models) if addresses else pool_from_addresses([])
        gw = _EditableGateway(GatewaySettings(epp=epp_settings, envoy=envoy), pool, edit_bootstrap, config_text)
        picks = Picks()
        tracker = gw.epp.tracker
        original = tracker.started

        def record(ctx: RequestContext, address: str) -> None:
            picks.by_request[ctx.request_id] = (address, ctx.destination or "")
            original(ctx, address)

        tracker.started = record  # type: ignore[method-assign]
        started.append(gw)
        await gw.start()
        return RunningGateway(gw, gw.url, picks)

    yield start
    for gw in started:
        await gw.stop()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
        yield session


@dataclass
class Trap:
    """An HTTP server outside the pool that counts every request it gets."""

    address: str
    hits: int = 0


@pytest.fixture
async def trap() -> AsyncIterator[Trap]:
    port = free_port()
    t = Trap(address=f"127.0.0.1:{port}")

    async def handler(_: web.Request) -> web.Response:
        t.hits += 1
        return web.Response(text="trap")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handler)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    yield t
    await runner.cleanup()


async def eventually(condition: Callable[[], bool], *, within: float = 3.0) -> bool:
    """Poll ``condition`` until it holds or ``within`` seconds pass; return its last value."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while not condition():
        if loop.time() > deadline:
            return False
        await asyncio.sleep(0.01)
    return True


def chat(content: str = "hello", **extra: Any) -> dict[str, Any]:
    return {"model": "sim-model", "messages": [{"role": "user", "content": content}], "max_tokens": 4, **extra}


__all__ = ["FAST_ENGINE", "RunningGateway", "Trap", "chat", "eventually", "free_port"]


def precise_config(zmq_port: int, tokenizers: dict[str, str], *, prefix: int = 3, queue: int = 1, kv: int = 1) -> str:
    """An EndpointPickerConfig with the precise prefix scorer (bound on ``zmq_port`` for the engines'
    KV events, one tokenizer directory per model), the queue and KV scorers, and these weights."""
    models = ", ".join(f'{model}: "{path}"' for model, path in tokenizers.items())
    return f"""
apiVersion: inference.networking.x-k8s.io/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: precise-prefix-cache-scorer
  parameters:
    kvEvents: {{bind: "tcp://127.0.0.1:{zmq_port}"}}
    tokenizers: {{{models}}}
- type: queue-scorer
- type: kv-cache-utilization-scorer
schedulingProfiles:
- name: default
  plugins:
  - {{pluginRef: precise-prefix-cache-scorer, weight: {prefix}}}
  - {{pluginRef: queue-scorer, weight: {queue}}}
  - {{pluginRef: kv-cache-utilization-scorer, weight: {kv}}}
"""
