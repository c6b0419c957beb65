"""Saturation detectors (as detectors and as filters) and admission by priority."""

from __future__ import annotations

import pytest

from igw.api.errors import Shed
from igw.api.types import Endpoint, EndpointMetrics, EndpointState, InferenceRequest
from igw.config.settings import AdmissionSettings
from igw.flowcontrol.admission import Admission
from igw.flowcontrol.saturation import (
    ConcurrencyDetector,
    ConcurrencyParams,
    UtilizationDetector,
    UtilizationParams,
)
from igw.framework import registry
from igw.framework.requestcontrol import Admitter
from igw.framework.scheduling import SchedulingResult

NOW = 100.0


def state(i: int, *, waiting: float = 0, kv: float = 0.0, age: float | None = 0.01, inflight: int = 0) -> EndpointState:
    s = EndpointState(Endpoint(f"10.0.0.{i}:8000", f"10.0.0.{i}", 8000))
    s.metrics = EndpointMetrics(waiting=waiting, kv_usage=kv, scraped_at=0.0 if age is None else NOW - age)
    s.inflight = inflight
    return s


def request(priority: int = 0, prompt: str = "x" * 400, rid: str = "r") -> InferenceRequest:
    return InferenceRequest(request_id=rid, model="m", path="/v1/completions", body_size=len(prompt),
                            prompt_text=prompt, priority=priority, objective="obj" if priority else None)  # fmt: skip


def util(**params: float | str) -> UtilizationDetector:
    return UtilizationDetector("u", UtilizationParams.model_validate(params), clock=lambda: NOW)


# --------------------------------------------------------------------------------------------
# utilization-detector
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("states", "expected"),
    [
        ([], 1.0),
        ([state(1)], 0.0),
        ([state(1, waiting=5)], 1.0),
        ([state(1, kv=0.4)], 0.5),
        ([state(1, waiting=2.5, kv=0.72)], 0.9),  # max(0.5, 0.9)
        ([state(1, waiting=10), state(2)], 1.0),  # mean of 2.0 and 0.0
        ([state(1, age=0.5), state(2)], 0.5),  # stale -> 1.0
        ([state(1, age=None)], 1.0),  # never scraped
    ],
    ids=["empty", "idle", "queue-at-threshold", "half-kv", "max-of-both", "mean", "stale", "never-scraped"],
)
def test_utilization_saturation(states: list[EndpointState], expected: float) -> None:
    assert util().saturation(states) == pytest.approx(expected)


def test_utilization_counts_requests_sent_since_the_scrape() -> None:
    s = state(1, waiting=3)
    s.dispatched_since_scrape = 2
    assert util().saturation([s]) == pytest.approx(1.0)


def test_utilization_filter_drops_full_and_stale_endpoints_but_fails_open() -> None:
    ok, queued, full_kv, stale = state(1, waiting=4), state(2, waiting=5), state(3, kv=0.8), state(4, age=1.0)
    d = util()
    assert d.filter(request(), [ok, queued, full_kv, stale]) == [ok]
    assert d.filter(request(), [queued, full_kv, stale]) == [queued, full_kv, stale]
    assert util(headroom=0.2).filter(request(), [ok, queued, full_kv]) == [ok, queued, full_kv]  # limits 6 / 0.96


def test_utilization_params() -> None:
    d = registry.create("utilization-detector", None, {"metricsStalenessThreshold": "1m30s", "headroom": 0.1})
    assert isinstance(d, UtilizationDetector)
    assert d.describe()["metricsStalenessThreshold"] == 90.0
    for bad in ({"queueDepthThreshold": 0}, {"kvCacheUtilThreshold": 1.2}, {"metricsStalenessThreshold": "soon"},
                {"headroom": -1}, {"queue": 1}):  # fmt: skip
        with pytest.raises(registry.PluginError):
            registry.create("utilization-detector", None, bad)


# --------------------------------------------------------------------------------------------
# concurrency-detector
# --------------------------------------------------------------------------------------------


def test_concurrency_requests_mode() -> None:
    d = ConcurrencyDetector("c", ConcurrencyParams(max_concurrency=10))
    a, b = state(1, inflight=10), state(2, inflight=5)
    assert d.saturation([a, b]) == pytest.approx(0.75)
    assert d.saturation([]) == 1.0
    assert d.filter(request(), [a, b]) == [b]
    assert d.filter(request(), [a]) == [a]  # fails open


def test_concurrency_tokens_mode_charges_and_releases() -> None:
    d = ConcurrencyDetector("c", ConcurrencyParams(concurrency_mode="tokens", max_token_concurrency=500))
    a, b = state(1), state(2)
    r1 = request(rid="1")  # 400 chars -> 100 in + 150 out
    d.pre_request(r1, SchedulingResult(profile="p", endpoints=[a]))
    assert d.load(a) == 250
    assert d.saturation([a, b]) == pytest.approx(0.25)
    d.pre_request(request(rid="2"), SchedulingResult(profile="p", endpoints=[a]))
    assert d.filter(request(), [a, b]) == [b]
    d.on_response_complete(r1, a.address)
    d.on_response_complete(r1, a.address)  # twice: released once
    assert d.load(a) == 250


# --------------------------------------------------------------------------------------------
# admission
# --------------------------------------------------------------------------------------------


def test_sheddable_requests_are_shed_only_when_saturated() -> None:
    admission = Admission(AdmissionSettings(), lambda: 0, detector=util())
    busy, idle = [state(1, waiting=9)], [state(1)]
    admission.admit(request(priority=-1), idle)
    admission.admit(request(priority=0), busy)
    admission.admit(request(priority=5), busy)
    with pytest.raises(Shed) as info:
        admission.admit(request(priority=-1), busy)
    assert "saturated" in info.value.message
    assert "priority -1" in info.value.message


def test_inflight_cap_applies_to_every_priority() -> None:
    admission = Admission(AdmissionSettings(max_inflight_requests=3), lambda: 3)
    with pytest.raises(Shed, match="limit 3"):
        admission.admit(request(priority=10), [state(1)])


class _Refuser(Admitter):
    type_name = "test-refuser"

    def admit(self, request: InferenceRequest, candidates: object) -> None:
        if request.priority < 1:
            raise Shed("refused by test")


class _Broken(Admitter):
    type_name = "test-broken-admitter"

    def admit(self, request: InferenceRequest, candidates: object) -> None:
        raise RuntimeError("bug")


def test_admitters_all_must_admit_and_a_broken_one_fails_open() -> None:
    admission = Admission(AdmissionSettings(), lambda: 0, admitters=[_Broken(), _Refuser()])
    admission.admit(request(priority=1), [state(1)])
    with pytest.raises(Shed, match="refused by test"):
        admission.admit(request(priority=0), [state(1)])
