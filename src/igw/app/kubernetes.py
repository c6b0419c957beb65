"""Kubernetes mode: the Endpoint Picker fed by controllers instead of a pool file.

Two ways to name the pool (as the reference EPP):

* ``--pool-name`` (+ ``--pool-namespace``): watch that InferencePool and its Pods, and the
  InferenceObjectives, InferenceModelRewrites and legacy InferenceModels that reference it.
* ``--endpoint-selector`` + ``--endpoint-target-ports``: no CRDs; the Pods matching the labels
  (no objectives, no rewrites).

Replicas are active-active by default: each one watches and serves on its own. With
``--ha-enable-leader-election`` they are active-passive: all keep syncing, only the Lease
holder reports ready (gRPC health ``readiness`` and the ext_proc service), so the gateway sends
traffic to the leader only. Readiness = the pool synced (pool found, Pods listed) and, with
leader election, leadership; it is re-evaluated after every controller or election change.

Start-up: API client -> EPP servers (not ready) -> controllers (and the elector) -> ready once
synced. Shutdown: not ready -> release the Lease -> drain and stop the EPP -> stop the
controllers -> close the client.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import socket
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from kubernetes_asyncio import client
from prometheus_client import CollectorRegistry

from igw import aio
from igw.app.epp import Epp
from igw.config.pool import ConfigError, PoolSpec
from igw.config.settings import EppSettings
from igw.controllers.kube import ClientSettings, connect, pod_namespace
from igw.controllers.leader import LeaderElector, LeaseSettings
from igw.controllers.objectives import ObjectiveController
from igw.controllers.pool import POOL_VERSIONS, PoolController, SelectorController
from igw.controllers.reflector import WatchSettings
from igw.controllers.resources import POOL_GROUP, PoolInfo, parse_selector_flag
from igw.datalayer.rewrites import RewriteStore

log = logging.getLogger("igw.controllers")

_POD_SUFFIX = re.compile(r"^(.+)-[a-z0-9]+-[a-z0-9]+$")


@dataclass(frozen=True, slots=True)
class KubernetesSettings:
    """Where the pool comes from, how to reach the API server, and leader election."""

    pool_name: str | None = None
    """``--pool-name``: the InferencePool to serve (exactly one of this and ``endpoint_selector``)."""
    pool_namespace: str | None = None
    """``--pool-namespace``; None: ``$NAMESPACE``, else the service account's namespace, else ``default``."""
    pool_group: str = POOL_GROUP
    """``--pool-group``: ``inference.networking.k8s.io`` (v1) or ``inference.networking.x-k8s.io`` (v1alpha2)."""
    endpoint_selector: str | None = None
    """``--endpoint-selector``: ``k=v,k2=v2`` (standalone mode, no CRDs)."""
    endpoint_target_ports: tuple[int, ...] = ()
    """``--endpoint-target-ports``: 1 to 8 ports, with ``endpoint_selector``."""
    kubeconfig: str | None = None
    """``--kubeconfig``; None: in-cluster when in a pod, else ``$KUBECONFIG`` / ``~/.kube/config``."""
    kube_context: str | None = None
    """``--kube-context``: a kubeconfig context other than the current one."""
    leader_election: bool = False
    """``--ha-enable-leader-election``: active-passive replicas (readiness only on the leader)."""
    lease_name: str | None = None
    """``--ha-lease-name``; None: ``igw-epp-<pool name>`` (selector mode: ``igw-epp-<deployment>``)."""
    lease_namespace: str | None = None
    """``--ha-lease-namespace``; None: the pool's namespace."""
    lease_duration_s: float = 15.0
    """``--ha-lease-duration``: followers take over this long after the last renewal they saw."""
    renew_deadline_s: float = 10.0
    """``--ha-renew-deadline``: a leader that cannot renew for this long steps down."""
    retry_period_s: float = 2.0
    """``--ha-retry-period``: time between two election attempts."""
    identity: str | None = None
    """This replica in the Lease; None: ``$POD_NAME`` (else the host name) plus a random suffix."""
    legacy_inference_models: bool = True
    """``--no-legacy-inference-models`` turns off reading v1alpha2 InferenceModels."""
    watch: WatchSettings = field(default_factory=WatchSettings)

    def validate(self) -> None:
        """Raise ConfigError naming the flag when the combination is wrong."""
        if bool(self.pool_name) == bool(self.endpoint_selector):
            raise ConfigError("give exactly one of --pool-name or --endpoint-selector")
        if self.pool_group not in POOL_VERSIONS:
            raise ConfigError(f"--pool-group must be one of {', '.join(POOL_VERSIONS)}, not {self.pool_group!r}")
        if self.endpoint_selector is not None:
            try:
                parse_selector_flag(self.endpoint_selector)
            except ValueError as exc:
                raise ConfigError(f"--endpoint-selector: {exc}") from None
            ports = self.endpoint_target_ports
            if not 1 <= len(ports) <= 8:
                raise ConfigError("--endpoint-target-ports: give 1 to 8 ports with --endpoint-selector")
            if len(set(ports)) != len(ports) or not all(0 < p < 65536 for p in ports):
                raise ConfigError("--endpoint-target-ports: ports must be unique numbers in 1-65535")
        elif self.endpoint_target_ports:
            raise ConfigError("--endpoint-target-ports goes with --endpoint-selector (the pool names its ports)")
        if self.leader_election:
            try:
                self.lease_settings("default", {})
            except ValueError as exc:
                raise ConfigError(f"leader election: {exc}") from None

    def namespace(self, environ: Mapping[str, str] = os.environ) -> str:
        return self.pool_namespace or pod_namespace(environ) or "default"

    def epp_name(self, environ: Mapping[str, str] = os.environ) -> str:
        """The pool name, or in selector mode the Deployment's name (from ``$POD_NAME``)."""
        if self.pool_name:
            return self.pool_name
        pod = environ.get("POD_NAME", "")
        match = _POD_SUFFIX.match(pod)
        return match.group(1) if match else (pod or "standalone")

    def selector_pool(self, environ: Mapping[str, str] = os.environ) -> PoolInfo:
        assert self.endpoint_selector is not None
        return PoolInfo(
            self.epp_name(environ),
            self.namespace(environ),
            parse_selector_flag(self.endpoint_selector),
            tuple(self.endpoint_target_ports),
        )

    def lease_settings(self, namespace: str, environ: Mapping[str, str] = os.environ) -> LeaseSettings:
        identity = self.identity or f"{environ.get('POD_NAME') or socket.gethostname()}_{uuid.uuid4().hex[:8]}"
        return LeaseSettings(
            name=self.lease_name or f"igw-epp-{self.epp_name(environ)}",
            namespace=self.lease_namespace or namespace,
            identity=identity,
            lease_duration_s=self.lease_duration_s,
            renew_deadline_s=self.renew_deadline_s,
            retry_period_s=self.retry_period_s,
        )


