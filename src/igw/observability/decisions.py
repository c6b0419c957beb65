"""Decision explanations: why a request went where it went.

An explanation lists the candidates the scorers saw, each scorer's score and weight, the
total, the endpoint chosen and the fallbacks, and how many candidates each filter left.
Recording a decision only keeps a reference to the scheduling result (O(1) on the request
path); it is rendered to JSON when someone asks: through the ``x-igw-explain`` request header
(answered in the ``x-igw-decision`` response header, when enabled) or from the ring buffer of
recent decisions served at ``/debug/decisions`` on the metrics port.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from typing import Any, NamedTuple

import orjson

from igw.api.types import InferenceRequest
from igw.framework.scheduling import SchedulingResult

EXPLAIN_HEADER = "x-igw-explain"
"""Request header asking for an explanation (any non-empty value)."""
DECISION_HEADER = "x-igw-decision"
"""Response header carrying the explanation (compact JSON)."""


class RequestFacts(NamedTuple):
    """What an explanation says about the request (kept instead of the request and its body)."""

    request_id: str
    model: str | None
    target_model: str | None
    objective: str | None
    priority: int

    @classmethod
    def of(cls, request: InferenceRequest) -> RequestFacts:
        return cls(request.request_id, request.model, request.effective_model, request.objective, request.priority)


def explain(
    request: InferenceRequest | RequestFacts, result: SchedulingResult, *, top: int | None = None
) -> dict[str, Any]:
    """The decision as a JSON-ready dict; ``top`` limits the candidates listed (best first)."""
    facts = RequestFacts.of(request) if isinstance(request, InferenceRequest) else request
    order = sorted(range(len(result.candidates)), key=result.totals.__getitem__, reverse=True)
    if top is not None:
        order = order[:top]
    return {
        "requestId": facts.request_id,
        "model": facts.model,
        "targetModel": facts.target_model,
        "objective": facts.objective,
        "priority": facts.priority,
        "profile": result.profile,
        "filters": [{"name": name or "(pool)", "left": left} for name, left in result.filtered],
        "weights": dict(result.weights),
        "candidates": [
            {
                "endpoint": result.candidates[i].address,
                "total": round(result.totals[i], 6),
                "scores": {name: round(values[i], 6) for name, values in result.raw_scores.items()},
            }
            for i in order
        ],
        "picked": result.endpoints[0].address if result.endpoints else None,
        "fallbacks": [e.address for e in result.endpoints[1:]],
    }


def explain_header(request: InferenceRequest, result: SchedulingResult, *, top: int) -> str:
    return orjson.dumps(explain(request, result, top=top)).decode()


class DecisionLog:
    """The last ``size`` decisions (0: keep none)."""

    def __init__(self, size: int, *, clock: Callable[[], float] = time.time) -> None:
        self.size = size
        self._entries: deque[tuple[float, RequestFacts, SchedulingResult]] = deque(maxlen=max(size, 1))
        self._clock = clock

    def record(self, request: InferenceRequest, result: SchedulingResult) -> None:
        if self.size:
            self._entries.append((self._clock(), RequestFacts.of(request), result))

    def render(self, *, limit: int | None = None, top: int | None = None) -> list[dict[str, Any]]:
        """Newest first."""
        entries = list(self._entries)[::-1]
        if limit is not None:
            entries = entries[:limit]
        return [{"time": at, **explain(request, result, top=top)} for at, request, result in entries]
