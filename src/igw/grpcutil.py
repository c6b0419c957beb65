"""Small gRPC helpers shared by the servers."""

from __future__ import annotations

import grpc


def bind_port(server: grpc.aio.Server, host: str, port: int, *, what: str) -> int:
    """Bind a grpc.aio server; grpc's RuntimeError becomes an OSError that names the port."""
    try:
        bound = server.add_insecure_port(f"{host}:{port}")
    except RuntimeError:
        bound = 0
    if bound == 0:
        raise OSError(f"cannot bind the {what} port {host}:{port} (in use?)")
    return int(bound)
