"""``random-picker``: ignore the scores, pick uniformly at random.

Returns up to ``maxNumOfEndpoints`` distinct endpoints (default 1) in a uniformly random
order: the first is the pick, the others are fallbacks. Useful as a baseline and for pools
where the scorers carry no signal. Parameters: ``maxNumOfEndpoints``.
"""

from __future__ import annotations

from collections.abc import Sequence

from igw.api.types import EndpointState, InferenceRequest
from igw.framework.registry import register
from igw.scheduling.plugins.picking import CountedPicker


@register
class RandomPicker(CountedPicker):
    type_name = "random-picker"

    def pick(
        self, request: InferenceRequest, candidates: Sequence[EndpointState], scores: Sequence[float]
    ) -> list[EndpointState]:
        if self.max_endpoints == 1:
            return [self._rng.choice(candidates)]
        return self._rng.sample(list(candidates), min(self.max_endpoints, len(candidates)))
