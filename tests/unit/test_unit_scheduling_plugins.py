"""Scheduling plugins (formulas and edge cases), the Scheduler, and the plugin registry."""

from __future__ import annotations

import random
from collections.abc import Sequence

import pytest

import igw.scheduling.plugins  # noqa: F401  (registers the built-in plugin types)
from igw.api.errors import NoEndpoint, SchedulingFailed
from igw.api.types import Endpoint, EndpointMetrics, EndpointState, InferenceRequest
from igw.framework import registry
from igw.framework.scheduling import (
    Filter,
    Picker,
    Plugin,
    SchedulerProfile,
    SchedulingResult,
    Scorer,
    ScorerCategory,
    WeightedScorer,
)
from igw.scheduling.plugins.availability_filter import AvailabilityFilter
from igw.scheduling.plugins.inflight_scorer import InflightScorer
from igw.scheduling.plugins.kv_cache_scorer import KvCacheUtilizationScorer
from igw.scheduling.plugins.max_score_picker import MaxScorePicker
from igw.scheduling.plugins.minmax import lower_is_better
from igw.scheduling.plugins.queue_scorer import QueueScorer
from igw.scheduling.scheduler import Scheduler

REQ = InferenceRequest(request_id="r", model="m", path="/v1/completions", body_size=10)
NOW = 1000.0


def state(
    i: int,
    *,
    waiting: float = 0.0,
    kv: float = 0.0,
    inflight: int = 0,
    dispatched: int = 0,
    scraped_at: float | None = NOW,
    failures: int = 0,
) -> EndpointState:
    s = EndpointState(Endpoint(f"10.0.0.{i}:8000", f"10.0.0.{i}", 8000))
    if scraped_at is not None:
        s.metrics = EndpointMetrics(waiting=waiting, kv_usage=kv, scraped_at=scraped_at)
    s.inflight = inflight
    s.dispatched_since_scrape = dispatched
    s.failures = failures
    return s


# --------------------------------------------------------------------------------------------
# min-max formula
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ([3.0], [1.0]),
        ([5.0, 5.0, 5.0], [1.0, 1.0, 1.0]),
        ([0.0, 10.0], [1.0, 0.0]),
        ([0.0, 5.0, 10.0], [1.0, 0.5, 0.0]),
        ([2.0, 4.0, 6.0, 10.0], [1.0, 0.75, 0.5, 0.0]),
        ([0.0, 0.0, 1.0], [1.0, 1.0, 0.0]),
    ],
    ids=["single", "all-equal", "two", "three", "four", "tied-best"],
)
def test_lower_is_better(values: list[float], expected: list[float]) -> None:
    assert lower_is_better(values) == pytest.approx(expected)


# --------------------------------------------------------------------------------------------
# queue-scorer
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("specs", "expected"),
    [
        ([{"waiting": 4}], [1.0]),
        ([{"waiting": 3}, {"waiting": 3}], [1.0, 1.0]),
        ([{"waiting": 0}, {"waiting": 10}, {"waiting": 5}], [1.0, 0.0, 0.5]),
        ([{"waiting": 0, "dispatched": 4}, {"waiting": 2}], [0.0, 1.0]),
        ([{"waiting": 1, "dispatched": 1}, {"waiting": 2}], [1.0, 1.0]),
        ([{"scraped_at": None}, {"waiting": 8}], [1.0, 0.0]),
        ([{"scraped_at": None}, {"scraped_at": None}], [1.0, 1.0]),
        ([{"waiting": 10, "scraped_at": 1.0}, {"waiting": 0}], [0.0, 1.0]),
        ([{"waiting": 0, "inflight": 50}, {"waiting": 5}], [1.0, 0.0]),
    ],
    ids=[
        "single",
        "all-equal",
        "min-max",
        "dispatched-counts-as-queued",
        "dispatched-ties",
        "never-scraped-looks-empty",
        "all-never-scraped",
        "stale-still-scored",
        "inflight-ignored",
    ],
)
def test_queue_scorer(specs: list[dict[str, float]], expected: list[float]) -> None:
    candidates = [state(i + 1, **spec) for i, spec in enumerate(specs)]  # type: ignore[arg-type]
    assert QueueScorer().score(REQ, candidates) == pytest.approx(expected)


