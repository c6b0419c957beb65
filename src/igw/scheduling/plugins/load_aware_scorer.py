"""``load-aware-scorer`` (llm-d): an absolute, not relative, penalty for queueing.

Consumes each endpoint's scraped waiting-queue length plus the requests this EPP sent there
since that scrape, ``q = waiting + dispatched_since_scrape`` (the same correction as
``queue-scorer``: the scrape cannot know requests sent after it, and without them a burst
between two scrapes would see every endpoint as idle). Score::

    0.5                          if q == 0
    0.5 * (1 - min(q, T) / T)    otherwise

so an idle endpoint scores 0.5, a queue at or above ``T`` scores 0, and the score never
exceeds 0.5 (llm-d's scale; with the default weights it leaves room for affinity scorers).
Unlike min-max scorers it does not exaggerate small differences between lightly loaded
endpoints. Parameter: ``threshold`` (``T``, default 128, > 0). Category: Balance.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from pydantic import Field

from igw.api.types import EndpointState, InferenceRequest
from igw.framework.plugin import Handle, PluginParams
from igw.framework.registry import register
from igw.framework.scheduling import Scorer, ScorerCategory


class LoadAwareParams(PluginParams):
    threshold: int = Field(default=128, gt=0)
    """Queue length at which the score reaches 0."""


@register
class LoadAwareScorer(Scorer):
    type_name = "load-aware-scorer"
    category = ScorerCategory.BALANCE
    bounded = True
    Params = LoadAwareParams

    def __init__(self, name: str | None = None, *, threshold: int = 128) -> None:
        super().__init__(name)
        if threshold <= 0:
            raise ValueError(f"load-aware-scorer: threshold must be > 0, got {threshold}")
        self.threshold = threshold

    @classmethod
    def from_params(cls, name: str, params: LoadAwareParams, handle: Handle) -> LoadAwareScorer:
        return cls(name, threshold=params.threshold)

    def describe(self) -> Mapping[str, Any]:
        return {"threshold": self.threshold}

    def score(self, request: InferenceRequest, candidates: Sequence[EndpointState]) -> list[float]:
        t = float(self.threshold)
        out: list[float] = []
        for c in candidates:
            q = c.metrics.waiting + c.dispatched_since_scrape
            out.append(0.5 if q <= 0 else 0.5 * (1.0 - min(q, t) / t))
        return out
