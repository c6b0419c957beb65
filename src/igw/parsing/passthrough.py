"""``passthrough-parser``: route without reading the body (any protocol, any payload).

The body is neither decoded nor checked; requests carry no model (unless the client names one
in ``x-gateway-model-name``) and no prompt, so prefix affinity has nothing to work on and the
load-based scorers decide. The body still counts toward the size limit and the token estimate.
"""

from __future__ import annotations

from igw.api.types import InferenceRequest
from igw.framework.registry import register
from igw.framework.requestcontrol import Parser

MODEL_HEADER = "x-gateway-model-name"


@register
class PassthroughParser(Parser):
    type_name = "passthrough-parser"

    def parse(self, body: bytes, *, path: str, request_id: str, headers: dict[str, str]) -> InferenceRequest:
        return InferenceRequest(
            request_id=request_id,
            model=headers.get(MODEL_HEADER) or None,
            path=path.split("?", 1)[0],
            body_size=len(body),
            headers=headers,
        )
