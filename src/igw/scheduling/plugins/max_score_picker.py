"""``max-score-picker``: the highest total score wins; ties are broken at random.

Returns up to ``maxNumOfEndpoints`` endpoints in descending score order: the first is the
pick, the others are fallbacks for the proxy. Parameters: ``maxNumOfEndpoints`` (default 1).
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from typing import Any

from pydantic import Field

from igw.api.types import EndpointState, InferenceRequest
from igw.framework.plugin import Handle, PluginParams
from igw.framework.registry import register
from igw.framework.scheduling import Picker


class PickerParams(PluginParams):
    max_num_of_endpoints: int = Field(default=1, ge=1)
    """How many endpoints to return: the pick, then fallbacks."""


@register
class MaxScorePicker(Picker):
    type_name = "max-score-picker"
    Params = PickerParams

    def __init__(self, name: str | None = None, *, max_endpoints: int = 1, rng: random.Random | None = None):
        super().__init__(name)
        if max_endpoints < 1:
            raise ValueError("max-score-picker: max_endpoints must be at least 1")
        self.max_endpoints = max_endpoints
        self._rng = rng or random.Random()

    @classmethod
    def from_params(cls, name: str, params: PickerParams, handle: Handle) -> MaxScorePicker:
        return cls(name, max_endpoints=params.max_num_of_endpoints)

    def describe(self) -> Mapping[str, Any]:
        return {"maxNumOfEndpoints": self.max_endpoints}

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