# --------------------------------------------------------------------------------------------
# kv-cache-utilization-scorer
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("specs", "expected"),
    [
        ([{"kv": 0.25}], [0.75]),
        ([{"kv": 0.5}, {"kv": 0.5}], [0.5, 0.5]),
        ([{"kv": 0.0}, {"kv": 1.0}, {"kv": 0.9}], [1.0, 0.0, 0.1]),
        ([{"scraped_at": None}, {"kv": 0.3}], [1.0, 0.7]),
        ([{"kv": 0.2, "scraped_at": 1.0}], [0.8]),
    ],
    ids=["single-not-normalised", "all-equal", "one-minus-usage", "never-scraped", "stale"],
)
def test_kv_cache_scorer(specs: list[dict[str, float]], expected: list[float]) -> None:
    candidates = [state(i + 1, **spec) for i, spec in enumerate(specs)]  # type: ignore[arg-type]
    assert KvCacheUtilizationScorer().score(REQ, candidates) == pytest.approx(expected)


# --------------------------------------------------------------------------------------------
# inflight-scorer
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("specs", "expected"),
    [
        ([{"inflight": 7}], [1.0]),
        ([{"inflight": 2}, {"inflight": 2}], [1.0, 1.0]),
        ([{"inflight": 0}, {"inflight": 4}, {"inflight": 1}], [1.0, 0.0, 0.75]),
        ([{"inflight": 0, "waiting": 100}, {"inflight": 1}], [1.0, 0.0]),
        ([{"inflight": 3, "scraped_at": None}, {"inflight": 1}], [0.0, 1.0]),
    ],
    ids=["single", "all-equal", "min-max", "metrics-ignored", "never-scraped"],
)
def test_inflight_scorer(specs: list[dict[str, float]], expected: list[float]) -> None:
    candidates = [state(i + 1, **spec) for i, spec in enumerate(specs)]  # type: ignore[arg-type]
    assert InflightScorer().score(REQ, candidates) == pytest.approx(expected)


@pytest.mark.parametrize(
    ("cls", "type_name", "category"),
    [
        (QueueScorer, "queue-scorer", ScorerCategory.DISTRIBUTION),
        (KvCacheUtilizationScorer, "kv-cache-utilization-scorer", ScorerCategory.DISTRIBUTION),
        (InflightScorer, "inflight-scorer", ScorerCategory.BALANCE),
    ],
    ids=["queue", "kv", "inflight"],
)
def test_scorer_identity(cls: type[Scorer], type_name: str, category: ScorerCategory) -> None:
    scorer = cls()
    assert (scorer.type_name, scorer.name, scorer.category) == (type_name, type_name, category)
    assert cls("custom").name == "custom"


# --------------------------------------------------------------------------------------------
# availability-filter
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("specs", "kept"),
    [
        ([{}], [1]),
        ([{}, {"scraped_at": NOW - 1.9}], [1, 2]),
        ([{}, {"scraped_at": NOW - 2.0}], [1, 2]),
        ([{}, {"scraped_at": NOW - 2.1}], [1]),
        ([{}, {"scraped_at": None}], [1]),
        ([{}, {"failures": 2}], [1, 2]),
        ([{}, {"failures": 3}], [1]),
        ([{"failures": 9}, {"scraped_at": NOW - 60}, {}], [3]),
        ([{"scraped_at": None}, {"scraped_at": None}], [1, 2]),
        ([{"failures": 3}, {"scraped_at": NOW - 5}], [1, 2]),
        ([{"scraped_at": None}], [1]),
    ],
    ids=[
        "single-fresh",
        "young",
        "age-at-threshold-is-fresh",
        "stale",
        "never-scraped",
        "failures-below-limit",
        "failures-at-limit",
        "order-kept",
        "none-available-returns-all-never-scraped",
        "none-available-returns-all-mixed",
        "single-unavailable-still-returned",
    ],
)
def test_availability_filter(specs: list[dict[str, float]], kept: list[int]) -> None:
    flt = AvailabilityFilter(staleness_threshold=2.0, max_consecutive_failures=3, clock=lambda: NOW)
    candidates = [state(i + 1, **spec) for i, spec in enumerate(specs)]  # type: ignore[arg-type]
    out = flt.filter(REQ, candidates)
    assert [c.address for c in out] == [f"10.0.0.{i}:8000" for i in kept]


