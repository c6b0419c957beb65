"""InferencePool (or the selector flags) and its Pods -> the endpoint store.

Two controllers share :class:`EndpointSync`, which watches the Pods that match a pool's selector
(server-side ``labelSelector``) and writes the *whole* endpoint list into the store after every
change (level-triggered; nothing is written when the list did not change):

* :class:`PoolController` (``--pool-name``): watches the one InferencePool (``fieldSelector``
  on its name). A new selector restarts the Pod watch (the old endpoints stay until the new
  watch has listed, so a selector edit does not blink the pool empty); new target ports only
  recompute. A pool that is deleted, missing or invalid empties the store and the controller
  stops being synced (the EPP is then not ready, as the reference).
* :class:`SelectorController` (``--endpoint-selector``/``--endpoint-target-ports``, no CRDs):
  the same Pod watch over a fixed pool.

The EPP never writes the pool's status: gateways own it (see ``docs/kubernetes.md``).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from kubernetes_asyncio import client

from igw import aio
from igw.api.types import Endpoint
from igw.controllers.reflector import Reflector, WatchSettings
from igw.controllers.resources import POOL_GROUP, X_GROUP, InvalidObject, PoolInfo, parse_pool, pod_endpoints
from igw.datalayer.store import EndpointStore

log = logging.getLogger("igw.controllers")

POOL_VERSIONS = {POOL_GROUP: "v1", X_GROUP: "v1alpha2"}
"""The InferencePool version igw reads in each group (``--pool-group``)."""


class EndpointSync:
    """The Pods of one pool -> ``EndpointStore.set_endpoints`` (the full list, on every change)."""

    def __init__(
        self,
        api: client.ApiClient,
        store: EndpointStore,
        *,
        settings: WatchSettings | None = None,
        on_state: Callable[[], None] = lambda: None,
    ) -> None:
        self._core = client.CoreV1Api(api)
        self._store = store
        self._settings = settings or WatchSettings()
        self._on_state = on_state
        self.pool: PoolInfo | None = None
        self.reflector: Reflector | None = None
        self._task: asyncio.Task[None] | None = None
        self._written: tuple[Endpoint, ...] | None = None
        self._reported: Reflector | None = None
        """The watch whose first complete list was last reported through ``on_state``."""

    @property
    def synced(self) -> bool:
        """A pool is set and the store holds its endpoints: listed by the current watch, or kept
        from the previous one while a new selector's watch lists (readiness does not blink)."""
        if self.pool is None:
            return False
        return (self.reflector is not None and self.reflector.synced) or self._written is not None

    def set_pool(self, pool: PoolInfo | None) -> None:
        if pool == self.pool:
            return
        old, self.pool = self.pool, pool
        if pool is None or old is None or (pool.namespace, pool.selector) != (old.namespace, old.selector):
            self._restart_watch()
        self._recompute()
        self._on_state()

    async def close(self) -> None:
        if self._task is not None:
            await aio.cancel_and_wait(self._task)
            self._task = None
        self.reflector = None

    def _restart_watch(self) -> None:
        if self._task is not None:
            self._task.cancel()  # it ends at its next await; its late notifications are ignored
            self._task = None
        self.reflector = None
        pool = self.pool
        if pool is None:
            return
        reflector = Reflector(
            name=f"pods {pool.namespace}/{pool.label_selector()}",
            list_fn=self._core.list_namespaced_pod,
            args=(pool.namespace,),
            kwargs={"label_selector": pool.label_selector()},
            on_change=lambda: self._on_pods(reflector),
            settings=self._settings,
        )
        self.reflector = reflector
        self._task = aio.spawn(reflector.run(), name=f"igw.controllers {reflector.name}")

    def _on_pods(self, reflector: Reflector) -> None:
        if reflector is not self.reflector:
            return  # a watch that was replaced
        self._recompute()
        if reflector.synced and self._reported is not reflector:  # this watch's first full list
            self._reported = reflector
            self._on_state()

    def _recompute(self) -> None:
        if self.pool is None:
            endpoints: tuple[Endpoint, ...] = ()
        elif self.reflector is None or not self.reflector.synced:
            return  # keep what the store has until the new watch has listed
        else:
            endpoints = tuple(pod_endpoints(self.reflector.objects.values(), self.pool))
        if endpoints == self._written:
            return
        before = {e.address for e in self._written or ()}
        after = {e.address for e in endpoints}
        self._written = endpoints if self.pool is not None else None
        self._store.set_endpoints(endpoints)
        log.info(
            "pool %s: %d endpoint(s)%s%s",
            self._store.pool_name,
            len(endpoints),
            f", added {', '.join(sorted(after - before))}" if after - before else "",
            f", removed {', '.join(sorted(before - after))}" if before - after else "",
        )


class SelectorController:
    """Standalone mode without CRDs: the Pods matching fixed labels, on fixed target ports."""

    def __init__(
        self,
        api: client.ApiClient,
        store: EndpointStore,
        pool: PoolInfo,
        *,
        settings: WatchSettings | None = None,
        on_state: Callable[[], None] = lambda: None,
    ) -> None:
        self.pool = pool
        self.endpoints = EndpointSync(api, store, settings=settings, on_state=on_state)

    @property
    def synced(self) -> bool:
        return self.endpoints.synced

    async def run(self) -> None:
        try:
            self.endpoints.set_pool(self.pool)
            await asyncio.Event().wait()  # the Pod watch runs in its own task
        finally:
            await self.endpoints.close()


class PoolController:
    """One InferencePool by name, and its Pods."""

    def __init__(
        self,
        api: client.ApiClient,
        store: EndpointStore,
        *,
        name: str,
        namespace: str,
        group: str = POOL_GROUP,
        settings: WatchSettings | None = None,
        on_state: Callable[[], None] = lambda: None,
    ) -> None:
        if group not in POOL_VERSIONS:
            raise ValueError(f"InferencePool group {group!r} is not one of {', '.join(POOL_VERSIONS)}")
        self.name, self.namespace, self.group = name, namespace, group
        self._on_state = on_state
        self.endpoints = EndpointSync(api, store, settings=settings, on_state=on_state)
        self.present = False
        """The pool exists and is valid."""
        custom = client.CustomObjectsApi(api)
        self.reflector = Reflector(
            name=f"InferencePool {namespace}/{name}",
            list_fn=custom.list_namespaced_custom_object,
            args=(group, POOL_VERSIONS[group], namespace, "inferencepools"),
            kwargs={"field_selector": f"metadata.name={name}"},
            on_change=self._on_pool,
            settings=settings,
        )

    @property
    def synced(self) -> bool:
        return self.reflector.synced and self.present and self.endpoints.synced

    async def run(self) -> None:
        try:
            await self.reflector.run()
        finally:
            await self.endpoints.close()

    def _on_pool(self) -> None:
        obj = self.reflector.objects.get(f"{self.namespace}/{self.name}")
        info: PoolInfo | None = None
        if obj is None:
            if self.present or not self.endpoints.pool:
                log.warning("InferencePool %s/%s not found: the pool is empty", self.namespace, self.name)
        else:
            try:
                info = parse_pool(obj)
            except InvalidObject as exc:
                log.error("%s: the pool is empty", exc)
        if info is not None and info != self.endpoints.pool:
            log.info(
                "InferencePool %s/%s: selector %s, target ports %s",
                self.namespace, self.name, info.label_selector(), ",".join(map(str, info.target_ports)),
            )  # fmt: skip
        changed = self.present != (info is not None)
        self.present = info is not None
        self.endpoints.set_pool(info)
        if changed:
            self._on_state()
