"""``session-affinity-scorer``: keep a client session on the endpoint that served it.

Consumes the request header ``x-session-token``: the base64 (standard alphabet) of the
``host:port`` address of the endpoint that served the session's previous request. Score: 1.0
for the candidate with that address, 0.0 for every other one. No token, a token that is not
valid base64 or UTF-8, or an address that is no longer a candidate: 0.0 everywhere (no
affinity; the other scorers decide).

As a response-headers hook it hands out the token: the response to every routed request
carries ``x-session-token: base64(address of the serving endpoint)`` (the one the proxy
reports, else the EPP's pick), so a client that echoes the header stays on that endpoint.
(llm-d encodes ``namespace/pod``; igw endpoints are addresses, so the token is the address.)

No parameters. Category: Affinity.
"""

from __future__ import annotations

import base64
from collections.abc import Mapping, Sequence

from igw.api.types import EndpointState, InferenceRequest
from igw.framework.registry import register
from igw.framework.requestcontrol import ResponseHeadersHook
from igw.framework.scheduling import Scorer, ScorerCategory

SESSION_TOKEN_HEADER = "x-session-token"


def encode_token(address: str) -> str:
    return base64.b64encode(address.encode()).decode("ascii")


def decode_token(token: str) -> str | None:
    """The address in ``token``, or ``None`` when it is not valid base64 of UTF-8 text."""
    try:
        return base64.b64decode(token.strip(), validate=True).decode()
    except ValueError:  # binascii.Error, UnicodeDecodeError, non-ASCII text
        return None


@register
class SessionAffinityScorer(Scorer, ResponseHeadersHook):
    type_name = "session-affinity-scorer"
    category = ScorerCategory.AFFINITY
    bounded = True

    def score(self, request: InferenceRequest, candidates: Sequence[EndpointState]) -> list[float]:
        token = request.headers.get(SESSION_TOKEN_HEADER)
        address = decode_token(token) if token else None
        if address is None:
            return [0.0] * len(candidates)
        return [1.0 if c.address == address else 0.0 for c in candidates]

    def on_response_headers(
        self, request: InferenceRequest, endpoint: str | None, status: int | None
    ) -> Mapping[str, str] | None:
        if not endpoint:
            return None
        return {SESSION_TOKEN_HEADER: encode_token(endpoint)}
