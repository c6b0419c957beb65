"""Builders for ext_proc ``ProcessingResponse`` messages, and the one error -> status mapping."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import orjson
from envoy.config.core.v3 import base_pb2
from envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep
from envoy.type.v3 import http_status_pb2
from google.protobuf import struct_pb2

from igw.api.errors import ErrorCode, IgwError
from igw.api.protocol import DESTINATION_HEADER, LB_METADATA_NAMESPACE

_OVERWRITE = base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD

HTTP_STATUS: dict[ErrorCode, int] = {
    ErrorCode.BAD_REQUEST: 400,
    ErrorCode.NOT_FOUND: 404,
    ErrorCode.PAYLOAD_TOO_LARGE: 413,
    ErrorCode.RESOURCE_EXHAUSTED: 429,
    ErrorCode.SERVICE_UNAVAILABLE: 503,
    ErrorCode.INTERNAL: 500,
}
_ERROR_TYPE: dict[int, str] = {
    400: "invalid_request_error",
    404: "not_found_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    503: "service_unavailable",
    500: "internal_error",
}


def error_response(error: IgwError, *, request_id: str | None = None) -> ep.ProcessingResponse:
    """The only place an igw error becomes an HTTP status: an ImmediateResponse to the client.

    The body is OpenAI-shaped JSON whose message says what went wrong.
    """
    status = HTTP_STATUS.get(error.code, 500)
    body = orjson.dumps({"error": {"message": error.message, "type": _ERROR_TYPE[status], "code": status}})
    headers = {"content-type": "application/json"}
    if request_id:
        headers["x-request-id"] = request_id
    return ep.ProcessingResponse(
        immediate_response=ep.ImmediateResponse(
            status=http_status_pb2.HttpStatus(code=status),
            headers=header_mutation(headers),
            body=body,
            details=f"igw_{error.code.value}",
        )
    )


def header_mutation(set_headers: Mapping[str, str] | None = None, remove: Iterable[str] = ()) -> ep.HeaderMutation:
    return ep.HeaderMutation(
        set_headers=[
            base_pb2.HeaderValueOption(
                header=base_pb2.HeaderValue(key=k, raw_value=v.encode()), append_action=_OVERWRITE
            )
            for k, v in (set_headers or {}).items()
        ],
        remove_headers=list(remove),
    )


def destination_metadata(destination: str) -> struct_pb2.Struct:
    meta = struct_pb2.Struct()
    meta.fields[LB_METADATA_NAMESPACE].struct_value.fields[DESTINATION_HEADER].string_value = destination
    return meta


_PM = processing_mode_pb2.ProcessingMode
STREAM_RESPONSE_BODY = _PM(
    request_header_mode=_PM.SEND, request_body_mode=_PM.BUFFERED, request_trailer_mode=_PM.SKIP,
    response_header_mode=_PM.SEND, response_body_mode=_PM.STREAMED, response_trailer_mode=_PM.SKIP,
)  # fmt: skip
"""Buffered mode, plus the response body in chunks (Envoy replaces the whole mode on override)."""


def continue_request_headers(
    set_headers: Mapping[str, str] | None = None, *, mode_override: Any = None
) -> ep.ProcessingResponse:
    common = ep.CommonResponse(header_mutation=header_mutation(set_headers)) if set_headers else None
    return ep.ProcessingResponse(request_headers=ep.HeadersResponse(response=common), mode_override=mode_override)


def replace_response_chunk(body: bytes) -> ep.ProcessingResponse:
    """Streamed mode: this response chunk becomes ``body``."""
    return ep.ProcessingResponse(
        response_body=ep.BodyResponse(response=ep.CommonResponse(body_mutation=ep.BodyMutation(body=body)))
    )


def routed_headers(set_headers: Mapping[str, str], destination: str) -> ep.ProcessingResponse:
    """Full-duplex mode: the held request-headers reply, carrying the destination."""
    return ep.ProcessingResponse(
        request_headers=ep.HeadersResponse(
            response=ep.CommonResponse(header_mutation=header_mutation(set_headers), clear_route_cache=True)
        ),
        dynamic_metadata=destination_metadata(destination),
    )


def routed_body(set_headers: Mapping[str, str], destination: str, *, new_body: bytes | None = None) -> Any:
    """Buffered mode: the body reply carries the header mutation (Envoy still holds the headers),
    and the replacement body if the request was rewritten (``set_headers`` then has its length)."""
    common = ep.CommonResponse(header_mutation=header_mutation(set_headers), clear_route_cache=True)
    if new_body is not None:
        common.body_mutation.body = new_body
    return ep.ProcessingResponse(
        request_body=ep.BodyResponse(response=common), dynamic_metadata=destination_metadata(destination)
    )


def streamed_body(body: bytes, *, chunk_size: int, end_of_stream: bool = True) -> list[ep.ProcessingResponse]:
    """Echo ``body`` as streamed body responses of at most ``chunk_size`` bytes each."""
    chunks = [body[i : i + chunk_size] for i in range(0, len(body), chunk_size)] or [b""]
    last = len(chunks) - 1
    return [
        ep.ProcessingResponse(
            request_body=ep.BodyResponse(
                response=ep.CommonResponse(
                    body_mutation=ep.BodyMutation(
                        streamed_response=ep.StreamedBodyResponse(body=chunk, end_of_stream=end_of_stream and i == last)
                    )
                )
            )
        )
        for i, chunk in enumerate(chunks)
    ]


def echo_response_body(body: bytes, end_of_stream: bool) -> ep.ProcessingResponse:
    return ep.ProcessingResponse(
        response_body=ep.BodyResponse(
            response=ep.CommonResponse(
                body_mutation=ep.BodyMutation(
                    streamed_response=ep.StreamedBodyResponse(body=body, end_of_stream=end_of_stream)
                )
            )
        )
    )


def continue_response_headers(
    remove: Iterable[str] = (), set_headers: Mapping[str, str] | None = None
) -> ep.ProcessingResponse:
    remove = list(remove)
    changed = remove or set_headers
    common = ep.CommonResponse(header_mutation=header_mutation(set_headers, remove)) if changed else None
    return ep.ProcessingResponse(response_headers=ep.HeadersResponse(response=common))


CONTINUE_RESPONSE_BODY = ep.ProcessingResponse(response_body=ep.BodyResponse())
REQUEST_TRAILERS = ep.ProcessingResponse(request_trailers=ep.TrailersResponse())
RESPONSE_TRAILERS = ep.ProcessingResponse(response_trailers=ep.TrailersResponse())
