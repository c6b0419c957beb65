"""``max-score-picker``: the highest total score wins; ties are broken at random.

Returns up to ``max_endpoints`` endpoints in descending score order: the first is the pick,
the others are fallbacks for the proxy.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from igw.api.types import EndpointState, InferenceRequest
from igw.framework.registry import register
from igw.framework.scheduling import Picker


@register
class MaxScorePicker(Picker):
    type_name = "max-score-picker"

    def __init__(self, name: str | None = None, *, max_endpoints: int = 1, rng: random.Random | None = None):
        super().__init__(name)
        if max_endpoints < 1:
            raise ValueError("max-score-picker: max_endpoints must be at least 1")
        self.max_endpoints = max_endpoints
        self._rng = rng or random.Random()

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
