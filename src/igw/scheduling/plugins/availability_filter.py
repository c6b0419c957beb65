"""``availability-filter``: avoid endpoints whose metrics are stale or whose scrapes fail.

An endpoint is available when its last successful scrape is younger than
``stalenessThreshold`` seconds and fewer than ``maxConsecutiveFailures`` scrapes failed in a
row (defaults 2 s and 3).
If no candidate is available the filter returns them all: with no signal, any endpoint is
better than refusing the request (the proxy's retries and the model server's own errors
then speak).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from pydantic import Field

from igw.api.types import EndpointState, InferenceRequest
from igw.framework.plugin import Duration, Handle, PluginParams
from igw.framework.registry import register
from igw.framework.scheduling import Filter


class AvailabilityParams(PluginParams):
    staleness_threshold: Duration = Field(default=2.0, gt=0)
    max_consecutive_failures: int = Field(default=3, ge=1)


_INF = float("inf")


@register
class AvailabilityFilter(Filter):
    type_name = "availability-filter"
    Params = AvailabilityParams

    def __init__(
        self,
        name: str | None = None,
        *,
        staleness_threshold: float = 2.0,
        max_consecutive_failures: int = 3,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(name)
        self.staleness_threshold = staleness_threshold
        self.max_consecutive_failures = max_consecutive_failures
        self.clock = clock

    @classmethod
    def from_params(cls, name: str, params: AvailabilityParams, handle: Handle) -> AvailabilityFilter:
        return cls(
            name,
            staleness_threshold=params.staleness_threshold,
            max_consecutive_failures=params.max_consecutive_failures,
            clock=handle.clock,
        )

    def describe(self) -> Mapping[str, Any]:
        return {"stalenessThreshold": self.staleness_threshold, "maxConsecutiveFailures": self.max_consecutive_failures}

    def available(self, state: EndpointState, now: float) -> bool:
        return state.age(now) <= self.staleness_threshold and state.failures < self.max_consecutive_failures

    def filter(self, request: InferenceRequest, candidates: Sequence[EndpointState]) -> Sequence[EndpointState]:
        now = self.clock()
        limit, max_failures = self.staleness_threshold, self.max_consecutive_failures
        fresh = [
            c
            for c in candidates
            if c.failures < max_failures and (now - c.metrics.scraped_at if c.metrics.scraped_at else _INF) <= limit
        ]
        return fresh or candidates
