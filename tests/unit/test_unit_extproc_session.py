"""ExtProcSession, playbook style: hand-built ProcessingRequests in, ProcessingResponses checked out."""

from __future__ import annotations

import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import orjson
import pytest
from envoy.config.core.v3 import base_pb2
from envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep
from google.protobuf import struct_pb2
from prometheus_client import CollectorRegistry

from igw.accounting.tracker import RequestTracker
from igw.api.types import Endpoint, EndpointMetrics
from igw.app.epp import build_director
from igw.config.settings import AdmissionSettings, BodyMode, EppSettings, ServerSettings
from igw.datalayer.store import EndpointStore
from igw.extproc.session import ExtProcSession, ProtocolError
from igw.observability.metrics import EppMetrics
from igw.requestcontrol.director import Director

MODE = processing_mode_pb2.ProcessingMode
DUPLEX = MODE.FULL_DUPLEX_STREAMED
BUFFERED = MODE.BUFFERED
DEST = "x-gateway-destination-endpoint"
SERVED = "x-gateway-destination-endpoint-served"
HINT_NS = "envoy.lb.subset_hint"
HINT_KEY = "x-gateway-destination-endpoint-subset"
CHUNK = 62_000
A, B = "10.0.0.1:8000", "10.0.0.2:8000"


# --------------------------------------------------------------------------------------------
# rig and message builders
# --------------------------------------------------------------------------------------------


@dataclass
class Rig:
    store: EndpointStore
    tracker: RequestTracker
    director: Director
    metrics: EppMetrics
    server: ServerSettings

    def session(self) -> ExtProcSession:
        return ExtProcSession(self.director, self.server)

    def inflight(self) -> dict[str, int]:
        return {s.address: s.inflight for s in self.store.endpoints()}


def endpoint(address: str, models: list[str] | None = None) -> Endpoint:
    host, port = Endpoint.parse_address(address)
    return Endpoint(address, host, port, models=frozenset(models) if models is not None else None)


def make_rig(
    addresses: Sequence[str] = (A,),
    *,
    models: list[str] | None = None,
    server: ServerSettings | None = None,
    max_inflight: int = 0,
) -> Rig:
    settings = EppSettings(admission=AdmissionSettings(max_inflight_requests=max_inflight))
    store = EndpointStore(pool_name="pool")
    store.set_endpoints([endpoint(a, models) for a in addresses])
    for s in store.endpoints():
        store.update_metrics(s.address, EndpointMetrics(scraped_at=time.monotonic()))
    metrics = EppMetrics(CollectorRegistry())
    director = build_director(settings, store, metrics)
    tracker = director.tracker
    return Rig(store, tracker, director, metrics, server or ServerSettings())


def header_map(headers: dict[str, str]) -> base_pb2.HeaderMap:
    return base_pb2.HeaderMap(headers=[base_pb2.HeaderValue(key=k, raw_value=v.encode()) for k, v in headers.items()])


def req_headers(
    headers: dict[str, str] | None = None,
    *,
    eos: bool = False,
    mode: int | None = DUPLEX,
    response_mode: int | None = None,
    hint: list[str] | None = None,
) -> ep.ProcessingRequest:
    base = {":method": "POST", ":path": "/v1/completions", ":authority": "gw", "content-type": "application/json"}
    msg = ep.ProcessingRequest(
        request_headers=ep.HttpHeaders(headers=header_map({**base, **(headers or {})}), end_of_stream=eos)
    )
    if mode is not None:
        msg.protocol_config.request_body_mode = mode  # type: ignore[assignment]
    if response_mode is not None:
        msg.protocol_config.response_body_mode = response_mode  # type: ignore[assignment]
    if hint is not None:
        value = struct_pb2.Value(
            list_value=struct_pb2.ListValue(values=[struct_pb2.Value(string_value=h) for h in hint])
        )
        msg.metadata_context.filter_metadata[HINT_NS].fields[HINT_KEY].CopyFrom(value)
    return msg


