"""More scheduling plugins: load and affinity scorers, the label filter, random pickers, the
single-profile handler, and the in-flight token accounting."""

from __future__ import annotations

import base64
import random
from collections import Counter
from collections.abc import Sequence
from typing import Any

import pytest

from igw.api.errors import SchedulingFailed
from igw.api.load import estimate_tokens
from igw.api.types import Endpoint, EndpointMetrics, EndpointState, InferenceRequest
from igw.framework import registry
from igw.framework.scheduling import (
    SchedulerProfile,
    SchedulingResult,
    ScorerCategory,
    WeightedScorer,
)
from igw.scheduling.plugins.label_selector_filter import LabelSelectorFilter
from igw.scheduling.plugins.load_aware_scorer import LoadAwareScorer
from igw.scheduling.plugins.lora_affinity_scorer import LoraAffinityScorer
from igw.scheduling.plugins.max_score_picker import MaxScorePicker
from igw.scheduling.plugins.profile_handler import SingleProfileHandler
from igw.scheduling.plugins.random_picker import RandomPicker
from igw.scheduling.plugins.running_requests_scorer import RunningRequestsSizeScorer
from igw.scheduling.plugins.session_affinity_scorer import SessionAffinityScorer, decode_token, encode_token
from igw.scheduling.plugins.token_load import (
    INFLIGHT_LOAD,
    InflightLoadProducer,
    TokenLoadScorer,
)
from igw.scheduling.plugins.weighted_random_picker import WeightedRandomPicker
from igw.scheduling.scheduler import Scheduler

NOW = 1000.0


def request(model: str | None = "m", **kwargs: Any) -> InferenceRequest:
    kwargs.setdefault("request_id", "r")
    kwargs.setdefault("path", "/v1/completions")
    kwargs.setdefault("body_size", 10)
    return InferenceRequest(model=model, **kwargs)


REQ = request()


def addr(i: int) -> str:
    return f"10.0.0.{i}:8000"


def state(
    i: int,
    *,
    waiting: float = 0.0,
    running: float = 0.0,
    dispatched: int = 0,
    max_lora: int | None = None,
    active: Sequence[str] = (),
    queued: Sequence[str] = (),
    labels: dict[str, str] | None = None,
    scraped: bool = True,
) -> EndpointState:
    s = EndpointState(Endpoint(addr(i), f"10.0.0.{i}", 8000, labels=tuple((labels or {}).items())))
    if scraped:
        s.metrics = EndpointMetrics(
            waiting=waiting,
            running=running,
            scraped_at=NOW,
            max_lora=max_lora,
            running_adapters=frozenset(active),
            waiting_adapters=frozenset(queued),
        )
    s.dispatched_since_scrape = dispatched
    return s


def states(specs: list[dict[str, Any]]) -> list[EndpointState]:
    return [state(i + 1, **spec) for i, spec in enumerate(specs)]


def in_unit_range(scores: Sequence[float]) -> bool:
    return all(0.0 <= s <= 1.0 for s in scores)


# --------------------------------------------------------------------------------------------
# running-requests-size-scorer
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("specs", "expected"),
    [
        ([{"running": 9}], [1.0]),
        ([{"running": 4}, {"running": 4}, {"running": 4}], [1.0, 1.0, 1.0]),
        ([{"running": 0}, {"running": 8}, {"running": 2}], [1.0, 0.0, 0.75]),
        ([{"running": 0, "waiting": 50}, {"running": 1}], [1.0, 0.0]),
        ([{"running": 2, "dispatched": 9}, {"running": 3}], [1.0, 0.0]),
        ([{"scraped": False}, {"running": 6}], [1.0, 0.0]),
        ([{"scraped": False}, {"scraped": False}], [1.0, 1.0]),
    ],
    ids=["single", "all-equal", "min-max", "waiting-ignored", "dispatched-ignored", "never-scraped", "none-scraped"],
)
def test_running_requests_scorer(specs: list[dict[str, Any]], expected: list[float]) -> None:
    assert RunningRequestsSizeScorer().score(REQ, states(specs)) == pytest.approx(expected)


# --------------------------------------------------------------------------------------------
# lora-affinity-scorer
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ({"max_lora": 2, "active": ["m"]}, 1.0),
        ({"max_lora": 1, "active": ["m"], "queued": ["x"]}, 1.0),
        ({"max_lora": 2, "active": ["m", "x"], "queued": ["m"]}, 1.0),
        ({"max_lora": 2}, 0.8),
        ({"max_lora": 2, "active": ["x"]}, 0.8),
        ({"max_lora": 2, "active": ["x"], "queued": ["x"]}, 0.8),
        ({"max_lora": 2, "active": ["x"], "queued": ["m"]}, 0.6),
        ({"max_lora": 3, "active": ["x"], "queued": ["m"]}, 0.8),
        ({"max_lora": 1, "active": ["x"], "queued": ["m"]}, 0.6),
        ({"max_lora": 2, "active": ["x", "y"]}, 0.0),
        ({"max_lora": 2, "active": ["x"], "queued": ["y"]}, 0.0),
        ({"max_lora": 0}, 0.0),
        ({}, 0.0),
        ({"active": ["m"]}, 1.0),
        ({"scraped": False}, 0.0),
    ],
    ids=[
        "active",
        "active-even-when-full",
        "active-and-waiting",
        "idle-free-slot",
        "free-slot",
        "adapter-running-and-waiting-holds-one-slot",
        "waiting-full",
        "free-slot-beats-waiting",
        "waiting-single-slot",
        "full",
        "full-running-plus-waiting",
        "zero-slots",
        "no-lora-metric",
        "no-max-lora-but-seen-running",
        "never-scraped",
    ],
)
def test_lora_affinity_scorer(spec: dict[str, Any], expected: float) -> None:
    assert LoraAffinityScorer().score(REQ, [state(1, **spec)]) == [expected]


