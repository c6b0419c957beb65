"""``running-requests-size-scorer``: prefer endpoints running fewer requests.

Consumes each endpoint's scraped running-request count (``metrics.running``; 0 when never
scraped). Score: min-max normalised, ``(max - r) / (max - min)``; all equal (including a
single candidate) -> 1.0. No parameters. Category: Distribution.
"""

from __future__ import annotations

from collections.abc import Sequence

from igw.api.types import EndpointState, InferenceRequest
from igw.framework.registry import register
from igw.framework.scheduling import Scorer, ScorerCategory
from igw.scheduling.plugins.minmax import lower_is_better


@register
class RunningRequestsSizeScorer(Scorer):
    type_name = "running-requests-size-scorer"
    category = ScorerCategory.DISTRIBUTION
    bounded = True

    def score(self, request: InferenceRequest, candidates: Sequence[EndpointState]) -> list[float]:
        return lower_is_better([c.metrics.running for c in candidates])