def test_availability_filter_reads_its_clock_per_call() -> None:
    now = [NOW]
    flt = AvailabilityFilter(staleness_threshold=1.0, clock=lambda: now[0])
    fresh, other = state(1), state(2, scraped_at=NOW + 5)
    assert flt.filter(REQ, [fresh, other]) == [fresh, other]
    now[0] = NOW + 5.5
    assert flt.filter(REQ, [fresh, other]) == [other]


# --------------------------------------------------------------------------------------------
# max-score-picker
# --------------------------------------------------------------------------------------------


def scored(*scores: float) -> tuple[list[EndpointState], list[float]]:
    """Parallel candidate and score lists, as the Scheduler hands them to the picker."""
    return [state(i + 1) for i in range(len(scores))], list(scores)


@pytest.mark.parametrize(
    ("scores", "max_endpoints", "expected"),
    [
        ((0.1, 0.9, 0.5), 1, [2]),
        ((0.7,), 1, [1]),
        ((0.7,), 3, [1]),
        ((0.1, 0.9, 0.5), 2, [2, 3]),
        ((0.1, 0.9, 0.5), 3, [2, 3, 1]),
        ((0.1, 0.9, 0.5), 10, [2, 3, 1]),
        ((3.0, 5.0, 4.0, 1.0, 2.0), 4, [2, 3, 1, 5]),
        ((-1.0, 0.0), 2, [2, 1]),
    ],
    ids=["best", "single", "single-many", "two", "all", "more-than-candidates", "five", "negative"],
)
def test_max_score_picker_orders_by_score(scores: tuple[float, ...], max_endpoints: int, expected: list[int]) -> None:
    picker = MaxScorePicker(max_endpoints=max_endpoints, rng=random.Random(7))
    picked = picker.pick(REQ, *scored(*scores))
    assert [p.address for p in picked] == [f"10.0.0.{i}:8000" for i in expected]


@pytest.mark.parametrize("max_endpoints", [1, 2], ids=["one", "two"])
def test_max_score_picker_random_tie_break(max_endpoints: int) -> None:
    picker = MaxScorePicker(max_endpoints=max_endpoints, rng=random.Random(1234))
    candidates, scores = scored(0.3, 0.8, 0.8, 0.1)
    firsts: dict[str, int] = {}
    for _ in range(200):
        picked = picker.pick(REQ, candidates, scores)
        assert len(picked) == max_endpoints
        firsts[picked[0].address] = firsts.get(picked[0].address, 0) + 1
        if max_endpoints == 2:
            assert {p.address for p in picked} == {"10.0.0.2:8000", "10.0.0.3:8000"}
    assert set(firsts) == {"10.0.0.2:8000", "10.0.0.3:8000"}
    assert min(firsts.values()) > 50  # a fair coin over 200 picks


def test_max_score_picker_tie_break_is_reproducible_with_a_seed() -> None:
    def run() -> list[str]:
        picker = MaxScorePicker(rng=random.Random(99))
        return [picker.pick(REQ, *scored(1.0, 1.0, 1.0))[0].address for _ in range(30)]

    assert run() == run()
    assert len(set(run())) == 3


@pytest.mark.parametrize("max_endpoints", [0, -1], ids=["zero", "negative"])
def test_max_score_picker_rejects_bad_max_endpoints(max_endpoints: int) -> None:
    with pytest.raises(ValueError, match="max_endpoints"):
        MaxScorePicker(max_endpoints=max_endpoints)


# --------------------------------------------------------------------------------------------
# Scheduler
# --------------------------------------------------------------------------------------------


class Const(Scorer):
    type_name = "test-const"

    def __init__(self, name: str, values: Sequence[float]) -> None:
        super().__init__(name)
        self.values = list(values)
        self.calls: list[list[str]] = []

    def score(self, request: InferenceRequest, candidates: Sequence[EndpointState]) -> list[float]:
        self.calls.append([c.address for c in candidates])
        return self.values[: len(candidates)]