def test_lora_affinity_uses_the_rewritten_model() -> None:
    candidates = states([{"max_lora": 1, "active": ["a"]}, {"max_lora": 1, "active": ["b"]}])
    rewritten = request(model="a", target_model="b")
    assert LoraAffinityScorer().score(rewritten, candidates) == [0.0, 1.0]
    assert LoraAffinityScorer().score(request(model="a"), candidates) == [1.0, 0.0]


def test_lora_affinity_request_without_model_is_no_signal() -> None:
    candidates = states([{"max_lora": 2, "active": ["a"]}, {"max_lora": 2}])
    assert LoraAffinityScorer().score(request(model=None), candidates) == [0.0, 0.0]


def test_lora_affinity_does_not_touch_a_pool_without_lora_metrics() -> None:
    scores = LoraAffinityScorer().score(REQ, states([{"running": 3}, {"waiting": 2}, {"scraped": False}]))
    assert scores == [0.0, 0.0, 0.0]  # adds nothing to any total, whatever the picker


def test_lora_affinity_mixed_pool_ranks() -> None:
    candidates = states(
        [
            {"max_lora": 2, "active": ["m"]},
            {"max_lora": 2},
            {"max_lora": 1, "active": ["x"], "queued": ["m"]},
            {"max_lora": 1, "active": ["x"]},
            {},
        ]
    )
    assert LoraAffinityScorer().score(REQ, candidates) == [1.0, 0.8, 0.6, 0.0, 0.0]


# --------------------------------------------------------------------------------------------
# load-aware-scorer
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("specs", "threshold", "expected"),
    [
        ([{}], 128, [0.5]),
        ([{"waiting": 0}, {"waiting": 64}, {"waiting": 128}, {"waiting": 500}], 128, [0.5, 0.25, 0.0, 0.0]),
        ([{"waiting": 1}], 128, [0.5 * (1 - 1 / 128)]),
        ([{"waiting": 3}, {"waiting": 3}], 128, [0.5 * (1 - 3 / 128)] * 2),
        ([{"waiting": 0, "dispatched": 5}], 10, [0.25]),
        ([{"waiting": 2, "dispatched": 2}], 8, [0.25]),
        ([{"waiting": 0, "running": 99}], 10, [0.5]),
        ([{"scraped": False}], 10, [0.5]),
        ([{"waiting": 1}], 1, [0.0]),
    ],
    ids=[
        "idle",
        "linear-then-capped",
        "one-waiting",
        "all-equal-not-normalised",
        "dispatched-counts",
        "waiting-plus-dispatched",
        "running-ignored",
        "never-scraped",
        "threshold-one",
    ],
)
def test_load_aware_scorer(specs: list[dict[str, Any]], threshold: int, expected: list[float]) -> None:
    scores = LoadAwareScorer(threshold=threshold).score(REQ, states(specs))
    assert scores == pytest.approx(expected)
    assert all(0.0 <= s <= 0.5 for s in scores)


def test_load_aware_scorer_rejects_a_bad_threshold() -> None:
    with pytest.raises(ValueError, match="threshold"):
        LoadAwareScorer(threshold=0)


# --------------------------------------------------------------------------------------------
# inflight-load-producer and token-load-scorer
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("prompt", "body_size", "expected"),
    [
        ("x" * 400, 9999, 100 + 150),
        ("x" * 401, 0, 101 + 152),
        (None, 40, 10 + 15),
        (None, 3, 1 + 2),
        ("", 9999, 1),
        (None, 0, 1),
    ],
    ids=["prompt-chars", "rounded-up", "body-bytes", "tiny-body", "empty-prompt", "empty-body"],
)
def test_estimate_tokens(prompt: str | None, body_size: int, expected: int) -> None:
    assert estimate_tokens(request(prompt_text=prompt, body_size=body_size)) == expected


def result_for(*addresses: str) -> SchedulingResult:
    return SchedulingResult(profile="p", endpoints=[state(int(a.split(".")[3].split(":")[0])) for a in addresses])


def charged(request_id: str, body_size: int = 40) -> InferenceRequest:
    return request(request_id=request_id, body_size=body_size)  # 40 bytes -> 10 + 15 = 25 tokens


