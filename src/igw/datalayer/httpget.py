"""A lean keep-alive HTTP/1.1 GET client for the metrics scrape loop.

Scraping every endpoint every 50 ms is the EPP's steadiest cost: with a general-purpose client
(aiohttp) a scrape cost ~250-400 us of CPU here, most of it in building request and response
objects we don't need. This client keeps one connection per endpoint and does only what a
scrape needs: write a fixed request, read the status line, ``Content-Length`` or chunked
bodies, honour ``Connection: close``. Anything else it refuses with :class:`ScrapeError`.
Over https the same protocol object sits on asyncio's TLS transport.
"""

from __future__ import annotations

import asyncio
import ssl as _ssl
from typing import cast


class ScrapeError(Exception):
    """The endpoint could not be scraped (connection, protocol, size or time)."""


_MAX_HEAD = 64 * 1024


class _Connection(asyncio.Protocol):
    def __init__(self, max_body: int) -> None:
        self.max_body = max_body
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.waiter: asyncio.Future[tuple[int, bytes]] | None = None
        self.closed = False
        self.keep_alive = True

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not an asyncio.Transport subclass

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._fail(ScrapeError(f"connection closed: {exc}" if exc else "connection closed by the server"))

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if self.waiter is None or self.waiter.done():
            return
        try:
            result = self._parse()
        except ScrapeError as exc:
            self._fail(exc)
            self.close()
            return
        if result is not None:
            self.waiter.set_result(result)

    def _fail(self, exc: Exception) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(exc)

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()

    def _parse(self) -> tuple[int, bytes] | None:
        buf = self.buf
        head_end = buf.find(b"\r\n\r\n")
        if head_end < 0:
            if len(buf) > _MAX_HEAD:
                raise ScrapeError("response headers too large")
            return None
        lines = bytes(buf[:head_end]).split(b"\r\n")
        parts = lines[0].split(b" ", 2)
        if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not parts[1].isdigit():
            raise ScrapeError(f"not an HTTP/1.x response: {lines[0][:60]!r}")
        status = int(parts[1])
        length: int | None = None
        chunked = False
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            key = name.strip().lower()
            if key == b"content-length":
                length = int(value.strip())
            elif key == b"transfer-encoding":
                chunked = b"chunked" in value.lower()
            elif key == b"connection":
                self.keep_alive = b"close" not in value.lower()
        start = head_end + 4
        if chunked:
            body, end = _dechunk(buf, start, self.max_body)
            if body is None:
                return None
        elif length is not None:
            if length > self.max_body:
                raise ScrapeError(f"metrics page of {length} bytes is over the limit of {self.max_body}")
            end = start + length
            if len(buf) < end:
                return None
            body = bytes(buf[start:end])
        else:
            raise ScrapeError("response has neither Content-Length nor chunked encoding")
        del buf[:end]
        return status, body


def _dechunk(buf: bytearray, pos: int, max_body: int) -> tuple[bytes | None, int]:
    """Decode a complete chunked body starting at ``pos``; ``(None, 0)`` if more data is needed."""
    out = bytearray()
    while True:
        eol = buf.find(b"\r\n", pos)
        if eol < 0:
            return None, 0
        size_text = bytes(buf[pos:eol]).split(b";", 1)[0].strip()
        try:
            size = int(size_text, 16)
        except ValueError:
            raise ScrapeError(f"bad chunk size {size_text[:20]!r}") from None
        if size == 0:
            trailer_end = buf.find(b"\r\n\r\n", eol)  # no trailers: the 0-size line is followed by \r\n
            if buf[eol + 2 : eol + 4] == b"\r\n":
                return bytes(out), eol + 4
            if trailer_end < 0:
                return None, 0
            return bytes(out), trailer_end + 4
        if len(buf) < eol + 2 + size + 2:
            return None, 0
        out += buf[eol + 2 : eol + 2 + size]
        if len(out) > max_body:
            raise ScrapeError(f"metrics page over the limit of {max_body} bytes")
        pos = eol + 2 + size + 2


class HttpGetter:
    """GETs one URL again and again over one kept-alive connection (reconnecting when needed).

    With ``ssl`` set the connection is https (the context decides verification); the
    handshake counts against ``timeout`` like the rest of the request.
    """

    def __init__(
        self,
        host: str,
        port: int,
        path: str,
        *,
        timeout: float,
        max_body: int = 16 * 1024 * 1024,
        ssl: _ssl.SSLContext | None = None,
    ) -> None:
        self.host, self.port, self.timeout, self.max_body = host, port, timeout, max_body
        self.ssl = ssl
        authority = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        self._request = (
            f"GET {path} HTTP/1.1\r\nHost: {authority}\r\nUser-Agent: igw-epp\r\n"
            "Accept: text/plain\r\nAccept-Encoding: identity\r\n\r\n"
        ).encode()
        self._conn: _Connection | None = None

    async def get(self) -> tuple[int, bytes]:
        """Return ``(status, body)``; raise :class:`ScrapeError` on any failure."""
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self.timeout):
                conn = self._conn
                if conn is None or conn.closed:
                    _, conn = await loop.create_connection(
                        lambda: _Connection(self.max_body), self.host, self.port, ssl=self.ssl
                    )
                    self._conn = conn
                conn.waiter = loop.create_future()
                assert conn.transport is not None
                conn.transport.write(self._request)
                result = await conn.waiter
        except TimeoutError:
            self.close()  # a late answer must not be taken for the next one
            raise ScrapeError(f"no answer within {self.timeout:g}s") from None
        except OSError as exc:
            self.close()
            raise ScrapeError(exc.strerror or str(exc)) from None
        except ScrapeError:
            self.close()
            raise
        if not conn.keep_alive:
            self.close()
        return result

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None
