"""``max-score-picker``: the highest total score wins; ties are broken at random.

Returns up to ``maxNumOfEndpoints`` endpoints in descending score order: the first is the
pick, the others are fallbacks for the proxy. Parameters: ``maxNumOfEndpoints`` (default 1).
"""

from __future__ import annotations

from collections.abc import Sequence

from igw.api.types import EndpointState, InferenceRequest
from igw.framework.registry import register
from igw.scheduling.plugins.picking import CountedPicker


@register
class MaxScorePicker(CountedPicker):
    type_name = "max-score-picker"

    def pick(
        self, request: InferenceRequest, candidates: Sequence[EndpointState], scores: Sequence[float]
    ) -> list[EndpointState]:
        if self.max_endpoints == 1:
            best = max(scores)
            if scores.count(best) == 1:  # the usual case, at C speed
                return [candidates[scores.index(best)]]
            return [candidates[self._rng.choice([i for i, score in enumerate(scores) if score == best])]]
        order = list(range(len(candidates)))
        self._rng.shuffle(order)
        order.sort(key=scores.__getitem__, reverse=True)  # stable: equal scores stay shuffled
        return [candidates[i] for i in order[: self.max_endpoints]]