def test_producer_charges_the_primary_and_releases_on_completion() -> None:
    producer = InflightLoadProducer()
    a, b, c = charged("a"), charged("b"), charged("c", body_size=400)
    producer.pre_request(a, result_for(addr(1), addr(2)))
    producer.pre_request(b, result_for(addr(1)))
    producer.pre_request(c, result_for(addr(2)))
    assert producer.load == {addr(1): 50, addr(2): 250}

    req = request()
    producer.prepare(req, states([{}, {}, {}]))
    assert req.data[INFLIGHT_LOAD] == {addr(1): 50, addr(2): 250}  # live mapping: absent means 0

    producer.on_response_complete(a, addr(1))
    assert producer.load == {addr(1): 25, addr(2): 250}
    producer.on_response_complete(b, addr(1))
    producer.on_response_complete(c, addr(2))
    assert producer.load == {}


def test_producer_ignores_completions_it_never_charged_and_never_goes_negative() -> None:
    producer = InflightLoadProducer()
    producer.on_response_complete(charged("ghost"), addr(1))
    assert producer.load == {}
    a = charged("a")
    producer.pre_request(a, result_for(addr(1)))
    producer.on_response_complete(charged("ghost"), addr(1))
    producer.on_response_complete(a, addr(1))
    producer.on_response_complete(a, addr(1))  # twice: the second is a no-op
    assert producer.load == {}
    req = request()
    producer.prepare(req, [state(1)])
    assert req.data[INFLIGHT_LOAD] == {}


def test_producer_releases_from_the_charged_endpoint_after_a_fallback() -> None:
    producer = InflightLoadProducer()
    a = charged("a")
    producer.pre_request(a, result_for(addr(1)))
    producer.pre_request(charged("b"), result_for(addr(2)))
    producer.on_response_complete(a, addr(2))  # the proxy fell back to endpoint 2
    assert producer.load == {addr(2): 25}


def test_producer_counts_requests_that_share_a_client_request_id_separately() -> None:
    producer = InflightLoadProducer()
    first, second = charged("a"), charged("a")  # a client reusing its x-request-id
    producer.pre_request(first, result_for(addr(1)))
    producer.pre_request(second, result_for(addr(2)))
    assert producer.load == {addr(1): 25, addr(2): 25}
    producer.on_response_complete(first, addr(1))
    assert producer.load == {addr(2): 25}
    producer.on_response_complete(second, addr(2))
    assert producer.load == {}


def test_producer_charging_the_same_request_twice_keeps_one_charge() -> None:
    producer = InflightLoadProducer()
    a = charged("a")
    producer.pre_request(a, result_for(addr(1)))
    producer.pre_request(a, result_for(addr(2)))
    assert producer.load == {addr(2): 25}
    producer.on_response_complete(a, addr(2))
    assert producer.load == {}


def test_producer_skips_an_empty_result() -> None:
    producer = InflightLoadProducer()
    producer.pre_request(charged("a"), SchedulingResult(profile="p", endpoints=[]))
    assert producer.load == {}


def test_producer_drops_removed_endpoints_on_pool_change() -> None:
    pool = [state(1), state(2)]
    handle = registry.StaticHandle(endpoints=pool)
    producer = registry.create("inflight-load-producer", handle=handle)
    assert isinstance(producer, InflightLoadProducer)
    assert len(handle.listeners) == 1
    a, b, c = charged("a"), charged("b"), charged("c")
    producer.pre_request(a, result_for(addr(1)))
    producer.pre_request(b, result_for(addr(2)))

    pool.pop()  # endpoint 2 leaves the pool
    handle.listeners[0]()
    assert producer.load == {addr(1): 25}

    pool.append(state(2))  # and comes back under the same address: it starts from zero
    handle.listeners[0]()
    producer.pre_request(c, result_for(addr(2)))
    producer.on_response_complete(b, addr(2))  # its old charge was dropped
    assert producer.load == {addr(1): 25, addr(2): 25}
    producer.on_response_complete(c, addr(2))
    producer.on_response_complete(a, addr(1))
    assert producer.load == {}


def test_producer_declares_what_it_produces() -> None:
    assert InflightLoadProducer.produces == frozenset({INFLIGHT_LOAD})
    assert TokenLoadScorer.consumes == {INFLIGHT_LOAD: "inflight-load-producer"}


@pytest.mark.parametrize(
    ("load", "threshold", "expected"),
    [
        ({addr(1): 0, addr(2): 50, addr(3): 100, addr(4): 1000}, 100, [1.0, 0.5, 0.0, 0.0]),
        ({addr(1): 7, addr(2): 7, addr(3): 7, addr(4): 7}, 100, [0.93] * 4),
        ({addr(1): 25}, 100, [0.75, 1.0, 1.0, 1.0]),
        ({}, 100, [1.0] * 4),
        ({addr(1): 2_097_152}, 4_194_304, [0.5, 1.0, 1.0, 1.0]),
    ],
    ids=["linear-then-capped", "all-equal-not-normalised", "missing-address-is-idle", "empty-map", "default-threshold"],
)
def test_token_load_scorer(load: dict[str, int], threshold: int, expected: list[float]) -> None:
    req = request()
    req.data[INFLIGHT_LOAD] = load
    scores = TokenLoadScorer(queue_threshold_tokens=threshold).score(req, states([{}, {}, {}, {}]))
    assert scores == pytest.approx(expected)


