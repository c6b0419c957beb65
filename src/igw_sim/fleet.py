"""Run N simulated endpoints, one engine and one port each, inside the current event loop.

Usage::

    async with SimFleet(ports=[0, 0], engine=EngineConfig(max_num_seqs=4)) as fleet:
        url = f"http://{fleet.addresses[0]}/v1/completions"

Port 0 picks a free port; :attr:`SimFleet.addresses` always reports the real ``host:port``. Endpoints
share nothing but the event loop. With ``kv_events``, each endpoint publishes its KV-cache events on its
own PUB socket (topic ``kv@<host:port>@<first model>`` unless configured; the ``i``-th endpoint's bound
addresses are offset by ``i``, see :func:`igw_sim.kvpublisher.offset_endpoint`). On exit, in-flight
requests get :data:`SHUTDOWN_GRACE_S` to finish, then their handlers are cancelled (which frees the
engines' slots). An injected crash stops that endpoint's listener for good.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from types import TracebackType

from aiohttp import web

from igw_sim.engine import Engine, EngineConfig
from igw_sim.faults import Faults
from igw_sim.kvpublisher import KVEventsConfig, ZmqEventPublisher, default_topic, offset_endpoint
from igw_sim.metrics import MetricsStyle
from igw_sim.server import SimServer

__all__ = ["SHUTDOWN_GRACE_S", "SimFleet"]

SHUTDOWN_GRACE_S = 0.5
"""How long a stopping endpoint waits for in-flight requests before cancelling them."""


class SimFleet:
    """Simulated vLLM endpoints on ``ports`` (async context manager; also :meth:`start`/:meth:`stop`).

    ``engine`` configures every endpoint's engine; ``models`` are the served model names (the first one
    labels the metrics). ``faults`` is copied per endpoint (each gets its own seeded generator).
    Binding failures (a port in use) raise ``OSError`` from :meth:`start`, after the endpoints already
    started are stopped again.
    """

    def __init__(
        self,
        *,
        ports: Sequence[int],
        host: str = "127.0.0.1",
        engine: EngineConfig | None = None,
        models: Sequence[str] = ("sim-model",),
        metrics_style: MetricsStyle = "vllm",
        kv_events: KVEventsConfig | None = None,
        faults: Faults | None = None,
        tokenizer_path: str | None = None,
    ) -> None:
        if not ports:
            raise ValueError("at least one port is required")
        self.host = host
        self.ports = list(ports)
        self.engine_config = engine if engine is not None else EngineConfig()
        self.models = tuple(models)
        self.metrics_style: MetricsStyle = metrics_style
        self.kv_events = kv_events
        self.faults = faults
        self.tokenizer_path = tokenizer_path
        self.servers: list[SimServer] = []
        self._runners: list[web.AppRunner] = []
        self._stopping: set[asyncio.Task[None]] = set()

    @property
    def engines(self) -> list[Engine]:
        """The engines, in the order of ``ports``."""
        return [server.engine for server in self.servers]

    @property
    def addresses(self) -> list[str]:
        """``"host:port"`` of each started endpoint, in the order of ``ports``."""
        return [server.endpoint for server in self.servers]

    async def start(self) -> None:
        """Bind and serve every endpoint. Not re-entrant: call once."""
        if self._runners:
            raise RuntimeError("SimFleet already started")
        try:
            for index, port in enumerate(self.ports):
                await self._start_one(index, port)
        except BaseException:
            await self.stop()
            raise

    def _faults(self, index: int) -> Faults:
        base = self.faults
        if base is None:
            return Faults()
        return Faults(
            error_rate=base.error_rate,
            error_kinds=base.error_kinds,
            unhealthy=base.unhealthy,
            seed=base.seed + index,
        )

    async def _start_one(self, index: int, port: int) -> None:
        server = SimServer(
            Engine(self.engine_config),
            models=self.models,
            metrics_style=self.metrics_style,
            faults=self._faults(index),
            tokenizer_path=self.tokenizer_path,
        )
        runner = web.AppRunner(
            server.build_app(),
            handler_cancellation=True,
            access_log=None,
            shutdown_timeout=SHUTDOWN_GRACE_S,
        )
        await runner.setup()
        self._runners.append(runner)
        self.servers.append(server)
        site = web.TCPSite(runner, self.host, port)
        await site.start()
        real_port = int(runner.addresses[0][1])
        host = f"[{self.host}]" if ":" in self.host else self.host
        server.endpoint = f"{host}:{real_port}"
        server.on_crash = lambda: self._crashed(index)
        if self.kv_events is not None:
            server.attach_publisher(self._publisher(index, server))

    def _publisher(self, index: int, server: SimServer) -> ZmqEventPublisher:
        cfg = self.kv_events
        assert cfg is not None
        if cfg.topic is None:
            topic = default_topic(server.endpoint, self.models[0])
        else:
            topic = cfg.topic.format(endpoint=server.endpoint, model=self.models[0])
        replay = None if cfg.replay_endpoint is None else offset_endpoint(cfg.replay_endpoint, index, bound=True)
        return ZmqEventPublisher(
            endpoint=offset_endpoint(cfg.endpoint, index),
            topic=topic,
            replay_endpoint=replay,
            event_format=cfg.event_format,
            int_hashes=cfg.int_hashes,
            buffer_steps=cfg.buffer_steps,
            hwm=cfg.hwm,
        )

    def _crashed(self, index: int) -> None:
        task = asyncio.get_running_loop().create_task(self.stop_endpoint(index), name="igw-sim-crash")
        self._stopping.add(task)
        task.add_done_callback(self._stopping.discard)

    async def stop_endpoint(self, index: int) -> None:
        """Stop one endpoint (it stops answering, ``/metrics`` included); the others keep serving."""
        if index < len(self._runners):
            await self._runners[index].cleanup()
        await self._close_server(self.servers[index])

    async def _close_server(self, server: SimServer) -> None:
        await server.engine.aclose()
        if server.kv_publisher is not None:
            publisher, server.kv_publisher = server.kv_publisher, None
            await publisher.aclose()

    async def stop(self) -> None:
        """Stop every endpoint (idempotent)."""
        if self._stopping:
            await asyncio.gather(*self._stopping, return_exceptions=True)
        runners, self._runners = self._runners, []
        for runner in reversed(runners):
            await runner.cleanup()
        for server in self.servers:
            await self._close_server(server)

    async def __aenter__(self) -> SimFleet:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()
