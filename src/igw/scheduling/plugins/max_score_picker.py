"""``max-score-picker``: the highest total score wins; ties are broken at random.

Returns up to ``maxNumOfEndpoints`` endpoints in descending score order: the first is the
pick, the others are fallbacks for the proxy. Only the best ``k`` are ordered (``heapq``), and
endpoints tied at the k-th score are drawn at random, so ties never favour pool order. Parameters: ``maxNumOfEndpoints`` (default 1).
"""

from __future__ import annotations

import heapq
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
        k = self.max_endpoints
        top = heapq.nlargest(k, range(len(scores)), key=scores.__getitem__)
        kth = scores[top[-1]]
        above = [i for i in top if scores[i] > kth]
        tied = len(top) - len(above)
        if scores.count(kth) > tied:  # more endpoints share the k-th score than fit: draw among all of them
            at_kth = [i for i, score in enumerate(scores) if score == kth]
            chosen = self._rng.sample(at_kth, tied)
        else:
            chosen = [i for i in top if scores[i] == kth]
            self._rng.shuffle(chosen)
        self._rng.shuffle(above)
        above.sort(key=scores.__getitem__, reverse=True)  # stable: equal scores stay shuffled
        return [candidates[i] for i in above + chosen]
