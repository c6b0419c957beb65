"""Runs a scheduler profile: filters -> weighted scorers -> picker.

The total score of an endpoint is ``sum(weight * clamp(score, 0, 1))`` over the profile's
scorers (not normalised by the weights, as in the reference EPP).
"""

from __future__ import annotations

from collections.abc import Sequence

from igw.api.errors import NoEndpoint
from igw.api.types import EndpointState, InferenceRequest
from igw.framework.scheduling import SchedulerProfile, SchedulingResult


class Scheduler:
    def __init__(self, profile: SchedulerProfile) -> None:
        self.profile = profile

    def schedule(self, request: InferenceRequest, candidates: Sequence[EndpointState]) -> SchedulingResult:
        """Pick endpoints for ``request``; raise :class:`NoEndpoint` when none is left."""
        profile = self.profile
        if not candidates:
            raise NoEndpoint("no endpoint in the pool can serve this request")
        for flt in profile.filters:
            candidates = flt.filter(request, candidates)
            if not candidates:
                raise NoEndpoint(f"no endpoint left after filter {flt.name}")
        totals = [0.0] * len(candidates)
        raw_scores: dict[str, Sequence[float]] = {}
        for weighted in profile.scorers:
            scores = weighted.scorer.score(request, candidates)
            if min(scores) < 0.0 or max(scores) > 1.0:
                scores = [0.0 if v < 0.0 else 1.0 if v > 1.0 else v for v in scores]
            w = weighted.weight
            totals = [t + w * v for t, v in zip(totals, scores, strict=True)]
            raw_scores[weighted.scorer.name] = scores
        picked = profile.picker.pick(request, candidates, totals)
        if not picked:
            raise NoEndpoint(f"picker {profile.picker.name} chose no endpoint")
        return SchedulingResult(
            profile=profile.name, endpoints=picked, candidates=candidates, totals=totals, raw_scores=raw_scores
        )
