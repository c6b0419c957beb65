"""Contracts of the scheduling plugins: filters, scorers, pickers, profile handlers.

A scheduling pass runs one *profile*: its filters in order (stopping when nothing is left),
then every scorer, then the picker on the weighted sum of scores. A *profile handler* decides
which profiles run (one, in the default single-profile setup) and which result is primary.
All plugin calls happen on the event loop thread and must not block or await.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import ClassVar

from igw.api.types import EndpointState, InferenceRequest
from igw.framework.plugin import Plugin


class Filter(Plugin):
    @abstractmethod
    def filter(self, request: InferenceRequest, candidates: Sequence[EndpointState]) -> Sequence[EndpointState]:
        """Return the candidates that may serve ``request``: a subset, in the same order.

        Returning an empty sequence ends the pass with "no endpoint"; a filter that would
        rather degrade than fail returns its input unchanged.
        """


class ScorerCategory(StrEnum):
    AFFINITY = "Affinity"
    DISTRIBUTION = "Distribution"
    BALANCE = "Balance"


class Scorer(Plugin):
    category: ClassVar[ScorerCategory] = ScorerCategory.DISTRIBUTION
    bounded: ClassVar[bool] = False
    """True when every score is in [0, 1] by construction (the scheduler then skips clamping,
    two passes over the candidates); a built-in scorer's tests check it."""

    @abstractmethod
    def score(self, request: InferenceRequest, candidates: Sequence[EndpointState]) -> Sequence[float]:
        """One score per candidate, in order, each in [0, 1] (values outside are clamped).

        Called with at least one candidate. Higher is better.
        """


class Picker(Plugin):
    max_endpoints: int = 1
    """How many endpoints ``pick`` returns at most (the pick, then fallbacks)."""

    @abstractmethod
    def pick(
        self, request: InferenceRequest, candidates: Sequence[EndpointState], scores: Sequence[float]
    ) -> list[EndpointState]:
        """Order the endpoints to use: the first is the pick, the rest are fallbacks.

        ``scores[i]`` is the weighted total of ``candidates[i]``; ``candidates`` is never empty.
        """


class ProfileHandler(Plugin):
    """Chooses the profiles to run for a request and the result that routes it."""

    def validate_profiles(self, names: Sequence[str]) -> None:
        """Raise ``ValueError`` if this handler cannot work with these profiles (checked at load)."""

    @abstractmethod
    def pick_profiles(
        self,
        request: InferenceRequest,
        profiles: Mapping[str, SchedulerProfile],
        results: Mapping[str, SchedulingResult | None],
    ) -> list[SchedulerProfile]:
        """Profiles to run next, given the results so far (``None``: the profile found no
        endpoint). An empty list ends the loop."""

    @abstractmethod
    def process_results(
        self, request: InferenceRequest, results: Mapping[str, SchedulingResult | None]
    ) -> SchedulingResult:
        """The primary result. Raise :class:`~igw.api.errors.SchedulingFailed` if there is none."""


@dataclass(frozen=True, slots=True)
class WeightedScorer:
    scorer: Scorer
    weight: float = 1.0


@dataclass(frozen=True, slots=True)
class SchedulerProfile:
    name: str
    filters: tuple[Filter, ...]
    scorers: tuple[WeightedScorer, ...]
    picker: Picker


@dataclass(slots=True)
class SchedulingResult:
    """The chosen endpoints (first = primary) and what every candidate scored.

    The per-candidate numbers are kept as lists aligned with ``candidates`` and turned into
    dicts only when an explanation is asked for, so a pick over many endpoints stays cheap.
    """

    profile: str
    endpoints: list[EndpointState]
    candidates: Sequence[EndpointState] = ()
    """What the scorers saw (after the filters)."""
    totals: Sequence[float] = ()
    """Weighted total per candidate."""
    raw_scores: dict[str, Sequence[float]] = field(default_factory=dict)
    """Clamped score per candidate, per scorer name."""
    weights: dict[str, float] = field(default_factory=dict)
    """Weight per scorer name."""
    filtered: list[tuple[str, int]] = field(default_factory=list)
    """``(filter name, candidates left after it)`` in order; the first entry is ``("", initial count)``."""

    def scores(self) -> dict[str, float]:
        """Final weighted score per candidate address."""
        return {c.address: t for c, t in zip(self.candidates, self.totals, strict=True)}

    def plugin_scores(self) -> dict[str, dict[str, float]]:
        """Score per candidate address, per scorer name."""
        return {
            name: {c.address: v for c, v in zip(self.candidates, values, strict=True)}
            for name, values in self.raw_scores.items()
        }
