"""gRPC health on its own port, as gateways probe the reference EPP.

Services: ``liveness`` (serving while the process answers), ``readiness``, ``""`` and the
ext_proc service name (serving once the pool is synced and the servers are up).
"""

from __future__ import annotations

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from igw.config.settings import ServerSettings
from igw.grpcutil import bind_port

EXT_PROC_SERVICE = "envoy.service.ext_proc.v3.ExternalProcessor"
HEALTH_SERVICES = ("", "liveness", "readiness", EXT_PROC_SERVICE)


class HealthState:
    """gRPC health: ``liveness`` serves while the process answers; the others follow readiness."""

    def __init__(self) -> None:
        self.servicer = health.aio.HealthServicer()
        self.ready = False

    async def set_ready(self, ready: bool) -> None:
        self.ready = ready
        status = health_pb2.HealthCheckResponse.SERVING if ready else health_pb2.HealthCheckResponse.NOT_SERVING
        await self.servicer.set("liveness", health_pb2.HealthCheckResponse.SERVING)
        for name in HEALTH_SERVICES:
            if name != "liveness":
                await self.servicer.set(name, status)

    async def shutdown(self) -> None:
        await self.servicer.enter_graceful_shutdown()


async def start_health_server(settings: ServerSettings, state: HealthState) -> tuple[grpc.aio.Server, int]:
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    health_pb2_grpc.add_HealthServicer_to_server(state.servicer, server)
    port = bind_port(server, settings.host, settings.health_port, what="health")
    await state.set_ready(False)
    await server.start()
    return server, port
