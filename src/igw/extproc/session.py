"""One ext_proc stream = one HTTP request: a sans-io state machine.

``handle(message)`` takes one ``ProcessingRequest`` and returns the ``ProcessingResponse``
messages to send, in order; the gRPC server only moves messages. ``finish()`` runs once when
the stream ends for any reason. A message that breaks the protocol raises
:class:`ProtocolError` (the server ends the stream with INVALID_ARGUMENT; the proxy applies
its failure mode).

Request body modes (announced by the proxy in ``protocol_config``, else the configured
default):

* ``BUFFERED``: the headers are answered at once; the whole body arrives in one message; the
  body reply carries the destination (the proxy still holds the headers).
* ``FULL_DUPLEX_STREAMED``: headers and body chunks arrive without waiting; nothing is
  answered until the body ends; then one headers reply (destination, content-length) and the
  body echoed in chunks, in that order (header -> body -> trailer).
* ``NONE``: no body will come; the request is routed on its headers.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable
from typing import Any

from envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2

from igw.api.context import RequestContext
from igw.api.errors import IgwError, PayloadTooLarge
from igw.api.protocol import (
    LB_METADATA_NAMESPACE,
    REQUEST_ID_HEADER,
    SERVED_KEY,
    SUBSET_HINT_KEY,
    SUBSET_HINT_NAMESPACE,
)
from igw.config.settings import BodyMode, ServerSettings
from igw.extproc import responses
from igw.requestcontrol.director import Director
from igw.routing.destination import RouteDecision
from igw.routing.model_rewrite import ModelRestorer

log = logging.getLogger("igw.extproc")

_MODE = processing_mode_pb2.ProcessingMode
_BODY_MODES: dict[int, BodyMode | None] = {
    _MODE.BUFFERED: BodyMode.BUFFERED,
    _MODE.FULL_DUPLEX_STREAMED: BodyMode.FULL_DUPLEX_STREAMED,
    _MODE.NONE: None,
}


EXT_PROC_ATTRIBUTES = "envoy.filters.http.ext_proc"


class ProtocolError(Exception):
    """The proxy sent a message that makes no sense at this point of the stream."""


class ExtProcSession:
    def __init__(
        self, director: Director, settings: ServerSettings, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._director = director
        self._settings = settings
        self._clock = clock
        self.ctx: RequestContext | None = None
        self._mode: BodyMode | None = settings.default_body_mode
        self._response_duplex = settings.default_body_mode is BodyMode.FULL_DUPLEX_STREAMED
        """Whether response bodies must be echoed (the proxy streams them in duplex mode)."""
        self._chunks: list[bytes] = []
        self._body_size = 0
        self._routed = False
        self._closed = False
        """An immediate response was sent: the proxy will not send more for this request."""
        self._set_request_id: str | None = None
        self._response_streamed = False
        """Buffered mode with the response body asked for (the model may be rewritten)."""
        self._restorer: ModelRestorer | None = None
        """Gives the client its model name back in the response body, when it was rewritten."""

    async def handle(self, msg: Any) -> list[Any]:
        if self._closed:
            return []  # the proxy may still flush chunks it sent before our immediate response
        kind = msg.WhichOneof("request")
        if kind == "request_headers":
            return self._on_request_headers(msg)
        if self.ctx is None:
            raise ProtocolError(f"{kind or 'empty message'} before request_headers")
        if kind == "request_body":
            return await self._on_request_body(msg.request_body)
        if kind == "request_trailers":
            return await self._on_request_trailers()
        if not self._routed:
            raise ProtocolError(f"{kind or 'empty message'} before the request was routed")
        if kind == "response_headers":
            return self._on_response_headers(msg)
        if kind == "response_body":
            body = msg.response_body
            restorer = self._restorer
            if self._response_duplex:
                data = restorer.feed(body.body, body.end_of_stream) if restorer else body.body
                return [responses.echo_response_body(data, body.end_of_stream)]
            if restorer is not None and self._response_streamed:
                return [responses.replace_response_chunk(restorer.feed(body.body, body.end_of_stream))]
            return [responses.CONTINUE_RESPONSE_BODY]
        if kind == "response_trailers":
            return [responses.RESPONSE_TRAILERS]
        raise ProtocolError("empty ProcessingRequest")

    def finish(self) -> None:
        """The stream ended: release what the request held. Safe to call more than once."""
        if self.ctx is not None:
            self._director.on_stream_end(self.ctx)

    # -- request path ----------------------------------------------------------------------------
    def _on_request_headers(self, msg: Any) -> list[Any]:
        if self.ctx is not None:
            raise ProtocolError("request_headers received twice")
        if msg.HasField("protocol_config"):
            cfg = msg.protocol_config
            if cfg.request_body_mode not in _BODY_MODES:
                mode = cfg.request_body_mode
                name = _MODE.BodySendMode.Name(mode) if mode in _MODE.BodySendMode.values() else str(mode)
                raise ProtocolError(f"request_body_mode {name} is not supported; use FULL_DUPLEX_STREAMED or BUFFERED")
            self._mode = _BODY_MODES[cfg.request_body_mode]
            self._response_duplex = cfg.response_body_mode == _MODE.FULL_DUPLEX_STREAMED
        headers: dict[str, str] = {}
        for h in msg.request_headers.headers.headers:
            headers[h.key.lower()] = h.raw_value.decode("utf-8", "replace") if h.raw_value else h.value
        request_id = headers.get(REQUEST_ID_HEADER)
        if not request_id:
            request_id = self._set_request_id = str(uuid.uuid4())
            headers[REQUEST_ID_HEADER] = request_id
        self.ctx = RequestContext(
            request_id=request_id,
            path=headers.get(":path", ""),
            headers=headers,
            started_at=self._clock(),
            subset_hint=_subset_hint(msg),
        )
        if msg.request_headers.end_of_stream or self._mode is None:
            return self._route_headers_only()
        if self._mode is BodyMode.FULL_DUPLEX_STREAMED:
            return []  # held until the body is complete
        extra = {REQUEST_ID_HEADER: request_id} if self._set_request_id else None
        if self._director.may_rewrite_model(self.ctx):
            self._response_streamed = True
            return [responses.continue_request_headers(extra, mode_override=responses.STREAM_RESPONSE_BODY)]
        return [responses.continue_request_headers(extra)]

    def _route_headers_only(self) -> list[Any]:
        assert self.ctx is not None
        try:
            decision = self._director.handle_headers_only(self.ctx)
        except Exception as exc:
            return self._fail(exc)
        self._routed = True
        return [responses.routed_headers(self._headers_for(decision), decision.destination)]

    async def _on_request_body(self, body: Any) -> list[Any]:
        if self._routed:
            raise ProtocolError("request_body after the request was routed")
        if self._mode is None:
            raise ProtocolError("request_body although the body mode is NONE")
        if body.body:
            self._chunks.append(body.body)
            self._body_size += len(body.body)
        if self._body_size > self._settings.max_request_body_bytes:
            return self._fail(
                PayloadTooLarge(
                    f"request body is larger than the limit of {self._settings.max_request_body_bytes} bytes"
                )
            )
        if self._mode is BodyMode.BUFFERED or body.end_of_stream:
            return await self._route_body(trailers_follow=False)
        return []

    async def _on_request_trailers(self) -> list[Any]:
        if self._routed or self._mode is not BodyMode.FULL_DUPLEX_STREAMED:
            return [responses.REQUEST_TRAILERS]
        return [*(await self._route_body(trailers_follow=True)), responses.REQUEST_TRAILERS]

    async def _route_body(self, *, trailers_follow: bool) -> list[Any]:
        assert self.ctx is not None
        chunks, self._chunks = self._chunks, []
        body = chunks[0] if len(chunks) == 1 else b"".join(chunks)  # buffered: one chunk, no copy
        try:
            decision = await self._director.handle_request(self.ctx, body)
        except Exception as exc:
            return self._fail(exc)
        self._routed = True
        headers = self._headers_for(decision)
        if decision.body is not None:
            headers["content-length"] = str(len(decision.body))
        if self._mode is BodyMode.BUFFERED:
            return [responses.routed_body(headers, decision.destination, new_body=decision.body)]
        out_body = decision.body if decision.body is not None else body
        headers["content-length"] = str(len(out_body))
        return [
            responses.routed_headers(headers, decision.destination),
            *responses.streamed_body(
                out_body, chunk_size=self._settings.body_chunk_bytes, end_of_stream=not trailers_follow
            ),
        ]

    def _headers_for(self, decision: RouteDecision) -> dict[str, str]:
        headers = dict(decision.set_headers)
        if self._set_request_id:
            headers[REQUEST_ID_HEADER] = self._set_request_id
        return headers

    def _fail(self, exc: Exception) -> list[Any]:
        assert self.ctx is not None
        if not isinstance(exc, IgwError):
            log.exception("request %s: internal error", self.ctx.request_id, exc_info=exc)
            exc = IgwError(f"internal error in the endpoint picker: {type(exc).__name__}")
        self._director.request_failed(self.ctx, exc)
        self._closed = True
        return [responses.error_response(exc, request_id=self.ctx.request_id)]

    # -- response path ---------------------------------------------------------------------------
    def _on_response_headers(self, msg: Any) -> list[Any]:
        assert self.ctx is not None
        status: int | None = None
        served = _served_endpoint(msg)
        remove: list[str] = []
        for h in msg.response_headers.headers.headers:
            key = h.key.lower()
            if key == ":status":
                value = h.raw_value.decode("utf-8", "replace") if h.raw_value else h.value
                status = int(value) if value.isascii() and value.isdigit() else None
            elif key == SERVED_KEY:
                served = served or (h.raw_value.decode("utf-8", "replace") if h.raw_value else h.value)
                remove.append(SERVED_KEY)
        request = self.ctx.request
        rewritten = request is not None and request.model and request.target_model not in (None, request.model)
        if rewritten and (self._response_duplex or self._response_streamed):
            assert request is not None
            assert request.model
            assert request.target_model
            self._restorer = ModelRestorer(request.model, request.target_model)
            remove.append("content-length")  # the body changes length; the proxy re-frames it
        extra = self._director.on_response_headers(self.ctx, status=status, served=served)
        return [responses.continue_response_headers(remove, extra)]


def _subset_hint(msg: Any) -> list[str] | None:
    meta = msg.metadata_context.filter_metadata
    if SUBSET_HINT_NAMESPACE not in meta:
        return None
    fields = meta[SUBSET_HINT_NAMESPACE].fields
    if SUBSET_HINT_KEY not in fields:
        return None
    value = fields[SUBSET_HINT_KEY]
    if value.WhichOneof("kind") != "list_value":
        return None  # not a list: treated as no hint, as the reference EPP does
    return [v.string_value for v in value.list_value.values if v.WhichOneof("kind") == "string_value"]


def _served_endpoint(msg: Any) -> str | None:
    """The protocol's served-endpoint metadata, else Envoy's ``upstream.address`` attribute."""
    meta = msg.metadata_context.filter_metadata
    if LB_METADATA_NAMESPACE in meta:
        field = meta[LB_METADATA_NAMESPACE].fields.get(SERVED_KEY)
        if field is not None and field.string_value:
            return str(field.string_value)
    attrs = msg.attributes
    if EXT_PROC_ATTRIBUTES in attrs:
        field = attrs[EXT_PROC_ATTRIBUTES].fields.get("upstream.address")
        if field is not None and field.string_value:
            return str(field.string_value)
    return None