def req_body(data: bytes, eos: bool) -> ep.ProcessingRequest:
    return ep.ProcessingRequest(request_body=ep.HttpBody(body=data, end_of_stream=eos))


def resp_headers(
    status: str | None = "200",
    *,
    served_meta: str | None = None,
    upstream: str | None = None,
    served_header: str | None = None,
) -> ep.ProcessingRequest:
    headers = {"content-type": "application/json"}
    if status is not None:
        headers = {":status": status, **headers}
    if served_header is not None:
        headers[SERVED] = served_header
    msg = ep.ProcessingRequest(response_headers=ep.HttpHeaders(headers=header_map(headers)))
    if served_meta is not None:
        msg.metadata_context.filter_metadata["envoy.lb"].fields[SERVED].string_value = served_meta
    if upstream is not None:
        msg.attributes["envoy.filters.http.ext_proc"].fields["upstream.address"].string_value = upstream
    return msg


def json_body(size: int | None = None, model: str = "m") -> bytes:
    """A completions body, padded to exactly ``size`` bytes when given."""
    head, tail = b'{"model":"' + model.encode() + b'","prompt":"', b'"}'
    pad = 5 if size is None else size - len(head) - len(tail)
    assert pad >= 0
    return head + b"x" * pad + tail


def chunks(data: bytes, n: int) -> list[bytes]:
    step = max(1, -(-len(data) // n))
    return [data[i : i + step] for i in range(0, len(data), step)]


def set_headers(mutation: Any) -> dict[str, str]:
    return {h.header.key: h.header.raw_value.decode() for h in mutation.set_headers}


def lb_destination(resp: ep.ProcessingResponse) -> str:
    return resp.dynamic_metadata.fields["envoy.lb"].struct_value.fields[DEST].string_value


def immediate(resp: ep.ProcessingResponse) -> tuple[int, dict[str, Any], dict[str, str]]:
    assert resp.WhichOneof("response") == "immediate_response"
    im = resp.immediate_response
    return im.status.code, orjson.loads(im.body), set_headers(im.headers)


# --------------------------------------------------------------------------------------------
# full duplex
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("size", "n_in"),
    [(None, 1), (None, 3), (CHUNK, 1), (CHUNK + 1, 2), (150_000, 3), (3 * CHUNK, 7), (200_000, 1)],
    ids=["small", "small-3-chunks", "exactly-one-chunk", "one-byte-over", "150k", "exact-multiple", "200k-one-piece"],
)
async def test_duplex_answers_once_the_body_ends(size: int | None, n_in: int) -> None:
    rig = make_rig()
    session = rig.session()
    data = json_body(size)
    assert await session.handle(req_headers({"x-request-id": "rid-1"})) == []
    pieces = chunks(data, n_in)
    for piece in pieces[:-1]:
        assert await session.handle(req_body(piece, eos=False)) == []
    assert rig.inflight() == {A: 0}
    replies = await session.handle(req_body(pieces[-1], eos=True))

    head, body_replies = replies[0], replies[1:]
    assert head.WhichOneof("response") == "request_headers"
    common = head.request_headers.response
    assert common.clear_route_cache is True
    hdrs = set_headers(common.header_mutation)
    assert hdrs[DEST] == A
    assert hdrs["content-length"] == str(len(data))
    assert "x-request-id" not in hdrs  # the client's id is kept as is
    assert lb_destination(head) == A

    expected_chunks = -(-len(data) // CHUNK)
    assert len(body_replies) == expected_chunks
    echoed = b""
    for i, reply in enumerate(body_replies):
        assert reply.WhichOneof("response") == "request_body"
        streamed = reply.request_body.response.body_mutation.streamed_response
        assert len(streamed.body) <= CHUNK
        assert streamed.end_of_stream is (i == len(body_replies) - 1)
        echoed += streamed.body
    assert echoed == data
    assert rig.inflight() == {A: 1}
    assert session.ctx is not None
    assert session.ctx.request_id == "rid-1"
    session.finish()
    assert rig.inflight() == {A: 0}


@pytest.mark.parametrize("chunk_bytes", [1000, 62_000, 10], ids=["1k", "62k", "tiny"])
async def test_duplex_chunk_size_setting(chunk_bytes: int) -> None:
    rig = make_rig(server=ServerSettings(body_chunk_bytes=chunk_bytes))
    session = rig.session()
    data = json_body(5000)
    await session.handle(req_headers())
    replies = await session.handle(req_body(data, eos=True))
    bodies = [r.request_body.response.body_mutation.streamed_response.body for r in replies[1:]]
    assert all(len(b) <= chunk_bytes for b in bodies)
    assert b"".join(bodies) == data
    assert len(bodies) == -(-len(data) // chunk_bytes)


async def test_duplex_trailers_end_the_body() -> None:
    rig = make_rig()
    session = rig.session()
    data = json_body(70_000)
    await session.handle(req_headers())
    assert await session.handle(req_body(data, eos=False)) == []
    replies = await session.handle(ep.ProcessingRequest(request_trailers=ep.HttpTrailers()))
    kinds = [r.WhichOneof("response") for r in replies]
    assert kinds == ["request_headers", "request_body", "request_body", "request_trailers"]
    streamed = [r.request_body.response.body_mutation.streamed_response for r in replies[1:3]]
    assert b"".join(s.body for s in streamed) == data
    assert [s.end_of_stream for s in streamed] == [False, False]  # the trailers end the stream


async def test_default_body_mode_applies_without_protocol_config() -> None:
    rig = make_rig(server=ServerSettings(default_body_mode=BodyMode.BUFFERED))
    session = rig.session()
    replies = await session.handle(req_headers(mode=None))
    assert [r.WhichOneof("response") for r in replies] == ["request_headers"]
    replies = await session.handle(req_body(json_body(), eos=True))
    assert [r.WhichOneof("response") for r in replies] == ["request_body"]


# --------------------------------------------------------------------------------------------
# buffered
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("with_id", [True, False], ids=["client-id", "generated-id"])
async def test_buffered_headers_answered_at_once_body_carries_destination(with_id: bool) -> None:
    rig = make_rig()
    session = rig.session()
    first = await session.handle(req_headers({"x-request-id": "abc"} if with_id else {}, mode=BUFFERED))
    assert len(first) == 1
    assert first[0].WhichOneof("response") == "request_headers"
    early = set_headers(first[0].request_headers.response.header_mutation)
    assert session.ctx is not None
    rid = session.ctx.request_id
    if with_id:
        assert rid == "abc"
        assert early == {}
    else:
        assert uuid.UUID(rid).version == 4
        assert early == {"x-request-id": rid}

    data = json_body(100_000)
    replies = await session.handle(req_body(data, eos=True))
    assert len(replies) == 1
    reply = replies[0]
    assert reply.WhichOneof("response") == "request_body"
    common = reply.request_body.response
    assert common.clear_route_cache is True
    hdrs = set_headers(common.header_mutation)
    assert hdrs[DEST] == A
    assert lb_destination(reply) == A
    assert hdrs.get("x-request-id") == (None if with_id else rid)
    assert not common.HasField("body_mutation")
    assert rig.inflight() == {A: 1}
    session.finish()
    assert rig.inflight() == {A: 0}


# --------------------------------------------------------------------------------------------
# request id
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("given", "kept"),
    [
        ({"x-request-id": "req-42"}, True),
        ({"X-Request-Id": "Mixed-Case"}, True),
        ({}, False),
        ({"x-request-id": ""}, False),
    ],
    ids=["present", "header-name-case", "missing", "empty"],
)
async def test_request_id_generated_when_missing(given: dict[str, str], kept: bool) -> None:
    rig = make_rig()
    session = rig.session()
    await session.handle(req_headers(given))
    replies = await session.handle(req_body(json_body(), eos=True))
    hdrs = set_headers(replies[0].request_headers.response.header_mutation)
    assert session.ctx is not None
    rid = session.ctx.request_id
    if kept:
        assert rid == next(iter(given.values()))
        assert "x-request-id" not in hdrs
    else:
        assert uuid.UUID(rid).version == 4
        assert hdrs["x-request-id"] == rid
    assert session.ctx.headers["x-request-id"] == rid


async def test_generated_request_ids_differ() -> None:
    rig = make_rig()
    ids = set()
    for _ in range(5):
        session = rig.session()
        await session.handle(req_headers())
        assert session.ctx is not None
        ids.add(session.ctx.request_id)
    assert len(ids) == 5


# --------------------------------------------------------------------------------------------
# immediate responses
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("mode", "limit", "pieces", "answered_at"),
    [
        (DUPLEX, 100, [60, 60], 1),
        (DUPLEX, 100, [101], 0),
        (BUFFERED, 100, [101], 0),
        (DUPLEX, 1000, [400, 400, 400], 2),
    ],
    ids=["duplex-second-chunk", "duplex-single", "buffered", "duplex-third"],
)
async def test_413_when_body_over_limit(mode: int, limit: int, pieces: list[int], answered_at: int) -> None:
    rig = make_rig(server=ServerSettings(max_request_body_bytes=limit))
    session = rig.session()
    await session.handle(req_headers({"x-request-id": "big"}, mode=mode))
    for i, n in enumerate(pieces):
        replies = await session.handle(req_body(b"x" * n, eos=i == len(pieces) - 1))
        if i < answered_at:
            assert replies == []
    assert len(replies) == 1
    status, payload, hdrs = immediate(replies[0])
    assert status == 413
    assert payload["error"]["code"] == 413
    assert str(limit) in payload["error"]["message"]
    assert hdrs == {"content-type": "application/json", "x-request-id": "big"}
    # the proxy may still flush what it sent before our answer: ignored
    assert await session.handle(req_body(b"late", eos=True)) == []
    assert await session.handle(resp_headers()) == []
    assert rig.inflight() == {A: 0}
    session.finish()
    assert rig.tracker.inflight == 0


async def test_body_at_the_limit_is_accepted() -> None:
    data = json_body(500)
    rig = make_rig(server=ServerSettings(max_request_body_bytes=len(data)))
    session = rig.session()
    await session.handle(req_headers())
    replies = await session.handle(req_body(data, eos=True))
    assert replies[0].WhichOneof("response") == "request_headers"
    assert lb_destination(replies[0]) == A


@pytest.mark.parametrize(
    ("body", "path", "hint", "models", "status", "needle"),
    [
        (b"{not json", "/v1/completions", None, None, 400, "not valid JSON"),
        (b"[1,2]", "/v1/completions", None, None, 400, "JSON object"),
        (b'{"prompt":"x"}', "/v1/completions", None, None, 400, "model"),
        (b'{"model":"m"}', "/v1/chat/completions", None, None, 400, "messages"),
        (b"", "/v1/completions", None, None, 400, "not valid JSON"),
        (json_body(model="gpt-x"), "/v1/completions", None, ["m"], 404, "gpt-x"),
        (json_body(), "/v1/completions", [], None, 503, "subset hint"),
        (json_body(), "/v1/completions", ["10.9.9.9:1"], None, 503, "subset hint"),
    ],
    ids=[
        "bad-json",
        "not-object",
        "no-model",
        "chat-no-messages",
        "empty-body",
        "unknown-model",
        "empty-hint",
        "no-match-hint",
    ],
)
@pytest.mark.parametrize("mode", [DUPLEX, BUFFERED], ids=["duplex", "buffered"])
async def test_error_statuses_with_json_bodies(
    mode: int, body: bytes, path: str, hint: list[str] | None, models: list[str] | None, status: int, needle: str
) -> None:
    rig = make_rig(models=models)
    session = rig.session()
    await session.handle(req_headers({":path": path, "x-request-id": "e1"}, mode=mode, hint=hint))
    replies = await session.handle(req_body(body, eos=True))
    assert len(replies) == 1
    got_status, payload, hdrs = immediate(replies[0])
    assert got_status == status
    assert payload["error"]["code"] == status
    assert needle in payload["error"]["message"]
    assert payload["error"]["type"]
    assert hdrs["x-request-id"] == "e1"
    assert replies[0].immediate_response.details.startswith("igw_")
    assert rig.inflight() == {A: 0}
    session.finish()
    assert rig.tracker.inflight == 0


async def test_empty_pool_is_503() -> None:
    rig = make_rig(addresses=())
    session = rig.session()
    await session.handle(req_headers())
    (reply,) = await session.handle(req_body(json_body(), eos=True))
    status, payload, _ = immediate(reply)
    assert status == 503
    assert "no endpoints" in payload["error"]["message"]


async def test_shed_is_429() -> None:
    rig = make_rig(max_inflight=1)
    first = rig.session()
    await first.handle(req_headers())
    await first.handle(req_body(json_body(), eos=True))
    second = rig.session()
    await second.handle(req_headers())
    (reply,) = await second.handle(req_body(json_body(), eos=True))
    status, payload, _ = immediate(reply)
    assert status == 429
    assert "limit 1" in payload["error"]["message"]
    first.finish()
    second.finish()
    assert rig.inflight() == {A: 0}


# --------------------------------------------------------------------------------------------
# subset hint from metadata
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("hint", "allowed"),
    [(None, {A, B}), ([B], {B}), (["10.0.0.1"], {A}), ([B, 7], {B})],
    ids=["absent", "exact", "ip-only", "non-string-ignored"],
)
async def test_subset_hint_from_metadata(hint: list[Any] | None, allowed: set[str]) -> None:
    rig = make_rig(addresses=(A, B))
    seen = set()
    for _ in range(12):
        session = rig.session()
        msg = req_headers()
        if hint is not None:
            values = [
                struct_pb2.Value(string_value=h) if isinstance(h, str) else struct_pb2.Value(number_value=h)
                for h in hint
            ]
            msg.metadata_context.filter_metadata[HINT_NS].fields[HINT_KEY].CopyFrom(
                struct_pb2.Value(list_value=struct_pb2.ListValue(values=values))
            )
        await session.handle(msg)
        replies = await session.handle(req_body(json_body(), eos=True))
        seen.add(lb_destination(replies[0]))
        session.finish()
    assert seen == allowed


