"""A stage that rewrites the body: the session sends the new body with a matching length."""

from __future__ import annotations

from typing import Any

import pytest
from envoy.config.core.v3 import base_pb2
from envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2 as pm
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep

from igw.api.context import RequestContext
from igw.config.settings import ServerSettings
from igw.extproc.session import ExtProcSession
from igw.routing.destination import RouteDecision

NEW_BODY = b'{"model":"rewritten","prompt":"p"}' * 3000  # > one 62,000-byte chunk


class RewritingDirector:
    """Stands in for the director: routes everything to one endpoint with a new body."""

    def __init__(self) -> None:
        self.ended: list[RequestContext] = []

    async def handle_request(self, ctx: RequestContext, body: bytes) -> RouteDecision:
        return RouteDecision(destination="10.0.0.1:8000", set_headers={"x-gateway-destination-endpoint": "10.0.0.1:8000"},
                             body=NEW_BODY)  # fmt: skip

    def on_stream_end(self, ctx: RequestContext) -> None:
        self.ended.append(ctx)


def _opening(mode: int) -> Any:
    hm = base_pb2.HeaderMap(headers=[base_pb2.HeaderValue(key=":path", raw_value=b"/v1/completions")])
    return ep.ProcessingRequest(
        request_headers=ep.HttpHeaders(headers=hm),
        protocol_config=ep.ProtocolConfiguration(request_body_mode=mode),  # type: ignore[arg-type]
    )


def _set_headers(common: Any) -> dict[str, str]:
    return {h.header.key: h.header.raw_value.decode() for h in common.header_mutation.set_headers}


@pytest.mark.parametrize("mode", [pm.ProcessingMode.BUFFERED, pm.ProcessingMode.FULL_DUPLEX_STREAMED],
                         ids=["buffered", "duplex"])  # fmt: skip
async def test_rewritten_body_is_sent_with_its_length(mode: int) -> None:
    director = RewritingDirector()
    session = ExtProcSession(director, ServerSettings())  # type: ignore[arg-type]
    await session.handle(_opening(mode))
    body = ep.ProcessingRequest(request_body=ep.HttpBody(body=b'{"model":"m","prompt":"p"}', end_of_stream=True))
    replies = await session.handle(body)
    if mode == pm.ProcessingMode.BUFFERED:
        (reply,) = replies
        common = reply.request_body.response
        assert common.body_mutation.body == NEW_BODY
    else:
        common = replies[0].request_headers.response
        echoed = b"".join(r.request_body.response.body_mutation.streamed_response.body for r in replies[1:])
        assert echoed == NEW_BODY
        assert all(len(r.request_body.response.body_mutation.streamed_response.body) <= 62_000 for r in replies[1:])
    assert _set_headers(common)["content-length"] == str(len(NEW_BODY))
    session.finish()
    assert len(director.ended) == 1
