"""The scrape client against raw TCP servers that answer exactly what each case needs."""

from __future__ import annotations

import asyncio
import shutil
import ssl
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from igw.datalayer.httpget import HttpGetter, ScrapeError


class RawServer:
    """Answers every request on a connection with ``replies[i]`` (bytes, or a list of pieces)."""

    def __init__(
        self,
        replies: list[bytes | list[bytes]],
        *,
        close_after: bool = False,
        delay: float = 0.0,
        tls: ssl.SSLContext | None = None,
    ):
        self.replies = replies
        self.close_after = close_after
        self.delay = delay
        self.tls = tls
        self.connections = 0
        self.requests: list[bytes] = []
        self.port = 0
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0, ssl=self.tls)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                self.requests.append(head)
                reply = self.replies[min(len(self.requests) - 1, len(self.replies) - 1)]
                await asyncio.sleep(self.delay)
                for piece in reply if isinstance(reply, list) else [reply]:
                    writer.write(piece)
                    await writer.drain()
                    await asyncio.sleep(0.005)
                if self.close_after:
                    break
        except (asyncio.IncompleteReadError, ConnectionError, ssl.SSLError):
            pass
        finally:
            writer.close()

    async def stop(self) -> None:
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()


@pytest.fixture
async def serve() -> AsyncIterator[Callable[..., Awaitable[RawServer]]]:
    servers: list[RawServer] = []

    async def make(replies: list[bytes | list[bytes]], **kw: Any) -> RawServer:
        server = RawServer(replies, **kw)
        await server.start()
        servers.append(server)
        return server

    yield make
    for server in servers:
        await server.stop()


def ok(body: bytes, extra: bytes = b"") -> bytes:
    return b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n" + extra + b"Content-Length: %d\r\n\r\n" % len(body) + body


