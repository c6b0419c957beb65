"""Reflector against the fake API server: list pages, watch events, bookmarks, 410, disconnects, errors."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from conftest import FAST, eventually
from k8s_fakeapi import OBJECTIVES, PODS, FakeKube, objective, pod
from kubernetes_asyncio import client

from igw import aio
from igw.controllers.reflector import Reflector


class Rig:
    def __init__(self, reflector: Reflector) -> None:
        self.reflector = reflector
        self.calls = 0

    def names(self) -> set[str]:
        return {o["metadata"]["name"] for o in self.reflector.objects.values()}


@pytest.fixture
async def pods(kube: FakeKube, api: client.ApiClient) -> AsyncIterator[Rig]:
    core = client.CoreV1Api(api)
    rig: Rig
    reflector = Reflector(
        name="pods",
        list_fn=core.list_namespaced_pod,
        args=("default",),
        kwargs={"label_selector": "app=vllm"},
        on_change=lambda: setattr(rig, "calls", rig.calls + 1),
        settings=FAST,
    )
    rig = Rig(reflector)
    task = aio.spawn(reflector.run(), name="test reflector")
    await eventually(lambda: kube.watch_count(PODS) == 1, what="listed and watching")
    yield rig
    await aio.cancel_and_wait(task)


async def test_list_in_pages_then_watch_changes(kube: FakeKube, api: client.ApiClient) -> None:
    for i in range(5):
        kube.create(PODS, pod(f"p{i}", f"10.0.0.{i}"))
    kube.create(PODS, pod("other", "10.0.1.1", labels={"app": "other"}))
    core = client.CoreV1Api(api)
    calls: list[int] = []
    reflector = Reflector(
        name="pods", list_fn=core.list_namespaced_pod, args=("default",), kwargs={"label_selector": "app=vllm"},
        on_change=lambda: calls.append(len(reflector.objects)), settings=FAST,
    )  # fmt: skip
    task = aio.spawn(reflector.run(), name="test reflector")
    try:
        await asyncio.wait_for(reflector.wait_synced(), 2)
        assert calls == [5]  # one notification for the whole list
        assert [q.get("continue") for q in kube.queries("list", PODS)] == [None, "1006:2", "1006:4"]
        await eventually(lambda: kube.watch_count(PODS) == 1, what="a watch")
        (watch_query,) = kube.queries("watch", PODS)
        assert watch_query["resourceVersion"] == "1006"
        assert watch_query["allowWatchBookmarks"].lower() == "true"
        assert watch_query["labelSelector"] == "app=vllm"
        assert int(watch_query["timeoutSeconds"]) >= 30

        kube.create(PODS, pod("p9", "10.0.0.9"))
        kube.patch(PODS, "p0", lambda o: o["status"].update(podIP="10.0.0.100"))
        kube.delete(PODS, "p1")
        await eventually(lambda: len(calls) == 4, what="three events")
        assert {o["metadata"]["name"] for o in reflector.objects.values()} == {"p0", "p2", "p3", "p4", "p9"}
        assert reflector.objects["default/p0"]["status"]["podIP"] == "10.0.0.100"
        assert reflector.resource_version == str(kube.rv)
        # a label change out of the selector arrives as a DELETED event
        kube.patch(PODS, "p2", lambda o: o["metadata"]["labels"].update(app="moved"))
        await eventually(lambda: "default/p2" not in reflector.objects, what="p2 leaving the selector")
        assert reflector.stats["lists"] == 1
    finally:
        await aio.cancel_and_wait(task)


async def test_bookmarks_move_the_version_used_by_the_next_watch(kube: FakeKube, pods: Rig) -> None:
    await eventually(lambda: kube.watch_count(PODS) == 1, what="a watch")
    kube.advance(50)  # other resources changed meanwhile
    rv = kube.bookmark()
    await eventually(lambda: pods.reflector.stats["bookmarks"] == 1, what="the bookmark")
    assert pods.reflector.resource_version == str(rv)
    assert pods.calls == 1  # a bookmark is not a change
    kube.compact()  # versions before the bookmark are gone now
    kube.drop_watches()  # a clean end of the stream (server-side timeout)
    await eventually(lambda: len(kube.queries("watch", PODS)) == 2 and kube.watch_count(PODS) == 1, what="a re-watch")
    assert kube.queries("watch", PODS)[-1]["resourceVersion"] == str(rv)
    assert pods.reflector.stats["lists"] == 1  # resumed without a re-list thanks to the bookmark
    assert pods.reflector.stats["gone"] == 0


async def test_410_error_event_relists(kube: FakeKube, pods: Rig) -> None:
    kube.create(PODS, pod("a", "10.0.0.1"))
    await eventually(lambda: pods.names() == {"a"}, what="pod a")
    kube.expire_watches()  # ERROR event with a 410 Status on the open watch
    kube.create(PODS, pod("b", "10.0.0.2"))
    await eventually(lambda: pods.reflector.stats["lists"] == 2, what="a re-list")
    await eventually(lambda: pods.names() == {"a", "b"}, what="pod b after the re-list")
    assert pods.reflector.stats["gone"] == 1
    assert pods.reflector.stats["errors"] == 0


async def test_watch_from_a_compacted_version_gets_410_and_relists(kube: FakeKube, pods: Rig) -> None:
    await eventually(lambda: kube.watch_count(PODS) == 1, what="a watch")
    kube.drop_watches(abrupt=True)  # connection lost...
    kube.create(PODS, pod("late", "10.0.0.7"))
    kube.compact()  # ...and the history is gone before the client is back
    await eventually(lambda: pods.reflector.stats["gone"] == 1, what="410 on re-watch")
    await eventually(lambda: pods.names() == {"late"}, what="the re-list")
    assert pods.reflector.stats["lists"] == 2


async def test_abrupt_disconnect_resumes_from_the_last_event(kube: FakeKube, pods: Rig) -> None:
    kube.create(PODS, pod("a", "10.0.0.1"))
    await eventually(lambda: pods.names() == {"a"}, what="pod a")
    seen = pods.reflector.resource_version
    kube.drop_watches(abrupt=True)
    kube.create(PODS, pod("b", "10.0.0.2"))  # happens while disconnected: replayed on re-watch
    await eventually(lambda: pods.names() == {"a", "b"}, what="pod b replayed")
    assert kube.queries("watch", PODS)[-1]["resourceVersion"] == seen
    assert pods.reflector.stats["lists"] == 1
    assert pods.reflector.stats["errors"] == 1


async def test_a_too_old_continue_token_fails_the_list_then_a_fresh_list_succeeds(
    kube: FakeKube, api: client.ApiClient
) -> None:
    for i in range(3):
        kube.create(PODS, pod(f"p{i}", f"10.0.0.{i}"))
    core = client.CoreV1Api(api)
    original = core.list_namespaced_pod
    compacted = False

    async def list_and_compact(*args: object, **kwargs: object) -> object:
        nonlocal compacted
        response = await original(*args, **kwargs)
        if not compacted and not kwargs.get("watch"):
            compacted = True
            kube.create(PODS, pod("p9", "10.0.0.9"))
            kube.compact()  # the first page's version expires before the second page is asked for
        return response

    reflector = Reflector(
        name="pods", list_fn=list_and_compact, args=("default",), on_change=lambda: None, settings=FAST
    )
    task = aio.spawn(reflector.run(), name="test reflector")
    try:
        await asyncio.wait_for(reflector.wait_synced(), 2)
        statuses = [q.get("continue") for q in kube.queries("list", PODS)]
        assert statuses[:2] == [None, "1003:2"]  # the second page got HTTP 410
        assert len(reflector.objects) == 4
        assert reflector.stats["errors"] == 1
    finally:
        await aio.cancel_and_wait(task)


async def test_errors_back_off_and_recover(kube: FakeKube, pods: Rig) -> None:
    await eventually(lambda: pods.reflector.synced, what="the first list")
    kube.fail("list", PODS, 500, times=3)
    kube.fail("watch", PODS, 503, times=2)
    kube.expire_watches()  # force a re-list into the failures
    await eventually(lambda: pods.reflector.stats["lists"] == 5, timeout=3, what="three failed lists and a good one")
    kube.create(PODS, pod("a", "10.0.0.1"))
    await eventually(lambda: pods.names() == {"a"}, timeout=3, what="watching again")
    assert pods.reflector.stats["errors"] >= 3


async def test_disconnects_without_events_do_not_spin(kube: FakeKube, pods: Rig) -> None:
    await eventually(lambda: kube.watch_count(PODS) == 1, what="a watch")
    for _ in range(5):
        kube.drop_watches()
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.1)
    assert len(kube.queries("watch", PODS)) < 12


async def test_optional_resource_not_installed(kube: FakeKube, api: client.ApiClient) -> None:
    kube.uninstall(OBJECTIVES)
    custom = client.CustomObjectsApi(api)
    calls: list[int] = []
    reflector = Reflector(
        name="objectives", list_fn=custom.list_namespaced_custom_object,
        args=(OBJECTIVES.group, OBJECTIVES.version, "default", OBJECTIVES.plural),
        on_change=lambda: calls.append(len(reflector.objects)), settings=FAST, optional=True,
    )  # fmt: skip
    task = aio.spawn(reflector.run(), name="test reflector")
    try:
        await asyncio.wait_for(reflector.wait_synced(), 2)
        assert reflector.objects == {}
        assert reflector.installed is False
        assert calls == [0]
        kube.installed.add(OBJECTIVES)  # the CRD gets installed
        kube.create(OBJECTIVES, objective("chat", 3))
        await eventually(lambda: "default/chat" in reflector.objects, what="the objective")
        assert reflector.installed is True
    finally:
        await aio.cancel_and_wait(task)


async def test_a_failing_handler_does_not_stop_the_watch(kube: FakeKube, api: client.ApiClient) -> None:
    core = client.CoreV1Api(api)
    calls: list[str] = []

    def handler() -> None:
        calls.append("x")
        raise RuntimeError("bug")

    reflector = Reflector(
        name="pods", list_fn=core.list_namespaced_pod, args=("default",), on_change=handler, settings=FAST
    )
    task = aio.spawn(reflector.run(), name="test reflector")
    try:
        await asyncio.wait_for(reflector.wait_synced(), 2)
        await eventually(lambda: kube.watch_count(PODS) == 1, what="a watch")
        kube.create(PODS, pod("a", "10.0.0.1"))
        await eventually(lambda: len(calls) == 2, what="the event")
        assert reflector.stats["errors"] == 0
    finally:
        await aio.cancel_and_wait(task)
