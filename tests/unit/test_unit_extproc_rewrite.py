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

    def may_rewrite_model(self, ctx: RequestContext) -> bool:
        return False


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


# --------------------------------------------------------------------------------------------
# model rewrites through the real director: the server gets the target, the client its name
# --------------------------------------------------------------------------------------------


def _director_with_rule(rule_models: frozenset[str]) -> Any:
    import time

    from prometheus_client import CollectorRegistry

    from igw.api.types import Endpoint, EndpointMetrics
    from igw.app.epp import build_director
    from igw.config.settings import EppSettings
    from igw.datalayer.rewrites import RewriteRule, RewriteStore, RewriteTarget
    from igw.datalayer.store import EndpointStore
    from igw.observability.metrics import EppMetrics

    store = EndpointStore()
    store.set_endpoints([Endpoint("10.0.0.1:8000", "10.0.0.1", 8000)])
    store.update_metrics("10.0.0.1:8000", EndpointMetrics(scraped_at=time.monotonic()))
    rewrites = RewriteStore([RewriteRule("InferenceModelRewrite/ns/r", rule_models, (RewriteTarget("real-model-v2"),))])
    metrics = EppMetrics(CollectorRegistry())
    return build_director(EppSettings(), store, metrics, rewrites=rewrites), metrics


def _headers(pairs: list[tuple[str, str]], **kwargs: Any) -> Any:
    hm = base_pb2.HeaderMap(headers=[base_pb2.HeaderValue(key=k, raw_value=v.encode()) for k, v in pairs])
    return ep.HttpHeaders(headers=hm, **kwargs)


RESPONSE = b'{"id":"c1","model":"real-model-v2","choices":[{"message":{"content":"hi"}}]}'


@pytest.mark.parametrize("mode", [pm.ProcessingMode.BUFFERED, pm.ProcessingMode.FULL_DUPLEX_STREAMED],
                         ids=["buffered", "duplex"])  # fmt: skip
async def test_rewrite_sends_the_target_and_restores_the_clients_model(mode: int) -> None:
    director, metrics = _director_with_rule(frozenset({"alias"}))
    session = ExtProcSession(director, ServerSettings())
    opening = ep.ProcessingRequest(
        request_headers=_headers([(":path", "/v1/chat/completions")]),
        protocol_config=ep.ProtocolConfiguration(
            request_body_mode=mode,
            response_body_mode=mode if mode == pm.ProcessingMode.FULL_DUPLEX_STREAMED else 0,  # type: ignore[arg-type]
        ),
    )
    replies = await session.handle(opening)
    if mode == pm.ProcessingMode.BUFFERED:  # the response body is asked for, whole mode restated
        override = replies[0].mode_override
        assert override.response_body_mode == pm.ProcessingMode.STREAMED
        assert override.request_body_mode == pm.ProcessingMode.BUFFERED
    body = b'{"model":"alias","messages":[{"role":"user","content":"hi"}]}'
    replies = await session.handle(ep.ProcessingRequest(request_body=ep.HttpBody(body=body, end_of_stream=True)))
    if mode == pm.ProcessingMode.BUFFERED:
        sent = replies[0].request_body.response.body_mutation.body
    else:
        sent = b"".join(r.request_body.response.body_mutation.streamed_response.body for r in replies[1:])
    assert b'"model":"real-model-v2"' in sent
    replies = await session.handle(
        ep.ProcessingRequest(response_headers=_headers([(":status", "200"), ("content-length", str(len(RESPONSE)))]))
    )
    assert "content-length" in replies[0].response_headers.response.header_mutation.remove_headers
    out = b""
    for i in range(0, len(RESPONSE), 10):  # a chunk boundary falls inside the model name
        chunk = RESPONSE[i : i + 10]
        eos = i + 10 >= len(RESPONSE)
        (reply,) = await session.handle(ep.ProcessingRequest(response_body=ep.HttpBody(body=chunk, end_of_stream=eos)))
        mutation = reply.response_body.response.body_mutation
        out += mutation.streamed_response.body if mode != pm.ProcessingMode.BUFFERED else mutation.body
    assert out == RESPONSE.replace(b"real-model-v2", b"alias")
    assert (
        metrics.registry.get_sample_value(
            "inference_extension_model_rewrite_decisions_total",
            {
                "model_rewrite_name": "InferenceModelRewrite/ns/r",
                "model_name": "alias",
                "target_model": "real-model-v2",
            },
        )
        == 1
    )
    session.finish()


async def test_header_rewrite_and_untouched_models() -> None:
    director, _ = _director_with_rule(frozenset({"alias"}))
    session = ExtProcSession(director, ServerSettings())
    opening = ep.ProcessingRequest(
        request_headers=_headers([(":path", "/v1/completions"), ("x-gateway-model-name-rewrite", "other")]),
        protocol_config=ep.ProtocolConfiguration(request_body_mode=pm.ProcessingMode.BUFFERED),
    )
    await session.handle(opening)
    replies = await session.handle(
        ep.ProcessingRequest(request_body=ep.HttpBody(body=b'{"model":"m","prompt":"p"}', end_of_stream=True))
    )
    assert b'"model":"other"' in replies[0].request_body.response.body_mutation.body
    plain = ExtProcSession(director, ServerSettings())
    await plain.handle(ep.ProcessingRequest(
        request_headers=_headers([(":path", "/v1/completions")]),
        protocol_config=ep.ProtocolConfiguration(request_body_mode=pm.ProcessingMode.BUFFERED)))  # fmt: skip
    replies = await plain.handle(
        ep.ProcessingRequest(request_body=ep.HttpBody(body=b'{"model":"m","prompt":"p"}', end_of_stream=True))
    )
    assert not replies[0].request_body.response.HasField("body_mutation")  # no rule for "m": body untouched