async def test_content_length_and_keep_alive_reuse(serve: Any) -> None:
    server = await serve([ok(b"vllm:num_requests_waiting 3\n")])
    getter = HttpGetter("127.0.0.1", server.port, "/metrics", timeout=2)
    for _ in range(3):
        assert await getter.get() == (200, b"vllm:num_requests_waiting 3\n")
    assert server.connections == 1
    assert server.requests[0].startswith(b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1:")
    getter.close()


async def test_chunked_body_split_across_packets(serve: Any) -> None:
    reply = [b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n", b"5\r\nhel", b"lo\r\n6;ext=1\r\n world\r\n",
             b"0\r\n", b"\r\n"]  # fmt: skip
    server = await serve([reply])
    getter = HttpGetter("127.0.0.1", server.port, "/metrics", timeout=2)
    assert await getter.get() == (200, b"hello world")
    assert await getter.get() == (200, b"hello world")
    assert server.connections == 1
    getter.close()


async def test_connection_close_reconnects(serve: Any) -> None:
    server = await serve([ok(b"a", b"Connection: close\r\n")], close_after=True)
    getter = HttpGetter("127.0.0.1", server.port, "/metrics", timeout=2)
    assert await getter.get() == (200, b"a")
    assert await getter.get() == (200, b"a")
    assert server.connections == 2
    getter.close()


async def test_status_is_returned(serve: Any) -> None:
    server = await serve([b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 4\r\n\r\nbusy"])
    getter = HttpGetter("127.0.0.1", server.port, "/metrics", timeout=2)
    assert await getter.get() == (503, b"busy")
    getter.close()


@pytest.mark.parametrize(
    ("reply", "words"),
    [
        (b"SSH-2.0-OpenSSH\r\n\r\n", "not an HTTP"),
        (b"HTTP/1.1 200 OK\r\n\r\nno length", "neither Content-Length"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 999999\r\n\r\n", "over the limit"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", "bad chunk size"),
    ],
    ids=["not-http", "no-length", "too-large", "bad-chunk"],
)
async def test_bad_responses_are_scrape_errors(serve: Any, reply: bytes, words: str) -> None:
    server = await serve([reply])
    getter = HttpGetter("127.0.0.1", server.port, "/metrics", timeout=2, max_body=1000)
    with pytest.raises(ScrapeError, match=words):
        await getter.get()
    getter.close()


async def test_server_closing_mid_response(serve: Any) -> None:
    server = await serve([b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nshort"], close_after=True)
    getter = HttpGetter("127.0.0.1", server.port, "/metrics", timeout=2)
    with pytest.raises(ScrapeError, match="closed"):
        await getter.get()
    getter.close()


async def test_timeout_then_a_fresh_connection(serve: Any) -> None:
    server = await serve([ok(b"late")], delay=0.3)
    getter = HttpGetter("127.0.0.1", server.port, "/metrics", timeout=0.1)
    with pytest.raises(ScrapeError, match="no answer"):
        await getter.get()
    getter.timeout = 2
    assert await getter.get() == (200, b"late")  # not the late answer of the first request
    assert server.connections == 2
    getter.close()


async def test_refused_connection() -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    getter = HttpGetter("127.0.0.1", port, "/metrics", timeout=2)
    with pytest.raises(ScrapeError):
        await getter.get()


# --------------------------------------------------------------------------------------------
# https: a loopback TLS server with a self-signed certificate made by the openssl CLI
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """``(cert, key)`` for CN=localhost, SAN IP:127.0.0.1; the test is skipped without openssl."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("no openssl CLI to make a self-signed certificate")
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(
        [openssl, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
         "-keyout", str(key), "-out", str(cert), "-days", "1", "-subj", "/CN=localhost",
         "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"],
        check=True, capture_output=True, timeout=30,
    )  # fmt: skip
    return cert, key


def server_tls(certificate: tuple[Path, Path]) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(*certificate)
    return context


def client_tls(*, verify: bool, cafile: Path | None = None) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(cafile) if cafile else None)
    if not verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


async def test_https_without_verification(serve: Any, certificate: tuple[Path, Path]) -> None:
    server = await serve([ok(b"vllm:num_requests_waiting 3\n")], tls=server_tls(certificate))
    getter = HttpGetter("127.0.0.1", server.port, "/metrics", timeout=2, ssl=client_tls(verify=False))
    for _ in range(3):
        assert await getter.get() == (200, b"vllm:num_requests_waiting 3\n")
    assert server.connections == 1  # kept alive over TLS too
    getter.close()


async def test_https_chunked_and_reconnect(serve: Any, certificate: tuple[Path, Path]) -> None:
    reply = [b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n", b"3\r\nabc\r\n0\r\n\r\n"]
    server = await serve([reply], tls=server_tls(certificate), close_after=True)
    getter = HttpGetter("127.0.0.1", server.port, "/metrics", timeout=2, ssl=client_tls(verify=False))
    assert await getter.get() == (200, b"abc")
    assert await getter.get() == (200, b"abc")
    assert server.connections == 2
    getter.close()


async def test_https_verified_against_a_trusted_certificate(serve: Any, certificate: tuple[Path, Path]) -> None:
    server = await serve([ok(b"ok")], tls=server_tls(certificate))
    getter = HttpGetter(
        "127.0.0.1", server.port, "/metrics", timeout=2, ssl=client_tls(verify=True, cafile=certificate[0])
    )
    assert await getter.get() == (200, b"ok")
    getter.close()


async def test_https_verification_rejects_an_unknown_certificate(serve: Any, certificate: tuple[Path, Path]) -> None:
    server = await serve([ok(b"ok")], tls=server_tls(certificate))
    getter = HttpGetter("127.0.0.1", server.port, "/metrics", timeout=2, ssl=client_tls(verify=True))
    with pytest.raises(ScrapeError, match="CERTIFICATE_VERIFY_FAILED"):
        await getter.get()
    getter.close()


async def test_https_to_a_plain_http_server_is_a_scrape_error() -> None:
    async def plain(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(ok(b"not tls"))  # answers at once, before any handshake
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(plain, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    getter = HttpGetter("127.0.0.1", port, "/metrics", timeout=2, ssl=client_tls(verify=False))
    try:
        with pytest.raises(ScrapeError, match="WRONG_VERSION_NUMBER"):
            await getter.get()
    finally:
        getter.close()
        server.close()
        await server.wait_closed()
