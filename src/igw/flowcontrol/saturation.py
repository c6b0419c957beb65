"""Saturation detectors: how full the pool is, and which endpoints are too full to use.

Both detectors are plugins with two roles: a :class:`SaturationDetector` (admission sheds
sheddable requests when saturation >= 1.0) and a :class:`Filter` (a profile may drop
endpoints above their limits). As filters they fail open: when every candidate is over its
limit, all are returned (better a long queue than a refusal decided on estimates).

``utilization-detector`` (the default), from scraped metrics:
    endpoint score = max(queue / queueDepthThreshold, kv / kvCacheUtilThreshold); an endpoint
    whose metrics are older than ``metricsStalenessThreshold`` (or never came) scores 1.0;
    pool saturation = mean over candidates (no candidates: 1.0). The queue counts the
    requests this EPP sent since the last scrape too, so a burst is seen before the next
    scrape reports it. As a filter: drops stale endpoints and those with queue >=
    threshold x (1 + headroom) or kv >= kvThreshold x (1 + headroom).

``concurrency-detector``, from the EPP's own in-flight accounting:
    ``concurrencyMode: requests`` counts requests in flight per endpoint, ``tokens`` the
    estimated tokens of those requests (:func:`igw.api.load.estimate_tokens`);
    pool saturation = total in flight / (candidates x limit). As a filter: keeps endpoints
    below limit x (1 + headroom).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from enum import StrEnum
from typing import Any

from pydantic import Field

from igw.api.load import InflightLedger, estimate_tokens
from igw.api.types import EndpointState, InferenceRequest
from igw.framework.plugin import Duration, Handle, PluginParams
from igw.framework.registry import register
from igw.framework.requestcontrol import PreRequest, ResponseCompleteHook, SaturationDetector
from igw.framework.scheduling import Filter, SchedulingResult


class UtilizationParams(PluginParams):
    queue_depth_threshold: float = Field(default=5, gt=0)
    kv_cache_util_threshold: float = Field(default=0.8, gt=0, le=1)
    metrics_staleness_threshold: Duration = Field(default=0.2, gt=0)
    headroom: float = Field(default=0.0, ge=0)


@register
class UtilizationDetector(SaturationDetector, Filter):
    type_name = "utilization-detector"
    Params = UtilizationParams

    def __init__(
        self,
        name: str | None = None,
        params: UtilizationParams | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(name)
        p = params or UtilizationParams()
        self.queue_threshold = p.queue_depth_threshold
        self.kv_threshold = p.kv_cache_util_threshold
        self.staleness = p.metrics_staleness_threshold
        self.headroom = p.headroom
        self.clock = clock

    @classmethod
    def from_params(cls, name: str, params: UtilizationParams, handle: Handle) -> UtilizationDetector:
        return cls(name, params, clock=handle.clock)

    def describe(self) -> Mapping[str, Any]:
        return {
            "queueDepthThreshold": self.queue_threshold,
            "kvCacheUtilThreshold": self.kv_threshold,
            "metricsStalenessThreshold": self.staleness,
            "headroom": self.headroom,
        }

    def saturation(self, candidates: Sequence[EndpointState]) -> float:
        if not candidates:
            return 1.0
        now = self.clock()
        qt, kvt, stale = self.queue_threshold, self.kv_threshold, self.staleness
        total = 0.0
        for c in candidates:
            m = c.metrics
            if not m.scraped_at or now - m.scraped_at > stale:
                total += 1.0
            else:
                total += max((m.waiting + c.dispatched_since_scrape) / qt, m.kv_usage / kvt)
        return total / len(candidates)

    def filter(self, request: InferenceRequest, candidates: Sequence[EndpointState]) -> Sequence[EndpointState]:
        now = self.clock()
        factor = 1.0 + self.headroom
        q_limit, kv_limit, stale = self.queue_threshold * factor, self.kv_threshold * factor, self.staleness
        kept = [
            c
            for c in candidates
            if c.metrics.scraped_at
            and now - c.metrics.scraped_at <= stale
            and c.metrics.waiting + c.dispatched_since_scrape < q_limit
            and c.metrics.kv_usage < kv_limit
        ]
        return kept or candidates


class ConcurrencyMode(StrEnum):
    REQUESTS = "requests"
    TOKENS = "tokens"


class ConcurrencyParams(PluginParams):
    concurrency_mode: ConcurrencyMode = ConcurrencyMode.REQUESTS
    max_concurrency: int = Field(default=100, gt=0)
    """Requests in flight per endpoint at which it counts as full (about 110% of its max batch)."""
    max_token_concurrency: int = Field(default=1_000_000, gt=0)
    headroom: float = Field(default=0.0, ge=0)


@register
class ConcurrencyDetector(SaturationDetector, Filter, PreRequest, ResponseCompleteHook):
    type_name = "concurrency-detector"
    Params = ConcurrencyParams

    def __init__(self, name: str | None = None, params: ConcurrencyParams | None = None) -> None:
        super().__init__(name)
        p = params or ConcurrencyParams()
        self.mode = p.concurrency_mode
        self.limit = float(p.max_concurrency if self.mode is ConcurrencyMode.REQUESTS else p.max_token_concurrency)
        self.headroom = p.headroom
        self._params = p
        self.ledger = InflightLedger()
        """Estimated tokens in flight per endpoint (tokens mode)."""

    @classmethod
    def from_params(cls, name: str, params: ConcurrencyParams, handle: Handle) -> ConcurrencyDetector:
        detector = cls(name, params)
        handle.on_endpoints_change(lambda: detector.ledger.retain(s.address for s in handle.endpoints()))
        return detector

    def describe(self) -> Mapping[str, Any]:
        return self._params.model_dump(by_alias=True, mode="json")

    def load(self, state: EndpointState) -> float:
        if self.mode is ConcurrencyMode.REQUESTS:
            return float(state.inflight)
        return float(self.ledger.load.get(state.address, 0))

    def saturation(self, candidates: Sequence[EndpointState]) -> float:
        if not candidates:
            return 1.0
        return sum(self.load(c) for c in candidates) / (self.limit * len(candidates))

    def filter(self, request: InferenceRequest, candidates: Sequence[EndpointState]) -> Sequence[EndpointState]:
        limit = self.limit * (1.0 + self.headroom)
        return [c for c in candidates if self.load(c) < limit] or candidates

    # -- token accounting (tokens mode) ---------------------------------------------------------
    def pre_request(self, request: InferenceRequest, result: SchedulingResult) -> None:
        if self.mode is ConcurrencyMode.TOKENS and result.endpoints:
            self.ledger.charge(request.key, result.endpoints[0].address, estimate_tokens(request))

    def on_response_complete(self, request: InferenceRequest, endpoint: str) -> None:
        self.ledger.release(request.key)