class DropFirst(Filter):
    type_name = "test-drop-first"

    def filter(self, request: InferenceRequest, candidates: Sequence[EndpointState]) -> Sequence[EndpointState]:
        return list(candidates[1:])


class NoPick(Picker):
    type_name = "test-no-pick"

    def pick(
        self, request: InferenceRequest, candidates: Sequence[EndpointState], scores: Sequence[float]
    ) -> list[EndpointState]:
        return []


def scores_of(result: SchedulingResult) -> dict[str, float]:
    """Final weighted score per candidate address."""
    return result.scores()


def plugin_scores_of(result: SchedulingResult) -> dict[str, dict[str, float]]:
    """Clamped score per candidate address, per scorer name."""
    return result.plugin_scores()


def profile(
    *scorers: WeightedScorer, filters: tuple[Filter, ...] = (), picker: Picker | None = None
) -> SchedulerProfile:
    return SchedulerProfile("p", filters, scorers, picker or MaxScorePicker(rng=random.Random(0)))


@pytest.mark.parametrize(
    ("weighted", "totals", "winner"),
    [
        ([(2.0, [0.5, 1.0]), (3.0, [1.0, 0.0])], [4.0, 2.0], 1),
        ([(1.0, [0.2, 0.4]), (1.0, [0.2, 0.4])], [0.4, 0.8], 2),
        ([(2.0, [-3.0, 0.5]), (1.0, [2.0, 7.0])], [1.0, 2.0], 2),
        ([(0.5, [1.0, 0.0])], [0.5, 0.0], 1),
        ([], [0.0, 0.0], None),
    ],
    ids=["weights-add-up", "same-weights", "clamped-to-unit", "fractional-weight", "no-scorers"],
)
def test_scheduler_totals(weighted: list[tuple[float, list[float]]], totals: list[float], winner: int | None) -> None:
    candidates = [state(1), state(2)]
    scorers = [WeightedScorer(Const(f"s{i}", vals), w) for i, (w, vals) in enumerate(weighted)]
    result = Scheduler(profile(*scorers)).schedule(REQ, candidates)
    assert result.profile == "p"
    assert list(scores_of(result).values()) == pytest.approx(totals)
    assert list(scores_of(result)) == ["10.0.0.1:8000", "10.0.0.2:8000"]
    for i, (_, vals) in enumerate(weighted):
        assert list(plugin_scores_of(result)[f"s{i}"].values()) == [min(max(v, 0.0), 1.0) for v in vals]
    if winner is not None:
        assert [e.address for e in result.endpoints] == [f"10.0.0.{winner}:8000"]
    else:
        assert len(result.endpoints) == 1


def test_scheduler_empty_candidates_is_no_endpoint() -> None:
    scorer = Const("s", [1.0])
    with pytest.raises(NoEndpoint, match="no endpoint"):
        Scheduler(profile(WeightedScorer(scorer))).schedule(REQ, [])
    assert scorer.calls == []


def test_scheduler_filter_leaving_nothing_names_the_filter() -> None:
    scorer = Const("s", [1.0])
    with pytest.raises(SchedulingFailed, match="test-drop-first"):
        Scheduler(profile(WeightedScorer(scorer), filters=(DropFirst(),))).schedule(REQ, [state(1)])
    assert scorer.calls == []


def test_scheduler_scores_only_filtered_candidates() -> None:
    scorer = Const("s", [1.0, 1.0])
    result = Scheduler(profile(WeightedScorer(scorer), filters=(DropFirst(),))).schedule(REQ, [state(1), state(2)])
    assert scorer.calls == [["10.0.0.2:8000"]]
    assert [e.address for e in result.endpoints] == ["10.0.0.2:8000"]
    assert list(scores_of(result)) == ["10.0.0.2:8000"]


def test_scheduler_empty_pick_is_no_endpoint() -> None:
    with pytest.raises(SchedulingFailed, match="test-no-pick"):
        Scheduler(profile(picker=NoPick())).schedule(REQ, [state(1)])


