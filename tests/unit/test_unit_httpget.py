"""The scrape client against raw TCP servers that answer exactly what each case needs."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from igw.datalayer.httpget import HttpGetter, ScrapeError


class RawServer:
    """Answers every request on a connection with ``replies[i]`` (bytes, or a list of pieces)."""

    def __init__(self, replies: list[bytes | list[bytes]], *, close_after: bool = False, delay: float = 0.0):
        self.replies = replies
        self.close_after = close_after
        self.delay = delay
        self.connections = 0
        self.requests: list[bytes] = []
        self.port = 0
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
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
        except (asyncio.IncompleteReadError, ConnectionError):
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
