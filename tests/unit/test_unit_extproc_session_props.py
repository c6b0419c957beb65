"""Property: any message sequence gives replies or ProtocolError, and in-flight counts return to zero."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from envoy.config.core.v3 import base_pb2
from envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep
from google.protobuf import struct_pb2
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
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
A, B = "10.0.0.1:8000", "10.0.0.2:8000"
SERVED = "x-gateway-destination-endpoint-served"
ERROR_STATUSES = {400, 404, 413, 429, 500, 503}


def header_map(headers: dict[str, str]) -> base_pb2.HeaderMap:
    return base_pb2.HeaderMap(headers=[base_pb2.HeaderValue(key=k, raw_value=v.encode()) for k, v in headers.items()])


# --------------------------------------------------------------------------------------------
# message strategies
# --------------------------------------------------------------------------------------------


@st.composite
def request_headers(draw: st.DrawFn) -> ep.ProcessingRequest:
    headers = {
        ":method": draw(st.sampled_from(["POST", "GET"])),
        ":path": draw(st.sampled_from(["/v1/completions", "/v1/chat/completions", "/v1/models", "/", ""])),
    }
    if draw(st.booleans()):
        headers["x-request-id"] = draw(st.sampled_from(["rid", "", "r-" + "9" * 40]))
    msg = ep.ProcessingRequest(
        request_headers=ep.HttpHeaders(headers=header_map(headers), end_of_stream=draw(st.integers(0, 3)) == 0)
    )
    duplex, buffered = MODE.FULL_DUPLEX_STREAMED, MODE.BUFFERED
    mode = draw(st.sampled_from([None, duplex, duplex, duplex, buffered, buffered, MODE.NONE, MODE.STREAMED]))
    if mode is not None:
        msg.protocol_config.request_body_mode = mode
        msg.protocol_config.response_body_mode = draw(st.sampled_from([MODE.NONE, MODE.FULL_DUPLEX_STREAMED]))
    hint = draw(
        st.none() | st.none() | st.lists(st.sampled_from([A, B, "10.0.0.1", "10.0.0.2:1", "9.9.9.9:9"]), max_size=3)
    )
    if hint is not None:
        value = struct_pb2.Value(
            list_value=struct_pb2.ListValue(values=[struct_pb2.Value(string_value=h) for h in hint])
        )
        msg.metadata_context.filter_metadata["envoy.lb.subset_hint"].fields[
            "x-gateway-destination-endpoint-subset"
        ].CopyFrom(value)
    return msg


VALID_BODIES = [
    b'{"model":"m","prompt":"hello"}',
    b'{"model":"m","messages":[{"role":"user","content":"hi"}]}',
    b'{"model":"m","prompt":"' + b"p" * 70_000 + b'"}',
]
BAD_BODIES = [b'{"model":"other","prompt":"x"}', b'{"model":"m"}', b"{not json", b"", b"x" * 300]
BODIES = st.one_of(
    st.sampled_from(VALID_BODIES), st.sampled_from(VALID_BODIES), st.sampled_from(BAD_BODIES), st.binary(max_size=40)
)


@st.composite
def request_body(draw: st.DrawFn) -> ep.ProcessingRequest:
    data = draw(BODIES)
    if data and draw(st.integers(0, 3)) == 0:  # a piece of a body
        cut = draw(st.integers(0, len(data)))
        data = data[:cut] if draw(st.booleans()) else data[cut:]
    return ep.ProcessingRequest(request_body=ep.HttpBody(body=data, end_of_stream=draw(st.integers(0, 2)) > 0))


@st.composite
def response_headers(draw: st.DrawFn) -> ep.ProcessingRequest:
    headers: dict[str, str] = {}
    status = draw(
        st.none()
        | st.sampled_from(["200", "404", "500", "503", "abc", "", "0", "99999999999", "\u00b2", "\uff12\uff10\uff10"])
    )
    if status is not None:
        headers[":status"] = status
    served_choices = st.sampled_from([A, B, "9.9.9.9:9", ""])
    if draw(st.booleans()):
        headers[SERVED] = draw(served_choices)
    msg = ep.ProcessingRequest(response_headers=ep.HttpHeaders(headers=header_map(headers)))
    if draw(st.booleans()):
        msg.metadata_context.filter_metadata["envoy.lb"].fields[SERVED].string_value = draw(served_choices)
    if draw(st.booleans()):
        attrs = msg.attributes["envoy.filters.http.ext_proc"]
        attrs.fields["upstream.address"].string_value = draw(served_choices)
    return msg


MESSAGES = st.one_of(
    request_headers(),
    request_body(),
    st.just(ep.ProcessingRequest(request_trailers=ep.HttpTrailers())),
    response_headers(),
    response_headers(),
    response_headers(),
    st.builds(
        lambda data, eos: ep.ProcessingRequest(response_body=ep.HttpBody(body=data, end_of_stream=eos)),
        st.binary(max_size=20),
        st.booleans(),
    ),
    st.builds(
        lambda data, eos: ep.ProcessingRequest(response_body=ep.HttpBody(body=data, end_of_stream=eos)),
        st.binary(max_size=20),
        st.booleans(),
    ),
    st.just(ep.ProcessingRequest(response_trailers=ep.HttpTrailers())),
    st.just(ep.ProcessingRequest()),
)


@st.composite
def scripts(draw: st.DrawFn) -> list[tuple[int, ep.ProcessingRequest]]:
    """Up to ~12 steps over one or two interleaved streams.

    Each stream usually opens with request headers, often followed by a complete valid body (so
    that the routed states and the response path get explored), then random messages follow.
    """
    n_streams = draw(st.integers(1, 2))
    steps: list[tuple[int, ep.ProcessingRequest]] = []
    for i in range(n_streams):
        opening = draw(
            st.sampled_from(["none", "headers", "headers+body", "headers+body+response", "headers+body+response"])
        )
        if opening == "none":
            continue
        steps.append((i, draw(request_headers())))
        if opening.startswith("headers+body"):
            data = draw(st.sampled_from(VALID_BODIES))
            n = draw(st.sampled_from([1, 1, 2, 3]))
            step = -(-len(data) // n)
            pieces = [data[j : j + step] for j in range(0, len(data), step)]
            for j, piece in enumerate(pieces):
                steps.append(
                    (i, ep.ProcessingRequest(request_body=ep.HttpBody(body=piece, end_of_stream=j == len(pieces) - 1)))
                )
        if opening.endswith("+response"):
            steps.append((i, draw(response_headers())))
    rest = draw(st.lists(st.tuples(st.integers(0, n_streams - 1), MESSAGES), max_size=max(2, 12 - len(steps))))
    return steps + rest


# --------------------------------------------------------------------------------------------
# the property
# --------------------------------------------------------------------------------------------


def build(
    addresses: list[str], models: list[str] | None, max_inflight: int, server: ServerSettings
) -> tuple[EndpointStore, RequestTracker, EppMetrics, Director]:
    settings = EppSettings(admission=AdmissionSettings(max_inflight_requests=max_inflight))
    store = EndpointStore()
    endpoints = []
    for address in addresses:
        host, port = Endpoint.parse_address(address)
        endpoints.append(Endpoint(address, host, port, models=frozenset(models) if models is not None else None))
    store.set_endpoints(endpoints)
    for s in store.endpoints():
        store.update_metrics(s.address, EndpointMetrics(scraped_at=time.monotonic()))
    metrics = EppMetrics(CollectorRegistry())
    director = build_director(settings, store, metrics)
    tracker = director.tracker
    return store, tracker, metrics, director


def check_reply(reply: Any) -> None:
    assert isinstance(reply, ep.ProcessingResponse)
    kind = reply.WhichOneof("response")
    assert kind is not None
    if kind == "immediate_response":
        assert reply.immediate_response.status.code in ERROR_STATUSES
    if kind == "request_body" and reply.request_body.response.body_mutation.HasField("streamed_response"):
        assert len(reply.request_body.response.body_mutation.streamed_response.body) <= 62_000


@settings(
    max_examples=250,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(
    script=scripts(),
    addresses=st.sampled_from([[A], [A, B], [A, B], []]),
    models=st.sampled_from([None, ["m"]]),
    max_inflight=st.sampled_from([0, 1]),
    default_mode=st.sampled_from(list(BodyMode)),
    body_limit=st.sampled_from([64, 1 << 20]),
)
def test_any_sequence_gives_replies_or_protocol_error_and_releases_inflight(
    script: list[tuple[int, ep.ProcessingRequest]],
    addresses: list[str],
    models: list[str] | None,
    max_inflight: int,
    default_mode: BodyMode,
    body_limit: int,
) -> None:
    server = ServerSettings(max_request_body_bytes=body_limit, default_body_mode=default_mode)
    store, tracker, metrics, director = build(addresses, models, max_inflight, server)
    sessions = [ExtProcSession(director, server), ExtProcSession(director, server)]
    aborted = [False, False]

    async def play() -> None:
        for index, msg in script:
            if aborted[index]:
                continue  # the gRPC server ends a stream at its first protocol error
            try:
                replies = await sessions[index].handle(msg)
            except ProtocolError:
                aborted[index] = True
                continue
            assert isinstance(replies, list)
            for reply in replies:
                check_reply(reply)
            assert tracker.inflight >= 0
            assert all(s.inflight >= 0 for s in store.endpoints())

    with asyncio.Runner() as runner:
        runner.run(play())

    for session in sessions:
        session.finish()
        session.finish()
    assert [s.inflight for s in store.endpoints()] == [0] * len(addresses)
    assert tracker.inflight == 0
    for model in ("", "m", "other"):
        value = metrics.registry.get_sample_value("inference_objective_running_requests", {"model_name": model})
        assert value in (None, 0.0)
