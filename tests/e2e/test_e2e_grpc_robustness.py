"""The real gRPC server survives streams of random and out-of-order ext_proc messages."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

import grpc
import pytest
from envoy.config.core.v3 import base_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as ep_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from igw.app.epp import Epp
from igw.config.pool import pool_from_addresses
from igw.config.settings import EppSettings, ServerSettings


def _headers(eos: bool, path: str) -> ep.ProcessingRequest:
    hm = base_pb2.HeaderMap(headers=[base_pb2.HeaderValue(key=":path", raw_value=path.encode())])
    return ep.ProcessingRequest(request_headers=ep.HttpHeaders(headers=hm, end_of_stream=eos))


MESSAGES = st.one_of(
    st.builds(_headers, st.booleans(), st.sampled_from(["/v1/chat/completions", "/v1/completions", "/", ""])),
    st.builds(
        lambda body, eos: ep.ProcessingRequest(request_body=ep.HttpBody(body=body, end_of_stream=eos)),
        st.sampled_from([b"", b"{", b'{"model":"m","prompt":"p"}', b"\xff\xfe", b"[]"]),
        st.booleans(),
    ),
    st.just(ep.ProcessingRequest(request_trailers=ep.HttpTrailers())),
    st.just(ep.ProcessingRequest(response_headers=ep.HttpHeaders())),
    st.just(ep.ProcessingRequest(response_body=ep.HttpBody(body=b"data", end_of_stream=True))),
    st.just(ep.ProcessingRequest(response_trailers=ep.HttpTrailers())),
    st.just(ep.ProcessingRequest()),
)


async def _run_stream(stub: Any, messages: list[Any]) -> None:
    """Send the messages one by one (stopping if the server ends the call) and read every reply."""
    call = stub.Process(timeout=5)

    async def read() -> None:
        with contextlib.suppress(grpc.aio.AioRpcError):
            async for _ in call:
                pass

    reader = asyncio.ensure_future(read())
    for msg in messages:
        if call.done():
            break
        try:
            await call.write(msg)
        except (grpc.aio.AioRpcError, asyncio.InvalidStateError):
            break
    with contextlib.suppress(grpc.aio.AioRpcError, asyncio.InvalidStateError):
        await call.done_writing()
    await reader
    # OK, or INVALID_ARGUMENT for a protocol error. INTERNAL is the client's own write failing after
    # the server ended the call. A crash in the handler would be UNKNOWN.
    allowed = (grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.INTERNAL)
    assert await call.code() in allowed, await call.details()


async def test_random_message_sequences_never_break_the_server(caplog: pytest.LogCaptureFixture) -> None:
    epp = Epp(EppSettings(server=ServerSettings(grpc_port=0, health_port=0, metrics_port=0)),
              pool_from_addresses(["127.0.0.1:1", "127.0.0.1:2"]))  # fmt: skip
    await epp.start()
    loop = asyncio.get_running_loop()
    sequences: list[list[Any]] = []

    @settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(st.lists(MESSAGES, max_size=10))
    def collect(messages: list[Any]) -> None:
        sequences.append(messages)

    collect()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{epp.grpc_port}") as channel:
            stub = ep_grpc.ExternalProcessorStub(channel)
            for start in range(0, len(sequences), 15):  # some streams at once, as a proxy would
                await asyncio.gather(*(_run_stream(stub, seq) for seq in sequences[start : start + 15]))
            # still serving: a well-formed request is routed
            good = [_headers(False, "/v1/completions"),
                    ep.ProcessingRequest(request_body=ep.HttpBody(body=b'{"model":"m","prompt":"p"}', end_of_stream=True))]  # fmt: skip
            replies = [r async for r in stub.Process(iter(good), timeout=5)]
            assert replies[0].request_headers.response.header_mutation.set_headers[0].header.key == (
                "x-gateway-destination-endpoint"
            )
        assert loop.is_running()
        assert not [r for r in caplog.records if r.levelno >= logging.ERROR], "a stream crashed the handler"
        assert epp.metrics.protocol_errors._value.get() > 0
        assert all(s.inflight == 0 for s in epp.store.endpoints())
        assert epp.tracker.inflight == 0
    finally:
        await epp.stop()