def test_scheduler_with_real_plugins_prefers_the_idle_endpoint() -> None:
    flt = AvailabilityFilter(clock=lambda: NOW)
    prof = profile(
        WeightedScorer(QueueScorer(), 2.0),
        WeightedScorer(KvCacheUtilizationScorer(), 2.0),
        WeightedScorer(InflightScorer(), 1.0),
        filters=(flt,),
    )
    busy = state(1, waiting=10, kv=0.9, inflight=3)
    idle = state(2, waiting=0, kv=0.1, inflight=0)
    stale_idle = state(3, waiting=0, kv=0.0, scraped_at=NOW - 10)
    result = Scheduler(prof).schedule(REQ, [busy, idle, stale_idle])
    assert [e.address for e in result.endpoints] == [idle.address]
    assert set(scores_of(result)) == {busy.address, idle.address}
    assert scores_of(result)[idle.address] == pytest.approx(2.0 + 2.0 * 0.9 + 1.0)
    assert scores_of(result)[busy.address] == pytest.approx(2.0 * 0.1)


# --------------------------------------------------------------------------------------------
# registry
# --------------------------------------------------------------------------------------------

BUILTIN = ["availability-filter", "inflight-scorer", "kv-cache-utilization-scorer", "max-score-picker", "queue-scorer"]


def test_registry_knows_the_builtins() -> None:
    assert set(BUILTIN) <= set(registry.known_types())
    assert registry.known_types() == sorted(registry.known_types())


@pytest.mark.parametrize(
    ("type_name", "name", "params", "cls"),
    [
        ("queue-scorer", None, {}, QueueScorer),
        ("kv-cache-utilization-scorer", "kv", {}, KvCacheUtilizationScorer),
        ("inflight-scorer", None, {}, InflightScorer),
        ("availability-filter", "avail", {"stalenessThreshold": 0.5}, AvailabilityFilter),
        ("max-score-picker", None, {"maxNumOfEndpoints": 3}, MaxScorePicker),
    ],
    ids=["queue", "kv-named", "inflight", "availability-params", "picker-params"],
)
def test_registry_create(type_name: str, name: str | None, params: dict[str, float], cls: type[Plugin]) -> None:
    plugin = registry.create(type_name, name, params)
    assert isinstance(plugin, cls)
    assert plugin.name == (name or type_name)
    assert all(plugin.describe()[key] == value for key, value in params.items())


def test_registry_unknown_type_lists_known_types() -> None:
    with pytest.raises(registry.PluginError) as info:
        registry.create("no-such-scorer")
    message = str(info.value)
    assert "unknown plugin type 'no-such-scorer'" in message
    for name in BUILTIN:
        assert name in message


def test_registry_bad_params_name_the_plugin_and_the_field() -> None:
    with pytest.raises(registry.PluginError, match=r"plugin 'q' \(type queue-scorer\).*weight"):
        registry.create("queue-scorer", "q", {"weight": 2})
    with pytest.raises(registry.PluginError, match="maxNumOfEndpoints"):
        registry.create("max-score-picker", None, {"maxNumOfEndpoints": 0})


@pytest.mark.parametrize("bad_name", ["", "Queue-Scorer", "queue scorer"], ids=["empty", "upper", "space"])
def test_register_rejects_non_kebab_names(bad_name: str) -> None:
    class Bad(Scorer):
        type_name = bad_name

        def score(self, request: InferenceRequest, candidates: Sequence[EndpointState]) -> list[float]:
            return []

    with pytest.raises(ValueError, match="kebab-case"):
        registry.register(Bad)
    assert bad_name not in registry.known_types()


def test_register_rejects_a_second_class_under_the_same_name() -> None:
    class Impostor(Scorer):
        type_name = "queue-scorer"

        def score(self, request: InferenceRequest, candidates: Sequence[EndpointState]) -> list[float]:
            return []

    with pytest.raises(ValueError, match="registered twice"):
        registry.register(Impostor)
    assert isinstance(registry.create("queue-scorer"), QueueScorer)
    assert registry.register(QueueScorer) is QueueScorer  # re-registering the same class is fine
