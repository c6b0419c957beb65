"""Run N simulated endpoints, one engine and one port each, inside the current event loop.

Usage::

    async with SimFleet(ports=[0, 0], engine=EngineConfig(max_num_seqs=4)) as fleet:
        url = f"http://{fleet.addresses[0]}/v1/completions"

Port 0 picks a free port; :attr:`SimFleet.addresses` always reports the real ``host:port``. Endpoints
share nothing but the event loop. On exit, in-flight requests get :data:`SHUTDOWN_GRACE_S` to finish,
then their handlers are cancelled (which frees the engines' slots).
"""

from __future__ import annotations

from collections.abc import Sequence
from types import TracebackType

from aiohttp import web

from igw_sim.engine import Engine, EngineConfig
from igw_sim.server import SimServer

__all__ = ["SHUTDOWN_GRACE_S", "SimFleet"]

SHUTDOWN_GRACE_S = 0.5
"""How long a stopping endpoint waits for in-flight requests before cancelling them."""


class SimFleet:
    """Simulated vLLM endpoints on ``ports`` (async context manager; also :meth:`start`/:meth:`stop`).

    ``engine`` configures every endpoint's engine; ``models`` are the served model names (the first one
    labels the metrics). Binding failures (a port in use) raise ``OSError`` from :meth:`start`, after the
    endpoints already started are stopped again.
    """

    def __init__(
        self,
        *,
        ports: Sequence[int],
        host: str = "127.0.0.1",
        engine: EngineConfig | None = None,
        models: Sequence[str] = ("sim-model",),
    ) -> None:
        if not ports:
            raise ValueError("at least one port is required")
        self.host = host
        self.ports = list(ports)
        self.engine_config = engine if engine is not None else EngineConfig()
        self.models = tuple(models)
        self.servers: list[SimServer] = []
        self._runners: list[web.AppRunner] = []

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
            for port in self.ports:
                await self._start_one(port)
        except BaseException:
            await self.stop()
            raise

    async def _start_one(self, port: int) -> None:
        server = SimServer(Engine(self.engine_config), models=self.models)
        runner = web.AppRunner(
            server.build_app(),
            handler_cancellation=True,
            access_log=None,
            shutdown_timeout=SHUTDOWN_GRACE_S,
        )
        await runner.setup()
        self._runners.append(runner)
        site = web.TCPSite(runner, self.host, port)
        await site.start()
        real_port = int(runner.addresses[0][1])
        host = f"[{self.host}]" if ":" in self.host else self.host
        server.endpoint = f"{host}:{real_port}"
        self.servers.append(server)

    async def stop_endpoint(self, index: int) -> None:
        """Stop one endpoint (it stops answering, ``/metrics`` included); the others keep serving."""
        await self._runners[index].cleanup()

    async def stop(self) -> None:
        """Stop every endpoint (idempotent)."""
        runners, self._runners = self._runners, []
        for runner in reversed(runners):
            await runner.cleanup()

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