@pytest.mark.parametrize("data", [{}, {INFLIGHT_LOAD: None}, {INFLIGHT_LOAD: 3}], ids=["absent", "none", "garbage"])
def test_token_load_scorer_without_data_has_no_preference(data: dict[str, Any]) -> None:
    req = request()
    req.data.update(data)
    assert TokenLoadScorer().score(req, states([{}, {}])) == [1.0, 1.0]


def test_token_load_scorer_rejects_a_bad_threshold() -> None:
    with pytest.raises(ValueError, match="queueThresholdTokens"):
        TokenLoadScorer(queue_threshold_tokens=0)


def test_token_load_end_to_end_steers_away_from_the_loaded_endpoint() -> None:
    producer = InflightLoadProducer()
    scorer = TokenLoadScorer(queue_threshold_tokens=100)
    scheduler = Scheduler(SchedulerProfile("p", (), (WeightedScorer(scorer),), MaxScorePicker(rng=random.Random(0))))
    candidates = states([{}, {}])
    picks = []
    for i in range(4):
        req = charged(f"r{i}")
        producer.prepare(req, candidates)
        result = scheduler.schedule(req, candidates)
        producer.pre_request(req, result)
        picks.append(result.endpoints[0].address)
    assert Counter(picks) == {addr(1): 2, addr(2): 2}
    assert producer.load == {addr(1): 50, addr(2): 50}


# --------------------------------------------------------------------------------------------
# session-affinity-scorer
# --------------------------------------------------------------------------------------------


def with_token(token: str | None) -> InferenceRequest:
    return request(headers={} if token is None else {"x-session-token": token})


@pytest.mark.parametrize(
    ("token", "expected"),
    [
        (encode_token(addr(2)), [0.0, 1.0, 0.0]),
        (" " + encode_token(addr(3)) + " ", [0.0, 0.0, 1.0]),
        (encode_token(addr(9)), [0.0, 0.0, 0.0]),
        (None, [0.0, 0.0, 0.0]),
        ("", [0.0, 0.0, 0.0]),
        ("not base64 at all!", [0.0, 0.0, 0.0]),
        ("abc", [0.0, 0.0, 0.0]),
        (base64.b64encode(b"\xff\xfe").decode(), [0.0, 0.0, 0.0]),
        ("ü", [0.0, 0.0, 0.0]),
        (addr(1), [0.0, 0.0, 0.0]),
    ],
    ids=[
        "match",
        "whitespace",
        "gone",
        "no-header",
        "empty",
        "bad-chars",
        "bad-padding",
        "not-utf8",
        "non-ascii",
        "plain-address",
    ],
)
def test_session_affinity_scorer(token: str | None, expected: list[float]) -> None:
    assert SessionAffinityScorer().score(with_token(token), states([{}, {}, {}])) == expected


def test_session_token_round_trip() -> None:
    scorer = SessionAffinityScorer()
    headers = scorer.on_response_headers(REQ, "[fd00::1]:8000", 200)
    assert headers == {"x-session-token": base64.b64encode(b"[fd00::1]:8000").decode()}
    assert decode_token(headers["x-session-token"]) == "[fd00::1]:8000"
    assert scorer.on_response_headers(REQ, None, 200) is None
    assert scorer.on_response_headers(REQ, "", None) is None
    token = scorer.on_response_headers(REQ, addr(1), 200)
    assert token is not None
    assert scorer.score(with_token(token["x-session-token"]), states([{}, {}])) == [1.0, 0.0]


# --------------------------------------------------------------------------------------------
# label-selector-filter
# --------------------------------------------------------------------------------------------

LABELLED: list[dict[str, Any]] = [
    {"labels": {"role": "decode", "gpu": "h100"}},
    {"labels": {"role": "prefill", "gpu": "a100"}},
    {"labels": {"role": "decode"}},
    {"labels": {}},
]


