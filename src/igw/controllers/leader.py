"""Leader election on a ``coordination.k8s.io/v1`` Lease (active-passive replicas).

The algorithm is client-go's ``leaderelection``: every ``retry_period`` a candidate reads the
Lease; it takes it when it is free (no holder) or when the holder has not renewed it for
``leaseDurationSeconds`` *as observed locally* (no clock comparison between machines); the
leader renews it; a leader that has not managed to renew for ``renew_deadline`` steps down
(before anyone else may take over, since ``renew_deadline < lease_duration``). Every write is a
replace carrying the ``resourceVersion`` read, so two candidates racing for one Lease cannot
both win: the second gets 409 Conflict. On shutdown the leader releases the Lease (holder
emptied), so a follower takes over at its next retry instead of after a lease duration
(controller-runtime's ``LeaderElectionReleaseOnCancel``, which the reference EPP sets).

kubernetes-asyncio ships a ``leaderelection`` package; it is not used because it does not
release on cancel, requires periods of at least one second (the tests run sub-second periods),
writes local time with a ``Z`` suffix, and starts the leader's work itself with a bare
``asyncio.create_task``. Here the leader's work is not started: the EPP keeps syncing either
way and only its readiness follows :attr:`LeaderElector.is_leader` (``on_change``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from kubernetes_asyncio import client
from kubernetes_asyncio.client.exceptions import ApiException

log = logging.getLogger("igw.controllers")

JITTER = 1.2


@dataclass(frozen=True, slots=True)
class LeaseSettings:
    name: str
    namespace: str
    identity: str
    """This replica's name in ``holderIdentity`` (the pod name, unique per replica)."""
    lease_duration_s: float = 15.0
    """How long followers wait after the last renewal they saw before taking over."""
    renew_deadline_s: float = 10.0
    """How long a leader keeps trying to renew before it steps down."""
    retry_period_s: float = 2.0
    """Time between two attempts (followers add up to 20% jitter)."""
    release_on_cancel: bool = True
    request_timeout_s: float = 5.0

    def __post_init__(self) -> None:
        if not self.name or not self.namespace or not self.identity:
            raise ValueError("leader election needs a lease name, a namespace and an identity")
        if self.lease_duration_s <= self.renew_deadline_s:
            raise ValueError("the lease duration must be longer than the renew deadline")
        if self.renew_deadline_s <= JITTER * self.retry_period_s:
            raise ValueError(f"the renew deadline must be longer than {JITTER} x the retry period")
        if self.retry_period_s <= 0:
            raise ValueError("the retry period must be positive")