# --------------------------------------------------------------------------------------------
# headers-only requests
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("eos", "mode"),
    [(True, DUPLEX), (True, BUFFERED), (False, MODE.NONE)],
    ids=["get-duplex", "get-buffered", "body-mode-none"],
)
async def test_headers_only_routed_at_once(eos: bool, mode: int) -> None:
    rig = make_rig()
    session = rig.session()
    replies = await session.handle(req_headers({":method": "GET", ":path": "/v1/models"}, eos=eos, mode=mode))
    assert len(replies) == 1
    reply = replies[0]
    assert reply.WhichOneof("response") == "request_headers"
    common = reply.request_headers.response
    assert common.clear_route_cache is True
    hdrs = set_headers(common.header_mutation)
    assert hdrs[DEST] == A
    assert "content-length" not in hdrs
    assert lb_destination(reply) == A
    assert rig.inflight() == {A: 1}
    with pytest.raises(ProtocolError):
        await session.handle(req_body(b"{}", eos=True))
    session.finish()
    assert rig.inflight() == {A: 0}


async def test_headers_only_with_empty_pool_is_503() -> None:
    rig = make_rig(addresses=())
    session = rig.session()
    (reply,) = await session.handle(req_headers(eos=True))
    status, _, _ = immediate(reply)
    assert status == 503