@pytest.mark.parametrize(
    ("params", "kept"),
    [
        ({}, [1, 2, 3, 4]),
        ({"matchLabels": {}, "matchExpressions": []}, [1, 2, 3, 4]),
        ({"matchLabels": {"role": "decode"}}, [1, 3]),
        ({"matchLabels": {"role": "decode", "gpu": "h100"}}, [1]),
        ({"matchLabels": {"role": "encode"}}, []),
        ({"matchExpressions": [{"key": "gpu", "operator": "In", "values": ["h100", "a100"]}]}, [1, 2]),
        ({"matchExpressions": [{"key": "gpu", "operator": "NotIn", "values": ["h100"]}]}, [2, 3, 4]),
        ({"matchExpressions": [{"key": "gpu", "operator": "Exists"}]}, [1, 2]),
        ({"matchExpressions": [{"key": "gpu", "operator": "DoesNotExist"}]}, [3, 4]),
        ({"matchExpressions": [{"key": "gpu", "operator": "Exists", "values": []}]}, [1, 2]),
        (
            {
                "matchLabels": {"role": "decode"},
                "matchExpressions": [{"key": "gpu", "operator": "DoesNotExist"}],
            },
            [3],
        ),
        (
            {
                "matchExpressions": [
                    {"key": "role", "operator": "In", "values": ["decode", "prefill"]},
                    {"key": "gpu", "operator": "NotIn", "values": ["a100"]},
                ]
            },
            [1, 3],
        ),
    ],
    ids=[
        "no-params",
        "empty-selector",
        "match-labels",
        "match-labels-all-must-hold",
        "nothing-matches",
        "in",
        "not-in-includes-absent",
        "exists",
        "does-not-exist",
        "exists-empty-values-ok",
        "labels-and-expressions",
        "expressions-anded",
    ],
)
def test_label_selector_filter(params: dict[str, Any], kept: list[int]) -> None:
    flt = registry.create("label-selector-filter", params=params)
    assert isinstance(flt, LabelSelectorFilter)
    out = flt.filter(REQ, states(LABELLED))
    assert [c.address for c in out] == [addr(i) for i in kept]


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"matchExpressions": [{"key": "gpu", "operator": "In", "values": []}]}, "non-empty values"),
        ({"matchExpressions": [{"key": "gpu", "operator": "NotIn"}]}, "non-empty values"),
        ({"matchExpressions": [{"key": "gpu", "operator": "Exists", "values": ["x"]}]}, "takes no values"),
        ({"matchExpressions": [{"key": "gpu", "operator": "DoesNotExist", "values": ["x"]}]}, "takes no values"),
        ({"matchExpressions": [{"key": "gpu", "operator": "Gt", "values": ["1"]}]}, "operator"),
        ({"matchExpressions": [{"key": "", "operator": "Exists"}]}, "key"),
        ({"matchExpressions": [{"operator": "Exists"}]}, "key"),
        ({"matchExpressions": [{"key": "gpu", "operator": "Exists", "value": "x"}]}, "value"),
        ({"matchLabels": {"role": 3}}, "matchLabels"),
        ({"matchLabels": ["role"]}, "matchLabels"),
        ({"selector": {}}, "selector"),
    ],
    ids=[
        "in-empty",
        "not-in-missing",
        "exists-with-values",
        "does-not-exist-with-values",
        "unknown-operator",
        "empty-key",
        "missing-key",
        "unknown-requirement-key",
        "non-string-label-value",
        "labels-not-a-map",
        "unknown-param",
    ],
)
def test_label_selector_filter_rejects_bad_params(params: dict[str, Any], message: str) -> None:
    with pytest.raises(registry.PluginError, match=message):
        registry.create("label-selector-filter", "sel", params)


def test_label_selector_filter_describe() -> None:
    params = {
        "matchLabels": {"role": "decode"},
        "matchExpressions": [{"key": "gpu", "operator": "In", "values": ["h100"]}],
    }
    assert registry.create("label-selector-filter", params=params).describe() == {
        "matchLabels": {"role": "decode"},
        "matchExpressions": [{"key": "gpu", "operator": "In", "values": ["h100"]}],
    }
    assert LabelSelectorFilter().describe() == {"matchLabels": {}, "matchExpressions": []}


# --------------------------------------------------------------------------------------------
# random-picker and weighted-random-picker
# --------------------------------------------------------------------------------------------


def scored(*scores: float) -> tuple[list[EndpointState], list[float]]:
    return [state(i + 1) for i in range(len(scores))], list(scores)


def first_pick_frequencies(picker: Any, scores: Sequence[float], n: int) -> list[float]:
    candidates, totals = scored(*scores)
    counts = Counter(picker.pick(REQ, candidates, totals)[0].address for _ in range(n))
    return [counts[addr(i + 1)] / n for i in range(len(scores))]


def test_random_picker_is_uniform_and_ignores_scores() -> None:
    freq = first_pick_frequencies(RandomPicker(rng=random.Random(5)), [0.0, 10.0, 1.0, 3.0], 20_000)
    assert freq == pytest.approx([0.25] * 4, abs=0.02)


@pytest.mark.parametrize(
    ("n", "max_endpoints", "expected_len"),
    [(1, 1, 1), (1, 3, 1), (3, 2, 2), (3, 3, 3), (3, 10, 3)],
    ids=["single", "single-many", "two-of-three", "all", "more-than-candidates"],
)
def test_random_picker_returns_distinct_endpoints(n: int, max_endpoints: int, expected_len: int) -> None:
    picker = RandomPicker(max_endpoints=max_endpoints, rng=random.Random(3))
    candidates, totals = scored(*([1.0] * n))
    for _ in range(50):
        picked = picker.pick(REQ, candidates, totals)
        assert len(picked) == expected_len
        assert len({p.address for p in picked}) == expected_len


