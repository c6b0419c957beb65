"""InferenceObjectives by name: the priority a request gets when it names one.

Written by the pool source (the pool file in standalone mode, the controllers in Kubernetes
mode); read by the director for every request that carries ``x-gateway-inference-objective``.
A request naming no objective, or one that does not exist, gets priority 0 (as the reference).
"""

from __future__ import annotations

from collections.abc import Mapping


class ObjectiveStore:
    def __init__(self, priorities: Mapping[str, int] | None = None) -> None:
        self._priorities: dict[str, int] = dict(priorities or {})

    def set_objectives(self, priorities: Mapping[str, int]) -> None:
        """Replace every objective (level-triggered sync)."""
        self._priorities = dict(priorities)

    def upsert(self, name: str, priority: int) -> None:
        self._priorities[name] = priority

    def delete(self, name: str) -> None:
        self._priorities.pop(name, None)

    def priority(self, name: str | None) -> int:
        if not name:
            return 0
        return self._priorities.get(name, 0)

    def known(self, name: str) -> bool:
        return name in self._priorities

    def items(self) -> dict[str, int]:
        return dict(self._priorities)
