"""Model rewrites on the wire: the request body gets the target model, the response gets the
client's model back.

When a request for model ``A`` is sent to the server as model ``B`` (an InferenceModelRewrite,
a legacy InferenceModel's target models, or the client's ``x-gateway-model-name-rewrite``
header), the server answers ``"model": "B"``. The client must see the name it asked for, so
:class:`ModelRestorer` rewrites ``"model":"B"`` (with or without a space after the colon)
back to ``"model":"A"`` in the response bytes, chunk by chunk: a chunk boundary may cut the
pattern, so the last bytes of a chunk that could start a match are held back until the next
chunk (or the end of the body).
"""

from __future__ import annotations

from typing import Any

import orjson


def rewrite_body(body: dict[str, Any], target: str) -> bytes:
    """The request body with ``model`` replaced (the other fields as the client sent them)."""
    return orjson.dumps({**body, "model": target})


class ModelRestorer:
    """Replaces the target model name by the client's in a response body streamed in chunks."""

    __slots__ = ("_carry", "_hold", "_patterns", "_replacement")

    def __init__(self, requested: str, target: str) -> None:
        quoted_target = orjson.dumps(target)
        self._replacement = b'"model":' + orjson.dumps(requested)
        self._patterns = (b'"model":' + quoted_target, b'"model": ' + quoted_target)
        self._hold = max(len(p) for p in self._patterns) - 1
        """At most this many trailing bytes may be the start of a match."""
        self._carry = b""

    def feed(self, chunk: bytes, end_of_stream: bool = False) -> bytes:
        """The bytes to send now for ``chunk`` (some may be held until the next call)."""
        data = self._carry + chunk if self._carry else chunk
        last_end = 0
        if b'"model":' in data:
            for pattern in self._patterns:
                if pattern in data:
                    data = data.replace(pattern, self._replacement)
            last_end = data.rfind(self._replacement)
            last_end = last_end + len(self._replacement) if last_end >= 0 else 0
        if end_of_stream:
            self._carry = b""
            return data
        # Hold back the tail only from the first position where a pattern could begin.
        cut = len(data)
        pos = data.find(b'"', max(len(data) - self._hold, last_end))
        while pos != -1:
            tail = data[pos:]
            if any(p.startswith(tail) for p in self._patterns):
                cut = pos
                break
            pos = data.find(b'"', pos + 1)
        self._carry = data[cut:]
        return data[:cut]

    def flush(self) -> bytes:
        carry, self._carry = self._carry, b""
        return carry
