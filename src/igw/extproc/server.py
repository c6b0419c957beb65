"""The grpc.aio servers: ext_proc on one port, gRPC health on its own port.

The servicer only moves messages between the stream and an :class:`ExtProcSession`; the
stream's end (normal, client abort, proxy reset) always reaches ``session.finish()``.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Any

import grpc
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as ep_grpc
from grpc_health.v1 import health_pb2_grpc

from igw.config.settings import ServerSettings
from igw.extproc.session import ExtProcSession, ProtocolError
from igw.grpcutil import bind_port, server_credentials
from igw.observability.metrics import EppMetrics
from igw.requestcontrol.director import Director

log = logging.getLogger("igw.extproc")


class ExternalProcessor(ep_grpc.ExternalProcessorServicer):  # type: ignore[misc]
    def __init__(self, director: Director, settings: ServerSettings, metrics: EppMetrics) -> None:
        self._director = director
        self._settings = settings
        self._metrics = metrics

    async def Process(self, request_iterator: AsyncIterator[Any], context: Any) -> AsyncIterator[Any]:
        session = ExtProcSession(self._director, self._settings)
        streams = self._metrics.streams
        streams.inc()
        try:
            async for msg in request_iterator:
                try:
                    replies = await session.handle(msg)
                except ProtocolError as exc:
                    self._metrics.protocol_errors.inc()
                    log.warning("ext_proc protocol error: %s", exc)
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
                    return
                for reply in replies:
                    yield reply
        finally:
            session.finish()
            streams.dec()


def _options(settings: ServerSettings) -> list[tuple[str, int]]:
    limit = settings.max_request_body_bytes + 4 * 1024 * 1024
    return [
        ("grpc.max_receive_message_length", limit),
        ("grpc.max_send_message_length", limit),
        ("grpc.so_reuseport", 0),  # a second EPP on the same port must fail, not share it
        ("grpc.max_concurrent_streams", 100_000),
        ("grpc.http2.max_pings_without_data", 0),
        ("grpc.keepalive_permit_without_calls", 1),
    ]


async def start_extproc_server(
    director: Director, settings: ServerSettings, metrics: EppMetrics, *, health: Any = None
) -> tuple[grpc.aio.Server, int]:
    server = grpc.aio.server(options=_options(settings))
    ep_grpc.add_ExternalProcessorServicer_to_server(ExternalProcessor(director, settings, metrics), server)
    if health is not None:  # --health-checking: gRPC health on the ext_proc port too
        health_pb2_grpc.add_HealthServicer_to_server(health, server)
    credentials = (
        server_credentials(settings.cert_path, reload=settings.enable_cert_reload) if settings.secure_serving else None
    )
    port = bind_port(server, settings.host, settings.grpc_port, what="ext_proc", credentials=credentials)
    await server.start()
    return server, port
