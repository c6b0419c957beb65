"""``inflight-scorer``: prefer endpoints with fewer requests in flight through this EPP.

Consumes the EPP's own in-flight count per endpoint (incremented at the pick, decremented
when the ext_proc stream ends), which is exact and current where scraped numbers lag.
Score: min-max normalised, lower is better; all equal -> 1.0. Category: Balance.
"""

from __future__ import annotations

from collections.abc import Sequence

from igw.api.types import EndpointState, InferenceRequest
from igw.framework.registry import register
from igw.framework.scheduling import Scorer, ScorerCategory
from igw.scheduling.plugins.minmax import lower_is_better


@register
class InflightScorer(Scorer):
    type_name = "inflight-scorer"
    category = ScorerCategory.BALANCE
    bounded = True

    def score(self, request: InferenceRequest, candidates: Sequence[EndpointState]) -> list[float]:
        return lower_is_better([float(c.inflight) for c in candidates])