# --------------------------------------------------------------------------------------------
# response path
# --------------------------------------------------------------------------------------------


async def routed(rig: Rig, mode: int = DUPLEX, response_mode: int | None = None) -> ExtProcSession:
    session = rig.session()
    await session.handle(req_headers(mode=mode, response_mode=response_mode))
    await session.handle(req_body(json_body(), eos=True))
    return session


@pytest.mark.parametrize(
    ("msg", "status", "served"),
    [
        (resp_headers("200"), 200, None),
        (resp_headers("503"), 503, None),
        (resp_headers(None), None, None),
        (resp_headers("abc"), None, None),
        (resp_headers("200", served_meta=B), 200, B),
        (resp_headers("200", upstream=B), 200, B),
        (resp_headers("200", served_meta=A, upstream=B), 200, A),
        (resp_headers("200", served_header=B), 200, B),
        (resp_headers("200", served_meta=""), 200, None),
    ],
    ids=[
        "ok",
        "server-error",
        "no-status",
        "bad-status",
        "served-metadata",
        "upstream-attribute",
        "metadata-wins",
        "served-header",
        "empty-metadata",
    ],
)
async def test_response_headers(msg: ep.ProcessingRequest, status: int | None, served: str | None) -> None:
    rig = make_rig(addresses=(A, B))
    rig.store.update_metrics(B, EndpointMetrics(waiting=50, scraped_at=time.monotonic()))
    session = await routed(rig)
    assert rig.inflight() == {A: 1, B: 0}
    replies = await session.handle(msg)
    assert len(replies) == 1
    assert replies[0].WhichOneof("response") == "response_headers"
    assert session.ctx is not None
    assert (session.ctx.status, session.ctx.served) == (status, served)
    removed = list(replies[0].response_headers.response.header_mutation.remove_headers)
    has_header = any(h.key == SERVED for h in msg.response_headers.headers.headers)
    assert removed == ([SERVED] if has_header else [])
    expect = {A: 0, B: 1} if served == B else {A: 1, B: 0}
    assert rig.inflight() == expect
    session.finish()
    assert rig.inflight() == {A: 0, B: 0}


