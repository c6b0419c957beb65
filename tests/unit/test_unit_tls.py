"""TLS on the ext_proc port: self-signed or from --cert-path, reloaded when the files change."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from igw.app.epp import Epp
from igw.config.pool import pool_from_addresses
from igw.config.settings import EppSettings, ServerSettings
from igw.grpcutil import self_signed_certificate


def settings(**tls: object) -> EppSettings:
    server = ServerSettings(grpc_port=0, health_port=0, metrics_port=-1, drain_seconds=0.1, secure_serving=True,
                            health_checking=True, **tls)  # type: ignore[arg-type]  # fmt: skip
    return EppSettings(server=server)


async def health_over_tls(port: int, root: bytes) -> int:
    creds = grpc.ssl_channel_credentials(root_certificates=root)
    options = [("grpc.ssl_target_name_override", "localhost")]
    async with grpc.aio.secure_channel(f"127.0.0.1:{port}", creds, options=options) as channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service="envoy.service.ext_proc.v3.ExternalProcessor"), timeout=3
        )
        return int(reply.status)


def write_pair(directory: Path) -> bytes:
    key, cert = self_signed_certificate(["localhost"])
    (directory / "tls.key").write_bytes(key)
    (directory / "tls.crt").write_bytes(cert)
    return cert


async def test_self_signed_tls_serves_and_refuses_plaintext() -> None:
    async with Epp(settings(), pool_from_addresses(["127.0.0.1:9"])) as epp:
        # The certificate is made at start-up: trust whatever the server presents.
        pem = await asyncio.to_thread(lambda: __import__("ssl").get_server_certificate(("127.0.0.1", epp.grpc_port)))
        assert await health_over_tls(epp.grpc_port, pem.encode()) == health_pb2.HealthCheckResponse.SERVING
        async with grpc.aio.insecure_channel(f"127.0.0.1:{epp.grpc_port}") as channel:
            with pytest.raises(grpc.aio.AioRpcError):
                await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=2)


async def test_certificate_from_cert_path_and_reload(tmp_path: Path) -> None:
    first = write_pair(tmp_path)
    async with Epp(
        settings(cert_path=str(tmp_path), enable_cert_reload=True), pool_from_addresses(["127.0.0.1:9"])
    ) as epp:
        assert await health_over_tls(epp.grpc_port, first) == health_pb2.HealthCheckResponse.SERVING
        second = write_pair(tmp_path)
        stat = (tmp_path / "tls.crt").stat()
        os.utime(tmp_path / "tls.crt", (stat.st_atime + 5, stat.st_mtime + 5))  # a visible change
        assert await health_over_tls(epp.grpc_port, second) == health_pb2.HealthCheckResponse.SERVING


async def test_missing_certificate_files_are_a_clear_error(tmp_path: Path) -> None:
    epp = Epp(settings(cert_path=str(tmp_path)), pool_from_addresses(["127.0.0.1:9"]))
    with pytest.raises(OSError, match=r"cannot read tls\.crt and tls\.key"):
        await epp.start()
