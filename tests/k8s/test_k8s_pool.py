"""PoolController and SelectorController: pool and pod add/update/delete, readiness flaps, selector edits."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from conftest import FAST, eventually
from k8s_fakeapi import PODS, POOLS, POOLS_V1ALPHA2, FakeKube, pod, pool
from kubernetes_asyncio import client

from igw import aio
from igw.controllers.pool import PoolController, SelectorController
from igw.controllers.resources import PoolInfo
from igw.datalayer.store import EndpointStore


def addresses(store: EndpointStore) -> list[str]:
    return [s.address for s in store.endpoints()]


class Rig:
    def __init__(self, controller: PoolController, store: EndpointStore) -> None:
        self.controller = controller
        self.store = store
        self.writes: list[list[str]] = []
        self.states = 0
        store.on_change(lambda: self.writes.append(addresses(store)))


@pytest.fixture
async def rig(kube: FakeKube, api: client.ApiClient) -> AsyncIterator[Rig]:
    store = EndpointStore(pool_name="pool")
    holder: list[Rig] = []
    controller = PoolController(
        api, store, name="pool", namespace="default", settings=FAST,
        on_state=lambda: setattr(holder[0], "states", holder[0].states + 1),
    )  # fmt: skip
    holder.append(Rig(controller, store))
    task = aio.spawn(controller.run(), name="test pool controller")
    yield holder[0]
    await aio.cancel_and_wait(task)


async def test_pool_then_pods(kube: FakeKube, rig: Rig) -> None:
    await eventually(lambda: rig.controller.reflector.synced, what="the pool list")
    assert not rig.controller.synced  # no pool yet: not ready
    kube.create(PODS, pod("a", "10.0.0.1"))
    kube.create(PODS, pod("other", "10.0.0.9", labels={"app": "else"}))
    kube.create(POOLS, pool("pool", ports=[8000, 8001]))
    await eventually(lambda: rig.controller.synced, what="pool and pods synced")
    assert addresses(rig.store) == ["10.0.0.1:8000", "10.0.0.1:8001"]
    (watch_query,) = kube.queries("watch", POOLS)[-1:]
    assert watch_query["fieldSelector"] == "metadata.name=pool"
    assert kube.queries("list", PODS)[-1]["labelSelector"] == "app=vllm"


async def test_pod_add_update_delete_and_readiness_flaps(kube: FakeKube, rig: Rig) -> None:
    kube.create(POOLS, pool("pool"))
    kube.create(PODS, pod("a", "10.0.0.1"))
    await eventually(lambda: addresses(rig.store) == ["10.0.0.1:8000"], what="pod a")
    await eventually(lambda: kube.watch_count(PODS) == 1, what="the pod watch")

    kube.create(PODS, pod("b", "10.0.0.2", ready=False))  # not ready yet: not an endpoint
    kube.create(PODS, pod("c", "10.0.0.3"))
    await eventually(lambda: addresses(rig.store) == ["10.0.0.1:8000", "10.0.0.3:8000"], what="pod c")

    def set_ready(ready: bool) -> Callable[[dict[str, Any]], None]:
        return lambda o: o["status"]["conditions"][1].update(status="True" if ready else "False")

    kube.patch(PODS, "b", set_ready(True))
    await eventually(lambda: "10.0.0.2:8000" in addresses(rig.store), what="b ready")
    for _ in range(3):  # flaps
        kube.patch(PODS, "a", set_ready(False))
        await eventually(lambda: "10.0.0.1:8000" not in addresses(rig.store), what="a not ready")
        kube.patch(PODS, "a", set_ready(True))
        await eventually(lambda: "10.0.0.1:8000" in addresses(rig.store), what="a ready again")

    kube.patch(PODS, "c", lambda o: o["metadata"].update(deletionTimestamp="2026-01-01T00:00:00Z"))
    await eventually(lambda: "10.0.0.3:8000" not in addresses(rig.store), what="c terminating")
    kube.delete(PODS, "c")
    kube.patch(PODS, "b", lambda o: o["status"].update(podIP="10.0.0.22"))  # a new IP (restarted sandbox)
    await eventually(lambda: addresses(rig.store) == ["10.0.0.1:8000", "10.0.0.22:8000"], what="b's new IP")
    # the store is written only when the endpoint list changes
    assert all(a != b for a, b in zip(rig.writes, rig.writes[1:], strict=False))


async def test_metrics_survive_unrelated_pod_changes(kube: FakeKube, rig: Rig) -> None:
    from igw.api.types import EndpointMetrics

    kube.create(POOLS, pool("pool"))
    kube.create(PODS, pod("a", "10.0.0.1"))
    await eventually(lambda: addresses(rig.store) == ["10.0.0.1:8000"], what="pod a")
    rig.store.update_metrics("10.0.0.1:8000", EndpointMetrics(waiting=4, scraped_at=1.0))
    kube.patch(
        PODS, "a", lambda o: o["metadata"]["labels"].update({"inference.networking.k8s.io/engine-type": "sglang"})
    )
    await eventually(
        lambda: ("inference.networking.k8s.io/engine-type", "sglang") in rig.store.endpoints()[0].endpoint.labels,
        what="the label",
    )
    state = rig.store.get("10.0.0.1:8000")
    assert state is not None
    assert state.metrics.waiting == 4


async def test_active_ports_annotation_change(kube: FakeKube, rig: Rig) -> None:
    kube.create(POOLS, pool("pool", ports=[8000, 8001]))
    kube.create(PODS, pod("a", "10.0.0.1"))
    await eventually(lambda: addresses(rig.store) == ["10.0.0.1:8000", "10.0.0.1:8001"], what="both ports")
    kube.patch(
        PODS, "a", lambda o: o["metadata"].update(annotations={"inference.networking.k8s.io/active-ports": "8001"})
    )
    await eventually(lambda: addresses(rig.store) == ["10.0.0.1:8001"], what="only 8001")


async def test_pool_update_selector_and_ports(kube: FakeKube, rig: Rig) -> None:
    kube.create(POOLS, pool("pool"))
    kube.create(PODS, pod("a", "10.0.0.1"))
    kube.create(PODS, pod("b", "10.0.0.2", labels={"app": "sglang"}))
    await eventually(lambda: addresses(rig.store) == ["10.0.0.1:8000"], what="pod a")

    kube.patch(POOLS, "pool", lambda o: o["spec"].update(targetPorts=[{"number": 9000}, {"number": 9001}]))
    await eventually(lambda: addresses(rig.store) == ["10.0.0.1:9000", "10.0.0.1:9001"], what="new ports")
    pod_lists = kube.count("list", PODS)

    kube.patch(POOLS, "pool", lambda o: o["spec"].update(selector={"matchLabels": {"app": "sglang"}}))
    await eventually(lambda: addresses(rig.store) == ["10.0.0.2:9000", "10.0.0.2:9001"], what="the new selector")
    assert kube.count("list", PODS) == pod_lists + 1  # a new pod watch, with the new selector
    assert kube.queries("list", PODS)[-1]["labelSelector"] == "app=sglang"
    # the old endpoints stayed until the new watch had listed: no empty pool in between
    assert [] not in rig.writes
    await eventually(lambda: kube.watch_count(PODS) == 1, what="only the new pod watch")


async def test_pool_deleted_and_recreated(kube: FakeKube, rig: Rig) -> None:
    kube.create(POOLS, pool("pool"))
    kube.create(PODS, pod("a", "10.0.0.1"))
    await eventually(lambda: rig.controller.synced and addresses(rig.store) == ["10.0.0.1:8000"], what="synced")
    kube.delete(POOLS, "pool")
    await eventually(lambda: addresses(rig.store) == [] and not rig.controller.synced, what="pool gone")
    await eventually(lambda: kube.watch_count(PODS) == 0, what="pod watch stopped")
    kube.create(POOLS, pool("pool"))
    await eventually(lambda: rig.controller.synced and addresses(rig.store) == ["10.0.0.1:8000"], what="pool back")


async def test_invalid_pool_empties_the_store(kube: FakeKube, rig: Rig) -> None:
    kube.create(POOLS, pool("pool"))
    kube.create(PODS, pod("a", "10.0.0.1"))
    await eventually(lambda: addresses(rig.store) == ["10.0.0.1:8000"], what="pod a")
    kube.patch(POOLS, "pool", lambda o: o["spec"].update(targetPorts=[]))
    await eventually(lambda: addresses(rig.store) == [] and not rig.controller.synced, what="empty pool")


async def test_other_pools_are_ignored(kube: FakeKube, rig: Rig) -> None:
    kube.create(POOLS, pool("pool"))
    kube.create(POOLS, pool("another", selector={"app": "x"}))
    kube.create(PODS, pod("a", "10.0.0.1"))
    await eventually(lambda: rig.controller.synced, what="synced")
    kube.patch(POOLS, "another", lambda o: o["spec"].update(targetPorts=[{"number": 1}]))
    kube.create(PODS, pod("b", "10.0.0.2"))
    await eventually(lambda: addresses(rig.store) == ["10.0.0.1:8000", "10.0.0.2:8000"], what="pod b")
    assert {o["metadata"]["name"] for o in rig.controller.reflector.objects.values()} == {"pool"}


async def test_resync_after_410_keeps_endpoints(kube: FakeKube, rig: Rig) -> None:
    kube.create(POOLS, pool("pool"))
    kube.create(PODS, pod("a", "10.0.0.1"))
    await eventually(lambda: addresses(rig.store) == ["10.0.0.1:8000"], what="pod a")
    await eventually(lambda: kube.watch_count(PODS) == 1 and kube.watch_count(POOLS) == 1, what="watches")
    writes = len(rig.writes)
    kube.expire_watches()
    kube.create(PODS, pod("b", "10.0.0.2"))
    await eventually(lambda: addresses(rig.store) == ["10.0.0.1:8000", "10.0.0.2:8000"], what="pod b after re-list")
    assert len(rig.writes) == writes + 1  # re-listing an unchanged pool writes nothing


async def test_pre_ga_pool_group(kube: FakeKube, api: client.ApiClient) -> None:
    store = EndpointStore(pool_name="old")
    controller = PoolController(
        api, store, name="old", namespace="default", group="inference.networking.x-k8s.io", settings=FAST
    )
    kube.create(
        POOLS_V1ALPHA2, {"metadata": {"name": "old"}, "spec": {"selector": {"app": "vllm"}, "targetPortNumber": 8080}}
    )
    kube.create(PODS, pod("a", "10.0.0.1"))
    task = aio.spawn(controller.run(), name="test pool controller")
    try:
        await eventually(lambda: addresses(store) == ["10.0.0.1:8080"], what="the v1alpha2 pool")
    finally:
        await aio.cancel_and_wait(task)


async def test_selector_controller_without_crds(kube: FakeKube, api: client.ApiClient) -> None:
    kube.uninstall(POOLS)
    store = EndpointStore(pool_name="standalone")
    info = PoolInfo("standalone", "default", (("app", "vllm"),), (8000, 8002))
    controller = SelectorController(api, store, info, settings=FAST)
    kube.create(PODS, pod("a", "10.0.0.1"))
    task = aio.spawn(controller.run(), name="test selector controller")
    try:
        await eventually(lambda: controller.synced, what="synced")
        assert addresses(store) == ["10.0.0.1:8000", "10.0.0.1:8002"]
        kube.delete(PODS, "a")
        await eventually(lambda: addresses(store) == [], what="pod a gone")
        assert controller.synced  # an empty pool is still a synced one
        assert kube.count("list", POOLS) == 0
    finally:
        await aio.cancel_and_wait(task)
