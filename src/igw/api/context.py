"""Per-request lifecycle state, kept apart from the ext_proc protocol state.

The ext_proc session creates one ``RequestContext`` per stream; the director's stages fill it
in; accounting closes it exactly once when the stream ends.
"""

from __future__ import annotations

from dataclasses import dataclass

from igw.api.errors import ErrorCode
from igw.api.types import InferenceRequest


@dataclass(slots=True)
class RequestContext:
    request_id: str
    path: str
    headers: dict[str, str]
    started_at: float
    """``time.monotonic()`` when the request headers arrived."""
    subset_hint: list[str] | None = None
    """Endpoints the proxy allows (``None``: no hint, all endpoints)."""
    request: InferenceRequest | None = None
    destination: str | None = None
    """What the EPP told the proxy (comma list)."""
    picked: str | None = None
    """The endpoint charged with the request's in-flight count."""
    served: str | None = None
    """The endpoint that served it, when the proxy reports one."""
    status: int | None = None
    """HTTP status of the model server's response, when seen."""
    error: ErrorCode | None = None
    explanation: str | None = None
    """The decision explained (JSON), when the client asked and explanations are enabled."""
    finished: bool = False

    @property
    def model(self) -> str:
        return self.request.model or "" if self.request else ""
