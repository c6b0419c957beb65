"""``weighted-random-picker``: pick at random, in proportion to the total scores.

Weighted sampling without replacement by A-Res (Efraimidis and Spirakis): every candidate
with a positive score ``s`` draws ``key = U ** (1 / s)`` with ``U`` uniform in (0, 1], and
the highest keys come first. The first pick is then chosen with probability ``s / sum(s)``;
the fallbacks follow the same law over what is left. Candidates scoring 0 (or less) come
after every positive one, in random order; if all score 0 the order is uniformly random.
Keys are compared as ``log(U) / s`` (same order, no underflow for small scores).

Returns up to ``maxNumOfEndpoints`` endpoints (default 1). Parameters: ``maxNumOfEndpoints``.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Sequence

from igw.api.types import EndpointState, InferenceRequest
from igw.framework.registry import register
from igw.scheduling.plugins.picking import CountedPicker


@register
class WeightedRandomPicker(CountedPicker):
    type_name = "weighted-random-picker"

    def pick(
        self, request: InferenceRequest, candidates: Sequence[EndpointState], scores: Sequence[float]
    ) -> list[EndpointState]:
        rng = self._rng
        keyed: list[tuple[float, int]] = []
        zeros: list[int] = []
        for i, s in enumerate(scores):
            if s > 0.0:
                keyed.append((math.log(1.0 - rng.random()) / s, i))  # 1 - random() is in (0, 1]
            else:
                zeros.append(i)
        order = [i for _, i in heapq.nlargest(self.max_endpoints, keyed)]
        if len(order) < self.max_endpoints and zeros:
            rng.shuffle(zeros)
            order += zeros
        return [candidates[i] for i in order[: self.max_endpoints]]
