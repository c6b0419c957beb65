"""Lease leader election against the fake API server (sub-second periods)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
from conftest import eventually
from k8s_fakeapi import LEASES, FakeKube
from kubernetes_asyncio import client
from kubernetes_asyncio.client.exceptions import ApiException

from igw import aio
from igw.controllers.leader import LeaderElector, LeaseSettings


def settings(identity: str, *, release: bool = True) -> LeaseSettings:
    return LeaseSettings(
        name="igw-epp-pool", namespace="default", identity=identity,
        lease_duration_s=1.0, renew_deadline_s=0.5, retry_period_s=0.05, release_on_cancel=release,
    )  # fmt: skip


def lease_holder(kube: FakeKube) -> str | None:
    lease = kube.get(LEASES, "igw-epp-pool")
    return (lease or {}).get("spec", {}).get("holderIdentity") or None


async def test_a_single_candidate_creates_and_renews_the_lease(kube: FakeKube, api: client.ApiClient) -> None:
    changes: list[bool] = []
    elector = LeaderElector(api, settings("a"), on_change=changes.append)
    task = aio.spawn(elector.run(), name="elector a")
    try:
        await eventually(lambda: elector.is_leader, what="leadership")
        lease = kube.get(LEASES, "igw-epp-pool")
        assert lease is not None
        assert lease["spec"]["holderIdentity"] == "a"
        assert lease["spec"]["leaseDurationSeconds"] == 1
        first = lease["spec"]["renewTime"]
        await eventually(lambda: kube.get(LEASES, "igw-epp-pool")["spec"]["renewTime"] != first, what="a renewal")  # type: ignore[index]
    finally:
        await aio.cancel_and_wait(task)
    assert changes == [True, False]
    assert lease_holder(kube) is None  # released on cancel


async def test_one_leader_among_two_and_a_fast_handover_on_release(kube: FakeKube, api: client.ApiClient) -> None:
    a, b = LeaderElector(api, settings("a")), LeaderElector(api, settings("b"))
    ta, tb = aio.spawn(a.run(), name="elector a"), aio.spawn(b.run(), name="elector b")
    try:
        await eventually(lambda: a.is_leader or b.is_leader, what="a leader")
        await asyncio.sleep(0.3)  # several rounds: still exactly one
        assert a.is_leader != b.is_leader
        leader, follower, leader_task = (a, b, ta) if a.is_leader else (b, a, tb)
        assert lease_holder(kube) == leader.settings.identity
        started = time.monotonic()
        await aio.cancel_and_wait(leader_task)  # graceful shutdown releases the Lease
        await eventually(lambda: follower.is_leader, what="the follower taking over")
        assert time.monotonic() - started < 0.5  # well before a lease duration
        assert lease_holder(kube) == follower.settings.identity
        assert kube.get(LEASES, "igw-epp-pool")["spec"]["leaseTransitions"] == 0  # type: ignore[index]
    finally:
        await aio.cancel_and_wait(ta, tb)


async def test_a_crashed_leader_is_replaced_after_the_lease_duration(kube: FakeKube, api: client.ApiClient) -> None:
    a = LeaderElector(api, settings("a", release=False))
    ta = aio.spawn(a.run(), name="elector a")
    await eventually(lambda: a.is_leader, what="a leading")
    await aio.cancel_and_wait(ta)  # no release: as if the pod died
    assert lease_holder(kube) == "a"
    b = LeaderElector(api, settings("b"))
    tb = aio.spawn(b.run(), name="elector b")
    try:
        started = time.monotonic()
        await asyncio.sleep(0.5)
        assert not b.is_leader  # the lease has not expired yet (as observed by b)
        await eventually(lambda: b.is_leader, timeout=2, what="b taking over")
        assert time.monotonic() - started >= 0.95
        assert kube.get(LEASES, "igw-epp-pool")["spec"]["leaseTransitions"] == 1  # type: ignore[index]
    finally:
        await aio.cancel_and_wait(tb)


async def test_a_leader_that_cannot_renew_steps_down(kube: FakeKube, api: client.ApiClient) -> None:
    changes: list[bool] = []
    a = LeaderElector(api, settings("a"), on_change=changes.append)
    ta = aio.spawn(a.run(), name="elector a")
    try:
        await eventually(lambda: a.is_leader, what="a leading")
        kube.fail("update", LEASES, 500, times=1000)
        started = time.monotonic()
        await eventually(lambda: not a.is_leader, timeout=2, what="stepping down")
        assert 0.4 <= time.monotonic() - started < 1.0  # about the renew deadline, before the lease expires
        assert changes == [True, False]
        kube._failures.clear()
        await eventually(lambda: a.is_leader, timeout=2, what="leading again once the API answers")
    finally:
        await aio.cancel_and_wait(ta)


def test_settings_are_checked() -> None:
    with pytest.raises(ValueError, match="longer than the renew deadline"):
        LeaseSettings(name="l", namespace="n", identity="i", lease_duration_s=5, renew_deadline_s=5)
    with pytest.raises(ValueError, match="retry period"):
        LeaseSettings(name="l", namespace="n", identity="i", renew_deadline_s=2, retry_period_s=2)
    with pytest.raises(ValueError, match="identity"):
        LeaseSettings(name="l", namespace="n", identity="")


class _SlowLeaseApi:
    """A Lease API whose writes start failing, then hang until the client's timeout."""

    def __init__(self) -> None:
        self.lease: dict[str, Any] | None = None
        self.mode = "ok"
        self.last_write = 0.0

    async def read_namespaced_lease(self, name: str, ns: str, _request_timeout: float = 0) -> Any:
        if self.mode == "slow":
            await asyncio.sleep(_request_timeout * 0.95)
        if self.lease is None:
            raise ApiException(status=404)
        return client.V1Lease(metadata=client.V1ObjectMeta(name=name, resource_version="1"),
                              spec=client.V1LeaseSpec(**self.lease))  # fmt: skip

    async def create_namespaced_lease(self, ns: str, body: Any, _request_timeout: float = 0) -> None:
        self._write(body)

    async def replace_namespaced_lease(self, name: str, ns: str, body: Any, _request_timeout: float = 0) -> None:
        if self.mode == "slow":
            await asyncio.sleep(_request_timeout)
        if self.mode != "ok":
            raise ApiException(status=500)
        self._write(body)

    def _write(self, body: Any) -> None:
        spec = body.spec
        self.lease = {"holder_identity": spec.holder_identity, "lease_duration_seconds": spec.lease_duration_seconds,
                      "renew_time": spec.renew_time}  # fmt: skip
        self.last_write = time.monotonic()


async def test_a_leader_steps_down_within_its_renew_deadline_even_when_calls_are_slow() -> None:
    api = _SlowLeaseApi()
    settings = LeaseSettings(name="l", namespace="d", identity="a", lease_duration_s=2.0, renew_deadline_s=1.0,
                             retry_period_s=0.2, request_timeout_s=0.5)  # fmt: skip
    async with client.ApiClient() as api_client:
        elector = LeaderElector(api_client, settings)
        elector._api = api  # type: ignore[assignment]
        task = asyncio.ensure_future(elector.run())
        try:
            await eventually(lambda: elector.is_leader, what="leadership")
            await asyncio.sleep(0.3)
            api.mode = "fail"
            await asyncio.sleep(max(0.0, 0.9 - (time.monotonic() - api.last_write)))
            api.mode = "slow"  # the next attempt would take ~0.95 s: longer than what is left
            await eventually(lambda: not elector.is_leader, what="stepping down")
            stepped_down_after = time.monotonic() - api.last_write
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
    assert stepped_down_after < settings.renew_deadline_s + 0.15 < settings.lease_duration_s