def test_random_picker_fallback_order_is_uniform() -> None:
    picker = RandomPicker(max_endpoints=3, rng=random.Random(11))
    candidates, totals = scored(1.0, 1.0, 1.0)
    orders = Counter(tuple(p.address for p in picker.pick(REQ, candidates, totals)) for _ in range(12_000))
    assert len(orders) == 6
    assert all(abs(c / 12_000 - 1 / 6) < 0.02 for c in orders.values())


def test_weighted_random_picker_is_proportional_to_scores() -> None:
    freq = first_pick_frequencies(WeightedRandomPicker(rng=random.Random(42)), [1.0, 2.0, 3.0, 4.0], 20_000)
    assert freq == pytest.approx([0.1, 0.2, 0.3, 0.4], abs=0.015)


def test_weighted_random_picker_handles_totals_above_one_and_tiny_scores() -> None:
    freq = first_pick_frequencies(WeightedRandomPicker(rng=random.Random(8)), [3.0, 6.0, 1e-300], 10_000)
    assert freq == pytest.approx([1 / 3, 2 / 3, 0.0], abs=0.02)


def test_weighted_random_picker_second_pick_follows_the_remaining_weights() -> None:
    picker = WeightedRandomPicker(max_endpoints=2, rng=random.Random(13))
    candidates, totals = scored(1.0, 1.0, 2.0)
    n = 20_000
    seconds: Counter[str] = Counter()
    for _ in range(n):
        first, second = picker.pick(REQ, candidates, totals)
        if first.address == addr(1):
            seconds[second.address] += 1
    # P(first = 1) = 1/4; then P(second = 3 | first = 1) = 2/3
    assert sum(seconds.values()) / n == pytest.approx(0.25, abs=0.015)
    assert seconds[addr(3)] / sum(seconds.values()) == pytest.approx(2 / 3, abs=0.03)


def test_weighted_random_picker_puts_zero_scores_last() -> None:
    picker = WeightedRandomPicker(max_endpoints=4, rng=random.Random(21))
    candidates, totals = scored(0.0, 0.5, -1.0, 0.1)
    tails: Counter[str] = Counter()
    for _ in range(500):
        picked = [p.address for p in picker.pick(REQ, candidates, totals)]
        assert set(picked[:2]) == {addr(2), addr(4)}
        assert set(picked[2:]) == {addr(1), addr(3)}
        tails[picked[2]] += 1
    assert set(tails) == {addr(1), addr(3)}  # the zeros come in random order


def test_weighted_random_picker_never_picks_zero_while_positive_exists() -> None:
    freq = first_pick_frequencies(WeightedRandomPicker(rng=random.Random(2)), [0.0, 0.001, 0.0], 2_000)
    assert freq == [0.0, 1.0, 0.0]


def test_weighted_random_picker_all_zero_is_uniform() -> None:
    freq = first_pick_frequencies(WeightedRandomPicker(rng=random.Random(17)), [0.0, 0.0, 0.0, 0.0], 20_000)
    assert freq == pytest.approx([0.25] * 4, abs=0.02)


@pytest.mark.parametrize(
    ("scores", "max_endpoints", "expected_len"),
    [((0.5,), 1, 1), ((0.0,), 3, 1), ((0.5, 0.0, 0.2), 2, 2), ((0.5, 0.0, 0.2), 5, 3)],
    ids=["single", "single-zero", "two-of-three", "more-than-candidates"],
)
def test_weighted_random_picker_sizes(scores: tuple[float, ...], max_endpoints: int, expected_len: int) -> None:
    picker = WeightedRandomPicker(max_endpoints=max_endpoints, rng=random.Random(1))
    picked = picker.pick(REQ, *scored(*scores))
    assert len(picked) == expected_len
    assert len({p.address for p in picked}) == expected_len


@pytest.mark.parametrize("cls", [RandomPicker, WeightedRandomPicker], ids=["random", "weighted"])
def test_random_pickers_are_reproducible_with_a_seed(cls: type[RandomPicker | WeightedRandomPicker]) -> None:
    def run() -> list[str]:
        picker = cls(max_endpoints=2, rng=random.Random(99))
        candidates, totals = scored(0.2, 0.4, 0.6, 0.8)
        return [p.address for _ in range(30) for p in picker.pick(REQ, candidates, totals)]

    assert run() == run()


@pytest.mark.parametrize("cls", [RandomPicker, WeightedRandomPicker], ids=["random", "weighted"])
def test_random_pickers_reject_bad_max_endpoints(cls: type[RandomPicker | WeightedRandomPicker]) -> None:
    with pytest.raises(ValueError, match="max_endpoints"):
        cls(max_endpoints=0)


# --------------------------------------------------------------------------------------------
# single-profile-handler
# --------------------------------------------------------------------------------------------


def one_profile(name: str = "default") -> SchedulerProfile:
    return SchedulerProfile(name, (), (), MaxScorePicker(rng=random.Random(0)))