@pytest.mark.parametrize(
    ("response_mode", "kind"),
    [(None, "continue"), (DUPLEX, "echo"), (BUFFERED, "continue")],
    ids=["default", "duplex-echo", "buffered"],
)
async def test_response_body_and_trailers(response_mode: int | None, kind: str) -> None:
    rig = make_rig()
    session = await routed(rig, response_mode=response_mode)
    await session.handle(resp_headers())
    for data, eos in ((b"data: 1\n\n", False), (b"data: [DONE]\n\n", True)):
        (reply,) = await session.handle(ep.ProcessingRequest(response_body=ep.HttpBody(body=data, end_of_stream=eos)))
        assert reply.WhichOneof("response") == "response_body"
        if kind == "echo":
            streamed = reply.response_body.response.body_mutation.streamed_response
            assert (streamed.body, streamed.end_of_stream) == (data, eos)
        else:
            assert not reply.response_body.HasField("response")
    (reply,) = await session.handle(ep.ProcessingRequest(response_trailers=ep.HttpTrailers()))
    assert reply.WhichOneof("response") == "response_trailers"


# --------------------------------------------------------------------------------------------
# finish(): exactly once, also on early stream end
# --------------------------------------------------------------------------------------------


async def test_finish_twice_releases_once() -> None:
    rig = make_rig()
    one = await routed(rig)
    two = await routed(rig)
    assert rig.inflight() == {A: 2}
    one.finish()
    one.finish()
    assert rig.inflight() == {A: 1}
    assert rig.tracker.inflight == 1
    two.finish()
    assert rig.inflight() == {A: 0}
    assert rig.tracker.inflight == 0
    assert rig.metrics.registry.get_sample_value("inference_objective_running_requests", {"model_name": "m"}) == 0


