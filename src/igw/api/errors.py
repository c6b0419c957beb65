"""The errors a request can end with.

Every error a stage raises for a request is one of these; ``extproc.responses.error_response``
is the single place that turns them into an HTTP status for the proxy::

    IgwError                      (500) something broke inside igw
    ├── BadRequest                (400) unparsable body, missing model or prompt
    ├── ModelNotFound             (404) the pool declares its models and this is not one
    ├── PayloadTooLarge           (413) body over ``max_request_body_bytes``
    ├── Shed                      (429) rejected by admission or flow control
    ├── SchedulingFailed          (429) the scheduler's filters or picker left no endpoint
    └── NoEndpoint                (503) no endpoint can take the request
"""

from __future__ import annotations

from enum import StrEnum


class ErrorCode(StrEnum):
    """Low-cardinality error codes; also the ``error_code`` metric label."""

    BAD_REQUEST = "BadRequest"
    NOT_FOUND = "NotFound"
    PAYLOAD_TOO_LARGE = "PayloadTooLarge"
    RESOURCE_EXHAUSTED = "ResourceExhausted"
    SERVICE_UNAVAILABLE = "ServiceUnavailable"
    INTERNAL = "Internal"


class IgwError(Exception):
    """Base class: a request failed; ``message`` is shown to the client."""

    code: ErrorCode = ErrorCode.INTERNAL

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class BadRequest(IgwError):
    code = ErrorCode.BAD_REQUEST


class ModelNotFound(IgwError):
    code = ErrorCode.NOT_FOUND


class PayloadTooLarge(IgwError):
    code = ErrorCode.PAYLOAD_TOO_LARGE


class Shed(IgwError):
    code = ErrorCode.RESOURCE_EXHAUSTED


class SchedulingFailed(IgwError):
    """Candidates existed, but the scheduling profile ended with none (the reference's 429)."""

    code = ErrorCode.RESOURCE_EXHAUSTED


class NoEndpoint(IgwError):
    code = ErrorCode.SERVICE_UNAVAILABLE
