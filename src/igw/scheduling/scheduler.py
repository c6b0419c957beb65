"""Runs the scheduling profiles: profile handler -> (filters -> weighted scorers -> picker).

The total score of an endpoint is ``sum(weight * clamp(score, 0, 1))`` over the profile's
scorers (not normalised by the weights, as in the reference EPP). Every plugin call is timed
into ``inference_extension_plugin_duration_seconds{extension_point, plugin_type,
plugin_name}``; a plugin that raises is handled by the failure policy written in
:mod:`igw.framework.plugin`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from itertools import repeat
from operator import add, mul
from typing import ParamSpec, TypeVar

from igw.api.errors import NoEndpoint, SchedulingFailed
from igw.api.types import EndpointState, InferenceRequest
from igw.framework.scheduling import Filter, Picker, ProfileHandler, SchedulerProfile, SchedulingResult, Scorer
from igw.observability.metrics import PluginMetrics, TimedPlugin

log = logging.getLogger("igw.scheduling")

A = ParamSpec("A")
R = TypeVar("R")


class _CompiledProfile:
    __slots__ = ("filters", "name", "picker", "profile", "scorers", "weights")

    def __init__(self, profile: SchedulerProfile, metrics: PluginMetrics | None) -> None:
        self.profile = profile
        self.name = profile.name
        self.filters: list[TimedPlugin[Filter]] = [TimedPlugin(f, "Filter", metrics) for f in profile.filters]
        self.scorers: list[tuple[TimedPlugin[Scorer], float, bool]] = [
            (TimedPlugin(w.scorer, "Scorer", metrics), w.weight, w.scorer.bounded) for w in profile.scorers
        ]
        self.weights = {w.scorer.name: w.weight for w in profile.scorers}
        self.picker: TimedPlugin[Picker] = TimedPlugin(profile.picker, "Picker", metrics)


class Scheduler:
    def __init__(
        self,
        profiles: SchedulerProfile | Sequence[SchedulerProfile],
        handler: ProfileHandler | None = None,
        *,
        metrics: PluginMetrics | None = None,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        if isinstance(profiles, SchedulerProfile):
            profiles = [profiles]
        if not profiles:
            raise ValueError("a scheduler needs at least one profile")
        self.profiles: dict[str, SchedulerProfile] = {p.name: p for p in profiles}
        self._compiled = {p.name: _CompiledProfile(p, metrics) for p in profiles}
        self.handler = handler
        self._handler_pick = TimedPlugin(handler, "ProfilePicker", metrics) if handler else None
        self._handler_results = TimedPlugin(handler, "ProcessProfilesResults", metrics) if handler else None
        self._clock = clock

    @property
    def profile(self) -> SchedulerProfile:
        """The first profile (the only one in a single-profile setup)."""
        return next(iter(self.profiles.values()))

    def schedule(self, request: InferenceRequest, candidates: Sequence[EndpointState]) -> SchedulingResult:
        """Pick endpoints for ``request``: :class:`NoEndpoint` (503) without candidates,
        :class:`SchedulingFailed` (429) when the profile leaves none."""
        if not candidates:
            raise NoEndpoint("no endpoint in the pool can serve this request")
        handler = self.handler
        if handler is None:
            return self._run(self._compiled[self.profile.name], request, candidates)
        results: dict[str, SchedulingResult | None] = {}
        failures: list[SchedulingFailed] = []
        while True:
            to_run = self._timed_call(self._handler_pick, handler.pick_profiles, request, self.profiles, results)
            if not to_run:
                break
            for profile in to_run:
                if profile.name in results:
                    raise RuntimeError(f"profile handler {handler.name} asked to run {profile.name!r} twice")
                try:
                    results[profile.name] = self._run(self._compiled[profile.name], request, candidates)
                except SchedulingFailed as exc:
                    results[profile.name] = None
                    failures.append(exc)
        try:
            return self._timed_call(self._handler_results, handler.process_results, request, results)
        except SchedulingFailed as exc:
            raise (failures[-1] if failures else exc) from None

    def _timed_call(
        self, timed: TimedPlugin[ProfileHandler] | None, fn: Callable[A, R], *args: A.args, **kwargs: A.kwargs
    ) -> R:
        t0 = self._clock()
        try:
            return fn(*args, **kwargs)
        except (NoEndpoint, SchedulingFailed):
            raise
        except Exception:
            if timed is not None:
                timed.errors()
            raise
        finally:
            if timed is not None:
                timed.observe(self._clock() - t0)

    def _run(
        self, profile: _CompiledProfile, request: InferenceRequest, candidates: Sequence[EndpointState]
    ) -> SchedulingResult:
        clock = self._clock
        filtered: list[tuple[str, int]] = [("", len(candidates))]
        for timed_filter in profile.filters:
            t0 = clock()
            flt = timed_filter.plugin
            try:
                kept = flt.filter(request, candidates)
            except Exception:
                log.exception("filter %s failed; passing every candidate through", flt.name)
                timed_filter.errors()
                kept = candidates
            timed_filter.observe(clock() - t0)
            candidates = kept
            filtered.append((flt.name, len(candidates)))
            if not candidates:
                raise SchedulingFailed(f"no endpoint left after filter {flt.name}")
        n = len(candidates)
        totals: list[float] = [0.0] * n
        first = True
        raw_scores: dict[str, Sequence[float]] = {}
        for timed, weight, bounded in profile.scorers:
            t0 = clock()
            scorer = timed.plugin
            try:
                scores = scorer.score(request, candidates)
                if len(scores) != n:
                    raise ValueError(f"returned {len(scores)} scores for {n} candidates")
                if not bounded:  # clamp to [0, 1]; NaN becomes 0
                    scores = [v if 0.0 <= v <= 1.0 else 1.0 if v > 1.0 else 0.0 for v in scores]
            except Exception:
                log.exception("scorer %s failed; it scores 0 for this request", scorer.name)
                timed.errors()
                scores = [0.0] * n
            timed.observe(clock() - t0)
            if first:
                totals = list(map(mul, scores, repeat(weight, n)))
                first = False
            else:
                totals = list(map(add, totals, map(mul, scores, repeat(weight, n))))
            raw_scores[scorer.name] = scores
        picker = profile.picker
        t0 = clock()
        try:
            picked = picker.plugin.pick(request, candidates, totals)
        except Exception:
            log.exception("picker %s failed; taking the highest score", picker.plugin.name)
            picker.errors()
            picked = [candidates[max(range(n), key=totals.__getitem__)]]
        picker.observe(clock() - t0)
        if not picked:
            raise SchedulingFailed(f"picker {picker.plugin.name} chose no endpoint")
        return SchedulingResult(
            profile=profile.name,
            endpoints=picked,
            candidates=candidates,
            totals=totals,
            raw_scores=raw_scores,
            weights=profile.weights,
            filtered=filtered,
        )