@pytest.mark.parametrize(
    "steps",
    ["headers", "headers+partial-body", "headers+body-then-abort", "routed+response-headers", "nothing"],
    ids=["after-headers", "before-body-end", "after-route", "after-response-headers", "empty-stream"],
)
async def test_client_abort_releases_everything(steps: str) -> None:
    rig = make_rig()
    other = await routed(rig)  # an unrelated request that must stay counted
    session = rig.session()
    if steps != "nothing":
        await session.handle(req_headers())
    if steps == "headers+partial-body":
        await session.handle(req_body(b'{"model":"m","pro', eos=False))
    if steps in ("headers+body-then-abort", "routed+response-headers"):
        await session.handle(req_body(json_body(), eos=True))
        assert rig.inflight() == {A: 2}
    if steps == "routed+response-headers":
        await session.handle(resp_headers())
    session.finish()
    session.finish()
    assert rig.inflight() == {A: 1}
    assert rig.tracker.inflight == 1
    other.finish()
    assert rig.inflight() == {A: 0}


# --------------------------------------------------------------------------------------------
# protocol errors
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("messages", "needle"),
    [
        ([ep.ProcessingRequest()], "empty message before request_headers"),
        ([req_body(b"x", True)], "before request_headers"),
        ([resp_headers()], "before request_headers"),
        ([req_headers(), req_headers()], "twice"),
        ([req_headers(mode=MODE.STREAMED)], "STREAMED"),
        ([req_headers(mode=MODE.BUFFERED_PARTIAL)], "BUFFERED_PARTIAL"),
        ([req_headers(), resp_headers()], "before the request was routed"),
        ([req_headers(), ep.ProcessingRequest()], "before the request was routed"),
        ([req_headers(), req_body(json_body(), True), req_body(b"x", True)], "after the request was routed"),
        ([req_headers(mode=MODE.NONE), req_body(b"x", True)], "after the request was routed"),
        ([req_headers(), req_body(json_body(), True), ep.ProcessingRequest()], "empty ProcessingRequest"),
    ],
    ids=[
        "empty-first",
        "body-first",
        "response-first",
        "headers-twice",
        "streamed-mode",
        "buffered-partial-mode",
        "response-before-route",
        "empty-before-route",
        "body-after-route",
        "body-in-none-mode",
        "empty-after-route",
    ],
)
async def test_protocol_errors(messages: list[ep.ProcessingRequest], needle: str) -> None:
    rig = make_rig()
    session = rig.session()
    for msg in messages[:-1]:
        await session.handle(msg)
    with pytest.raises(ProtocolError, match=needle):
        await session.handle(messages[-1])
    session.finish()
    assert rig.inflight() == {A: 0}
    assert rig.tracker.inflight == 0


async def test_unknown_body_mode_number_is_a_protocol_error() -> None:
    session = make_rig().session()
    with pytest.raises(ProtocolError):
        await session.handle(req_headers(mode=99))


@pytest.mark.parametrize(
    "raw",
    [(":status", b"\xff\xfe"), (":status", "²".encode()), (SERVED, b"10.0.0.2:80\xff")],
    ids=["status-not-utf8", "status-superscript-digit", "served-header-not-utf8"],
)
async def test_odd_response_header_bytes_do_not_crash(raw: tuple[str, bytes]) -> None:
    rig = make_rig()
    session = await routed(rig)
    msg = ep.ProcessingRequest(
        response_headers=ep.HttpHeaders(
            headers=base_pb2.HeaderMap(headers=[base_pb2.HeaderValue(key=raw[0], raw_value=raw[1])])
        )
    )
    replies = await session.handle(msg)
    assert [r.WhichOneof("response") for r in replies] == ["response_headers"]
