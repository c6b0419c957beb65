"""What every built-in picker shares: the ``maxNumOfEndpoints`` parameter and a random source."""

from __future__ import annotations

import random
from collections.abc import Mapping
from typing import Any, Self

from pydantic import Field

from igw.framework.plugin import Handle, PluginParams
from igw.framework.scheduling import Picker


class PickerParams(PluginParams):
    max_num_of_endpoints: int = Field(default=1, ge=1)
    """How many endpoints to return: the pick, then fallbacks."""


class CountedPicker(Picker):
    """A picker returning up to ``max_endpoints`` endpoints, with an injectable ``rng`` for tests."""

    Params = PickerParams

    def __init__(self, name: str | None = None, *, max_endpoints: int = 1, rng: random.Random | None = None):
        super().__init__(name)
        if max_endpoints < 1:
            raise ValueError(f"{self.type_name}: max_endpoints must be at least 1")
        self.max_endpoints = max_endpoints
        self._rng = rng or random.Random()

    @classmethod
    def from_params(cls, name: str, params: PickerParams, handle: Handle) -> Self:
        return cls(name, max_endpoints=params.max_num_of_endpoints)

    def describe(self) -> Mapping[str, Any]:
        return {"maxNumOfEndpoints": self.max_endpoints}
