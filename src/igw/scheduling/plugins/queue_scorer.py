"""``queue-scorer``: prefer endpoints with short waiting queues.

Consumes each endpoint's scraped waiting-queue length plus the requests this EPP sent there
since that scrape (the scrape cannot know them yet: at 50 ms scrapes and hundreds of requests
per second this correction is what keeps a burst from landing on one endpoint).
Score: min-max normalised, ``(max - q) / (max - min)``; all equal -> 1.0. Category: Distribution.
"""

from __future__ import annotations

from collections.abc import Sequence

from igw.api.types import EndpointState, InferenceRequest
from igw.framework.registry import register
from igw.framework.scheduling import Scorer, ScorerCategory
from igw.scheduling.plugins.minmax import lower_is_better


@register
class QueueScorer(Scorer):
    type_name = "queue-scorer"
    category = ScorerCategory.DISTRIBUTION
    bounded = True

    def score(self, request: InferenceRequest, candidates: Sequence[EndpointState]) -> list[float]:
        return lower_is_better([c.metrics.waiting + c.dispatched_since_scrape for c in candidates])