def test_single_profile_handler_runs_the_profile_once() -> None:
    handler = SingleProfileHandler()
    prof = one_profile()
    profiles = {"default": prof}
    assert handler.pick_profiles(REQ, profiles, {}) == [prof]
    result = SchedulingResult(profile="default", endpoints=[state(1)])
    assert handler.pick_profiles(REQ, profiles, {"default": result}) == []
    assert handler.pick_profiles(REQ, profiles, {"default": None}) == []
    assert handler.process_results(REQ, {"default": result}) is result


def test_single_profile_handler_no_endpoint_names_the_profile() -> None:
    with pytest.raises(SchedulingFailed, match="'decode'"):
        SingleProfileHandler().process_results(REQ, {"decode": None})


@pytest.mark.parametrize("names", [[], ["a", "b"], ["a", "b", "c"]], ids=["none", "two", "three"])
def test_single_profile_handler_refuses_other_profile_counts(names: list[str]) -> None:
    handler = SingleProfileHandler("sph")
    with pytest.raises(ValueError, match=f"exactly one scheduling profile, got {len(names)}"):
        handler.validate_profiles(names)
    profiles = {n: one_profile(n) for n in names}
    with pytest.raises(ValueError, match="exactly one"):
        handler.pick_profiles(REQ, profiles, {})
    with pytest.raises(ValueError, match="exactly one"):
        handler.process_results(REQ, dict.fromkeys(names))


def test_single_profile_handler_validate_accepts_one() -> None:
    SingleProfileHandler().validate_profiles(["only"])
    SingleProfileHandler().validate_profiles(iter(["only"]))


def test_single_profile_handler_in_the_scheduler() -> None:
    handler = SingleProfileHandler()
    scheduler = Scheduler(one_profile(), handler)
    result = scheduler.schedule(REQ, [state(1)])
    assert result.profile == "default"
    assert [e.address for e in result.endpoints] == [addr(1)]

    drop_all = LabelSelectorFilter(match_labels={"role": "none"})
    empty = Scheduler(SchedulerProfile("x", (drop_all,), (), MaxScorePicker()), handler)
    with pytest.raises(SchedulingFailed, match="label-selector-filter"):
        empty.schedule(REQ, [state(1)])


# --------------------------------------------------------------------------------------------
# registry: types, names, parameters
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("type_name", "params", "cls", "described"),
    [
        ("running-requests-size-scorer", {}, RunningRequestsSizeScorer, {}),
        ("lora-affinity-scorer", {}, LoraAffinityScorer, {}),
        ("load-aware-scorer", {}, LoadAwareScorer, {"threshold": 128}),
        ("load-aware-scorer", {"threshold": 16}, LoadAwareScorer, {"threshold": 16}),
        ("token-load-scorer", {}, TokenLoadScorer, {"queueThresholdTokens": 4_194_304}),
        ("token-load-scorer", {"queueThresholdTokens": 1000}, TokenLoadScorer, {"queueThresholdTokens": 1000}),
        ("inflight-load-producer", {}, InflightLoadProducer, {}),
        ("session-affinity-scorer", {}, SessionAffinityScorer, {}),
        ("label-selector-filter", {}, LabelSelectorFilter, {"matchLabels": {}, "matchExpressions": []}),
        ("random-picker", {}, RandomPicker, {"maxNumOfEndpoints": 1}),
        ("random-picker", {"maxNumOfEndpoints": 3}, RandomPicker, {"maxNumOfEndpoints": 3}),
        ("weighted-random-picker", {}, WeightedRandomPicker, {"maxNumOfEndpoints": 1}),
        ("weighted-random-picker", {"maxNumOfEndpoints": 2}, WeightedRandomPicker, {"maxNumOfEndpoints": 2}),
        ("single-profile-handler", {}, SingleProfileHandler, {}),
    ],
    ids=[
        "running",
        "lora",
        "load-aware-default",
        "load-aware",
        "token-load-default",
        "token-load",
        "producer",
        "session",
        "label-selector",
        "random-default",
        "random",
        "weighted-default",
        "weighted",
        "profile-handler",
    ],
)
def test_registry_creates_each_type(
    type_name: str, params: dict[str, Any], cls: type[Any], described: dict[str, Any]
) -> None:
    plugin = registry.create(type_name, params=params)
    assert type(plugin) is cls
    assert plugin.type_name == type_name
    assert plugin.name == type_name
    assert plugin.describe() == described
    assert registry.create(type_name, "mine", params).name == "mine"
    assert type_name in registry.known_types()


@pytest.mark.parametrize(
    ("cls", "category"),
    [
        (RunningRequestsSizeScorer, ScorerCategory.DISTRIBUTION),
        (LoraAffinityScorer, ScorerCategory.AFFINITY),
        (LoadAwareScorer, ScorerCategory.BALANCE),
        (TokenLoadScorer, ScorerCategory.BALANCE),
        (SessionAffinityScorer, ScorerCategory.AFFINITY),
    ],
    ids=["running", "lora", "load-aware", "token-load", "session"],
)
def test_scorer_categories(cls: type[Any], category: ScorerCategory) -> None:
    assert cls.category is category


