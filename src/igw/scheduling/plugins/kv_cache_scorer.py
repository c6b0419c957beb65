"""``kv-cache-utilization-scorer``: prefer endpoints with free KV cache.

Consumes the scraped KV-cache utilisation in [0, 1]. Score: ``1 - utilisation``.
Category: Distribution.
"""

from __future__ import annotations

from collections.abc import Sequence

from igw.api.types import EndpointState, InferenceRequest
from igw.framework.registry import register
from igw.framework.scheduling import Scorer, ScorerCategory


@register
class KvCacheUtilizationScorer(Scorer):
    type_name = "kv-cache-utilization-scorer"
    category = ScorerCategory.DISTRIBUTION
    bounded = True

    def score(self, request: InferenceRequest, candidates: Sequence[EndpointState]) -> list[float]:
        return [1.0 - c.metrics.kv_usage for c in candidates]