class LeaderElector:
    """Campaigns for a Lease until cancelled; ``is_leader`` tells the current state."""

    def __init__(
        self,
        api: client.ApiClient,
        settings: LeaseSettings,
        *,
        on_change: Callable[[bool], None] = lambda leader: None,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
    ) -> None:
        self._api = client.CoordinationV1Api(api)
        self.settings = settings
        self._on_change = on_change
        self._clock = clock
        self._rng = rng or random.Random()
        self.is_leader = False
        self.observed_holder: str | None = None
        self._observed: tuple[Any, ...] | None = None
        self._observed_at = 0.0
        self._renewed_at = 0.0
        self.transitions = 0
        """Times this replica became leader."""

    async def run(self) -> None:
        s = self.settings
        log.info("leader election: %s campaigning for Lease %s/%s", s.identity, s.namespace, s.name)
        try:
            while True:
                started = self._clock()
                # A leader's attempt may not outlive its renew deadline: it must step down in time,
                # before a follower (which waits the longer lease duration) can take over.
                budget = self._renewed_at + s.renew_deadline_s - started if self.is_leader else None
                try:
                    if budget is not None and budget <= 0:
                        ok = False
                    else:
                        async with asyncio.timeout(budget):
                            ok = await self._try_acquire_or_renew()
                except Exception as exc:  # transport errors, timeouts: this attempt failed
                    log.warning("leader election: Lease %s/%s: %s: %s", s.namespace, s.name, type(exc).__name__, exc)
                    ok = False
                if ok:
                    self._renewed_at = started  # the write happened after this: a conservative stamp
                    self._set_leader(True)
                elif self.is_leader and self._clock() - self._renewed_at >= s.renew_deadline_s:
                    log.warning(
                        "leader election: %s could not renew Lease %s within %.1fs",
                        s.identity,
                        s.name,
                        s.renew_deadline_s,
                    )
                    self._set_leader(False)
                period = s.retry_period_s if self.is_leader else s.retry_period_s * self._rng.uniform(1.0, JITTER)
                await asyncio.sleep(period)
        finally:
            if self.is_leader and s.release_on_cancel:
                with contextlib.suppress(Exception, asyncio.CancelledError):
                    await asyncio.shield(self._release())
            self._set_leader(False)

    def _set_leader(self, leader: bool) -> None:
        if leader == self.is_leader:
            return
        self.is_leader = leader
        if leader:
            self.transitions += 1
            log.info(
                "leader election: %s is the leader of %s/%s",
                self.settings.identity,
                self.settings.namespace,
                self.settings.name,
            )
        else:
            log.info("leader election: %s is no longer the leader", self.settings.identity)
        self._on_change(leader)

    async def _try_acquire_or_renew(self) -> bool:
        s = self.settings
        now = datetime.now(UTC)
        try:
            lease = await self._api.read_namespaced_lease(s.name, s.namespace, _request_timeout=s.request_timeout_s)
        except ApiException as exc:
            if exc.status != 404:
                log.warning(
                    "leader election: reading Lease %s/%s failed: %s %s", s.namespace, s.name, exc.status, exc.reason
                )
                return False
            return await self._create(now)
        spec = lease.spec or client.V1LeaseSpec()
        holder = spec.holder_identity or ""
        record = (holder, spec.renew_time, spec.acquire_time, spec.lease_transitions, spec.lease_duration_seconds)
        if record != self._observed:
            self._observed, self._observed_at = record, self._clock()
            if holder != self.observed_holder:
                self.observed_holder = holder or None
                log.debug("leader election: Lease %s/%s is held by %r", s.namespace, s.name, holder)
        if holder and holder != s.identity:
            duration = spec.lease_duration_seconds or s.lease_duration_s
            if self._observed_at + duration > self._clock():
                return False  # held, and renewed recently enough as far as we have seen
        if holder == s.identity:
            spec.renew_time = now
        else:
            spec.holder_identity = s.identity
            spec.acquire_time = now
            spec.renew_time = now
            spec.lease_transitions = (spec.lease_transitions or 0) + (1 if holder else 0)
        spec.lease_duration_seconds = self._duration_seconds()
        lease.spec = spec
        try:
            await self._api.replace_namespaced_lease(s.name, s.namespace, lease, _request_timeout=s.request_timeout_s)
        except ApiException as exc:
            level = logging.DEBUG if exc.status == 409 else logging.WARNING
            log.log(
                level,
                "leader election: updating Lease %s/%s failed: %s %s",
                s.namespace,
                s.name,
                exc.status,
                exc.reason,
            )
            return False
        return True

    async def _create(self, now: datetime) -> bool:
        s = self.settings
        body = client.V1Lease(
            metadata=client.V1ObjectMeta(name=s.name, namespace=s.namespace),
            spec=client.V1LeaseSpec(
                holder_identity=s.identity,
                lease_duration_seconds=self._duration_seconds(),
                acquire_time=now,
                renew_time=now,
                lease_transitions=0,
            ),
        )
        try:
            await self._api.create_namespaced_lease(s.namespace, body, _request_timeout=s.request_timeout_s)
        except ApiException as exc:
            level = logging.DEBUG if exc.status == 409 else logging.WARNING
            log.log(
                level,
                "leader election: creating Lease %s/%s failed: %s %s",
                s.namespace,
                s.name,
                exc.status,
                exc.reason,
            )
            return False
        return True

    async def _release(self) -> None:
        """Empty the holder so a follower takes over at once."""
        s = self.settings
        lease = await self._api.read_namespaced_lease(s.name, s.namespace, _request_timeout=s.request_timeout_s)
        spec = lease.spec or client.V1LeaseSpec()
        if spec.holder_identity != s.identity:
            return
        now = datetime.now(UTC)
        spec.holder_identity = ""
        spec.lease_duration_seconds = 1
        spec.renew_time = now
        spec.acquire_time = now
        lease.spec = spec
        await self._api.replace_namespaced_lease(s.name, s.namespace, lease, _request_timeout=s.request_timeout_s)
        log.info("leader election: %s released Lease %s/%s", s.identity, s.namespace, s.name)

    def _duration_seconds(self) -> int:
        return max(1, math.ceil(self.settings.lease_duration_s))