@pytest.mark.parametrize(
    ("type_name", "params", "message"),
    [
        ("running-requests-size-scorer", {"threshold": 1}, "threshold"),
        ("lora-affinity-scorer", {"maxLora": 4}, "maxLora"),
        ("session-affinity-scorer", {"header": "x"}, "header"),
        ("inflight-load-producer", {"ratio": 1.5}, "ratio"),
        ("single-profile-handler", {"primary": "p"}, "primary"),
        ("load-aware-scorer", {"threshold": 0}, "threshold"),
        ("load-aware-scorer", {"threshold": -5}, "threshold"),
        ("load-aware-scorer", {"threshold": "lots"}, "threshold"),
        ("load-aware-scorer", {"queueThreshold": 10}, "queueThreshold"),
        ("token-load-scorer", {"queueThresholdTokens": 0}, "queueThresholdTokens"),
        ("token-load-scorer", {"queueThresholdTokens": 2.5}, "queueThresholdTokens"),
        ("token-load-scorer", {"threshold": 10}, "threshold"),
        ("random-picker", {"maxNumOfEndpoints": 0}, "maxNumOfEndpoints"),
        ("random-picker", {"max_endpoints": 2}, "max_endpoints"),
        ("weighted-random-picker", {"maxNumOfEndpoints": -1}, "maxNumOfEndpoints"),
        ("weighted-random-picker", {"seed": 1}, "seed"),
    ],
    ids=[
        "running-takes-none",
        "lora-takes-none",
        "session-takes-none",
        "producer-takes-none",
        "handler-takes-none",
        "load-aware-zero",
        "load-aware-negative",
        "load-aware-not-a-number",
        "load-aware-unknown",
        "token-load-zero",
        "token-load-fraction",
        "token-load-unknown",
        "random-zero",
        "random-snake-case-unknown",
        "weighted-negative",
        "weighted-unknown",
    ],
)
def test_registry_rejects_bad_params(type_name: str, params: dict[str, Any], message: str) -> None:
    with pytest.raises(registry.PluginError, match=message) as info:
        registry.create(type_name, "bad", params)
    assert "'bad'" in str(info.value)
    assert type_name in str(info.value)


def test_registry_accepts_snake_case_field_names_too() -> None:
    # populate_by_name: the Python field names are accepted besides the camelCase aliases
    plugin = registry.create("token-load-scorer", params={"queue_threshold_tokens": 10})
    assert plugin.describe() == {"queueThresholdTokens": 10}


def test_all_scores_stay_in_unit_range() -> None:
    candidates = states(
        [
            {"waiting": 1e9, "running": 1e9, "dispatched": 10**6, "max_lora": 1, "active": ["x"]},
            {"max_lora": 4, "active": ["m"]},
            {"scraped": False},
        ]
    )
    req = with_token(encode_token(addr(2)))
    req.data[INFLIGHT_LOAD] = {addr(1): 10**12, addr(2): 0}
    for scorer in (
        RunningRequestsSizeScorer(),
        LoraAffinityScorer(),
        LoadAwareScorer(),
        TokenLoadScorer(),
        SessionAffinityScorer(),
    ):
        scores = scorer.score(req, candidates)
        assert len(scores) == len(candidates)
        assert in_unit_range(scores), scorer


def test_max_score_picker_with_fallbacks_breaks_ties_at_random() -> None:
    picker = MaxScorePicker(max_endpoints=3, rng=random.Random(7))
    cands = states([{}] * 5)
    firsts: Counter[str] = Counter()
    thirds: Counter[str] = Counter()
    for _ in range(3000):
        picked = picker.pick(request(), cands, [2.0, 1.0, 2.0, 1.0, 1.0])
        assert {picked[0].address, picked[1].address} == {addr(1), addr(3)}
        firsts[picked[0].address] += 1
        thirds[picked[2].address] += 1
    assert set(firsts) == {addr(1), addr(3)}
    assert min(firsts.values()) > 1300
    assert set(thirds) == {addr(2), addr(4), addr(5)}
    assert min(thirds.values()) > 850
    all_tied = Counter(e.address for _ in range(2000) for e in picker.pick(request(), cands, [1.0] * 5))
    assert set(all_tied) == {addr(i) for i in range(1, 6)}
    assert min(all_tied.values()) > 1000  # each is in 3 of 5 picks: ~1200


def test_producer_moves_the_load_to_the_endpoint_that_served() -> None:
    producer = InflightLoadProducer()
    a = charged("a")
    producer.pre_request(a, result_for(addr(1)))
    producer.on_response_headers(a, addr(2), 200)  # the proxy fell back to endpoint 2
    assert producer.load == {addr(2): 25}
    producer.on_response_headers(a, addr(2), 200)
    assert producer.load == {addr(2): 25}
    producer.on_response_complete(a, addr(2))
    assert producer.load == {}
