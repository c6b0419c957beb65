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
            top = [i for i, score in enumerate(scores) if score == best]
            return [candidates[top[0] if len(top) == 1 else self._rng.choice(top)]]
        order = list(range(len(candidates)))
        self._rng.shuffle(order)
        order.sort(key=scores.__getitem__, reverse=True)  # stable: equal scores stay shuffled
        return [candidates[i] for i in order[: self.max_endpoints]]