class KubernetesEpp(aio.Service):
    """An :class:`~igw.app.epp.Epp` whose pool, objectives and rewrites come from the cluster.

    ``api``: an ``ApiClient`` to use (tests point one at a fake API server); None: connect with
    the settings' kubeconfig / in-cluster account (and close it on stop).
    """

    def __init__(
        self,
        settings: KubernetesSettings,
        epp_settings: EppSettings,
        *,
        config_text: str | None = None,
        config_source: str = "the default configuration",
        registry: CollectorRegistry | None = None,
        api: client.ApiClient | None = None,
        environ: Mapping[str, str] = os.environ,
    ) -> None:
        settings.validate()
        self.settings = settings
        self.namespace = settings.namespace(environ)
        self._environ = environ
        self.epp = Epp(
            epp_settings,
            PoolSpec(name=settings.epp_name(environ)),
            config_text=config_text,
            config_source=config_source,
            registry=registry,
        )
        self.epp.store.synced = False  # the controllers deliver the pool
        existing = getattr(self.epp, "rewrites", None)
        self.rewrites: RewriteStore = existing if isinstance(existing, RewriteStore) else RewriteStore()
        self._api = api
        self._own_api = api is None
        self.pool: PoolController | SelectorController | None = None
        self.objectives: ObjectiveController | None = None
        self.elector: LeaderElector | None = None
        self._tasks: list[asyncio.Task[Any]] = []
        self._elector_task: asyncio.Task[None] | None = None
        self._dirty = asyncio.Event()
        self._started = False

    # -- state ----------------------------------------------------------------------------------
    @property
    def synced(self) -> bool:
        return self.pool is not None and self.pool.synced

    @property
    def ready(self) -> bool:
        """Serving: the pool is synced and, with leader election, this replica leads."""
        return self.synced and (self.elector is None or self.elector.is_leader)

    def _changed(self, *_: object) -> None:
        self._dirty.set()

    async def _readiness_loop(self) -> None:
        while True:
            await self._dirty.wait()
            self._dirty.clear()
            ready = self.ready
            if ready != self.epp.health.ready:
                await self.epp.health.set_ready(ready)
                log.info(
                    "readiness: %s (pool %s, %d endpoint(s)%s)",
                    "SERVING" if ready else "NOT_SERVING",
                    "synced" if self.synced else "not synced",
                    len(self.epp.store.endpoints()),
                    "" if self.elector is None else (", leader" if self.elector.is_leader else ", follower"),
                )

    # -- lifecycle ------------------------------------------------------------------------------
    async def start(self) -> None:
        if self._api is None:
            self._api = await connect(ClientSettings(self.settings.kubeconfig, self.settings.kube_context))
        try:
            await self._start(self._api)
        except BaseException:
            await self.stop()
            raise

    async def _start(self, api: client.ApiClient) -> None:
        s, store = self.settings, self.epp.store
        if s.pool_name:
            self.pool = PoolController(
                api, store, name=s.pool_name, namespace=self.namespace, group=s.pool_group,
                settings=s.watch, on_state=self._changed,
            )  # fmt: skip
            self.objectives = ObjectiveController(
                api, pool_name=s.pool_name, namespace=self.namespace, pool_group=s.pool_group,
                objectives=self.epp.objectives, rewrites=self.rewrites, legacy=s.legacy_inference_models,
                settings=s.watch, on_state=self._changed,
            )  # fmt: skip
        else:
            self.pool = SelectorController(
                api, store, s.selector_pool(self._environ), settings=s.watch, on_state=self._changed
            )
        if s.leader_election:
            self.elector = LeaderElector(api, s.lease_settings(self.namespace, self._environ), on_change=self._changed)
        await self.epp.start()
        self._started = True
        self._tasks.append(aio.spawn(self._readiness_loop(), name="igw.controllers readiness"))
        self._tasks.append(aio.spawn(self.pool.run(), name="igw.controllers pool"))
        if self.objectives is not None:
            self._tasks.append(aio.spawn(self.objectives.run(), name="igw.controllers objectives"))
        if self.elector is not None:
            self._elector_task = aio.spawn(self.elector.run(), name="igw.controllers leader election")
        mode = f"InferencePool {self.namespace}/{s.pool_name}" if s.pool_name else f"selector {s.endpoint_selector}"
        log.info("kubernetes mode: %s%s", mode, ", leader election on" if self.elector else ", active-active")

    async def stop(self) -> None:
        if self._started:
            await self.epp.health.set_ready(False)
        if self._elector_task is not None:  # release the Lease first: a follower takes over while we drain
            await aio.cancel_and_wait(self._elector_task)
            self._elector_task = None
        if self._started:
            await self.epp.stop()
            self._started = False
        if self._tasks:
            await aio.cancel_and_wait(*self._tasks)
            self._tasks.clear()
        if self._own_api and self._api is not None:
            await self._api.close()
            self._api = None


async def run_kubernetes(
    settings: KubernetesSettings,
    epp_settings: EppSettings,
    *,
    config_text: str | None = None,
    config_source: str = "the default configuration",
    stop: asyncio.Event | None = None,
) -> None:
    """``igw run`` in Kubernetes mode: serve until SIGINT/SIGTERM (or ``stop`` is set)."""
    from igw.app.gateway import wait_for_signal

    async with KubernetesEpp(settings, epp_settings, config_text=config_text, config_source=config_source) as k8s:
        srv = epp_settings.server
        source = (
            f"InferencePool {k8s.namespace}/{settings.pool_name}"
            if settings.pool_name
            else f"pods {settings.endpoint_selector} in {k8s.namespace}"
        )
        print(
            f"igw: EPP ext_proc on {srv.host}:{k8s.epp.grpc_port}, health {k8s.epp.health_port}, "
            f"metrics {k8s.epp.metrics_port}; endpoints from {source}"
            + (" (leader election)" if settings.leader_election else ""),
            flush=True,
        )
        if stop is not None:
            await stop.wait()
        else:
            await wait_for_signal()
