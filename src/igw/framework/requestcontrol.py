"""Contracts of the request-control plugins: around scheduling rather than inside it.

Order on the request path (the director): the Parser decodes the body; DataProducers fill
``request.data`` for the scorers (in dependency order of what they consume and produce);
Admitters may refuse the request; the scheduler picks; PreRequest hooks see the pick; the
response hooks see the response headers and the end of the request. The failure policy of
each hook kind is in :mod:`igw.framework.plugin`.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Mapping, Sequence
from typing import ClassVar

from igw.api.types import EndpointState, InferenceRequest
from igw.framework.plugin import Plugin
from igw.framework.scheduling import SchedulingResult


class Parser(Plugin):
    """Turns a request body into an :class:`InferenceRequest` (raises ``BadRequest`` on bad input)."""

    @abstractmethod
    def parse(self, body: bytes, *, path: str, request_id: str, headers: dict[str, str]) -> InferenceRequest: ...


class DataProducer(Plugin):
    """Computes per-request data (``request.data[key]``) before scheduling."""

    produces: ClassVar[frozenset[str]] = frozenset()

    @abstractmethod
    def prepare(self, request: InferenceRequest, candidates: Sequence[EndpointState]) -> None:
        """Write the produced keys into ``request.data``. Must be fast: it runs on the request path."""


class Admitter(Plugin):
    """May refuse a request before scheduling: raise :class:`~igw.api.errors.Shed` (429)."""

    @abstractmethod
    def admit(self, request: InferenceRequest, candidates: Sequence[EndpointState]) -> None: ...


class PreRequest(Plugin):
    """Sees every successful pick before the proxy is told (update indexes, load counters...)."""

    @abstractmethod
    def pre_request(self, request: InferenceRequest, result: SchedulingResult) -> None: ...


class ResponseHeadersHook(Plugin):
    """Sees the model server's response headers; may add headers to the client's response."""

    @abstractmethod
    def on_response_headers(
        self, request: InferenceRequest, endpoint: str | None, status: int | None
    ) -> Mapping[str, str] | None:
        """``endpoint`` is the one that served the request (as far as the EPP knows)."""


class ResponseCompleteHook(Plugin):
    """Called once when a routed request ends (completed, failed or aborted by the client)."""

    @abstractmethod
    def on_response_complete(self, request: InferenceRequest, endpoint: str) -> None: ...


class SaturationDetector(Plugin):
    """How full the pool is: 0 idle, 1 and above saturated."""

    @abstractmethod
    def saturation(self, candidates: Sequence[EndpointState]) -> float: ...
