"""EndpointStore: pool replacement, declared models, metric updates, in-flight accounting, listeners."""

from __future__ import annotations

import pytest

from igw.api.types import NEVER_SCRAPED, Endpoint, EndpointMetrics, Engine
from igw.datalayer.store import EndpointStore


def ep(address: str, *, models: list[str] | None = None, engine: Engine = Engine.VLLM) -> Endpoint:
    host, port = Endpoint.parse_address(address)
    return Endpoint(
        address=address,
        host=host,
        port=port,
        engine=engine,
        models=frozenset(models) if models is not None else None,
    )


A, B, C = "10.0.0.1:8000", "10.0.0.2:8000", "10.0.0.3:8000"
METRICS = EndpointMetrics(waiting=3.0, running=2.0, kv_usage=0.5, block_size=16, num_gpu_blocks=100, scraped_at=5.0)


def test_new_store_is_empty_and_unsynced() -> None:
    store = EndpointStore(pool_name="p")
    assert store.endpoints() == ()
    assert store.synced is False
    assert store.pool_name == "p"
    assert store.get(A) is None


def test_set_endpoints_orders_and_marks_synced() -> None:
    store = EndpointStore()
    store.set_endpoints([ep(B), ep(A), ep(C)])
    assert [s.address for s in store.endpoints()] == [B, A, C]
    assert store.synced is True
    state = store.get(A)
    assert state is not None
    assert state.metrics is NEVER_SCRAPED
    assert (state.inflight, state.dispatched_since_scrape, state.failures, state.last_error) == (0, 0, 0, None)


def test_set_endpoints_empty_pool_is_synced() -> None:
    store = EndpointStore()
    store.set_endpoints([])
    assert store.synced is True
    assert store.endpoints() == ()


def test_surviving_endpoints_keep_their_state_object() -> None:
    store = EndpointStore()
    store.set_endpoints([ep(A), ep(B)])
    a = store.get(A)
    assert a is not None
    store.update_metrics(A, METRICS)
    store.request_started(A)
    store.request_started(A)
    store.record_scrape_error(A, "boom", 2)
    store.set_endpoints([ep(C), ep(A)])
    assert store.get(A) is a
    assert (a.metrics, a.inflight, a.dispatched_since_scrape, a.failures, a.last_error) == (METRICS, 2, 2, 2, "boom")
    assert store.get(B) is None
    assert [s.address for s in store.endpoints()] == [C, A]


def test_changed_endpoint_keeps_metrics_and_inflight() -> None:
    store = EndpointStore()
    store.set_endpoints([ep(A, models=["m1"])])
    store.update_metrics(A, METRICS)
    store.request_started(A)
    store.set_endpoints([ep(A, models=["m1", "m2"])])
    state = store.get(A)
    assert state is not None
    assert state.endpoint.models == frozenset({"m1", "m2"})
    assert state.metrics == METRICS
    assert state.inflight == 1
    store.request_finished(A)
    assert state.inflight == 0


def test_changed_endpoint_keeps_load_and_scrape_health() -> None:
    store = EndpointStore()
    store.set_endpoints([ep(A, models=["m1"])])
    store.update_metrics(A, METRICS)
    store.request_started(A)
    store.record_scrape_error(A, "connection refused", 5)
    store.set_endpoints([ep(A, models=["m2"])])
    state = store.get(A)
    assert state is not None
    assert (state.dispatched_since_scrape, state.failures, state.last_error) == (1, 5, "connection refused")


@pytest.mark.parametrize(
    ("models", "expected"),
    [
        ([["a"], ["b", "c"]], frozenset({"a", "b", "c"})),
        ([["a"], ["a"]], frozenset({"a"})),
        ([["a"], None], None),
        ([None, None], None),
        ([[], ["a"]], frozenset({"a"})),
        ([], frozenset()),
    ],
    ids=["union", "overlap", "one-undeclared-means-any", "none-declared", "empty-declared", "empty-pool"],
)
def test_declared_models(models: list[list[str] | None], expected: frozenset[str] | None) -> None:
    store = EndpointStore()
    store.set_endpoints([ep(f"10.0.0.{i + 1}:8000", models=m) for i, m in enumerate(models)])
    assert store.declared_models() == expected


def test_update_metrics_resets_dispatch_and_failures() -> None:
    store = EndpointStore()
    store.set_endpoints([ep(A)])
    for _ in range(3):
        store.request_started(A)
    store.record_scrape_error(A, "timeout", 4)
    state = store.get(A)
    assert state is not None
    assert (state.dispatched_since_scrape, state.failures, state.last_error) == (3, 4, "timeout")
    store.update_metrics(A, METRICS)
    assert state.metrics == METRICS
    assert (state.dispatched_since_scrape, state.failures, state.last_error) == (0, 0, None)
    assert state.inflight == 3  # the scrape does not touch the local in-flight count


def test_updates_for_unknown_addresses_are_ignored() -> None:
    store = EndpointStore()
    store.set_endpoints([ep(A)])
    store.update_metrics(B, METRICS)
    store.record_scrape_error(B, "x", 1)
    store.request_started(B)
    store.request_finished(B)
    assert store.get(B) is None
    assert [s.address for s in store.endpoints()] == [A]


@pytest.mark.parametrize(
    ("ops", "inflight", "dispatched"),
    [
        ("s", 1, 1),
        ("sss", 3, 3),
        ("ssf", 1, 2),
        ("sf", 0, 1),
        ("f", 0, 0),
        ("ffs", 1, 1),
        ("sfff", 0, 1),
        ("sfsf", 0, 2),
    ],
    ids=["one", "three", "two-one", "balanced", "finish-only", "finish-first", "over-finish", "twice-balanced"],
)
def test_request_accounting_never_negative(ops: str, inflight: int, dispatched: int) -> None:
    store = EndpointStore()
    store.set_endpoints([ep(A)])
    state = store.get(A)
    assert state is not None
    for op in ops:
        (store.request_started if op == "s" else store.request_finished)(A)
        assert state.inflight >= 0
    assert (state.inflight, state.dispatched_since_scrape) == (inflight, dispatched)


def test_on_change_listeners_run_after_every_pool_change() -> None:
    store = EndpointStore()
    seen: list[list[str]] = []
    other: list[int] = []
    store.on_change(lambda: seen.append([s.address for s in store.endpoints()]))
    store.on_change(lambda: other.append(len(store.endpoints())))
    store.set_endpoints([ep(A)])
    store.set_endpoints([ep(A), ep(B)])
    store.set_endpoints([])
    assert seen == [[A], [A, B], []]
    assert other == [1, 2, 0]


def test_metric_and_accounting_updates_do_not_notify() -> None:
    store = EndpointStore()
    store.set_endpoints([ep(A)])
    calls: list[None] = []
    store.on_change(lambda: calls.append(None))
    store.update_metrics(A, METRICS)
    store.request_started(A)
    store.request_finished(A)
    store.record_scrape_error(A, "x", 1)
    assert calls == []


@pytest.mark.parametrize(
    ("scraped_at", "now", "age"),
    [(0.0, 100.0, float("inf")), (10.0, 12.5, 2.5), (10.0, 10.0, 0.0)],
    ids=["never-scraped", "aged", "just-now"],
)
def test_state_age(scraped_at: float, now: float, age: float) -> None:
    store = EndpointStore()
    store.set_endpoints([ep(A)])
    store.update_metrics(A, EndpointMetrics(scraped_at=scraped_at))
    state = store.get(A)
    assert state is not None
    assert state.age(now) == age
