"""List + watch of one kind of object into a local cache, level-triggered (client-go's Reflector).

``Reflector.run`` loops until cancelled:

1. **List** (in pages of ``page_size``) and replace the whole cache; the list's
   ``metadata.resourceVersion`` is where the watch starts. Then call ``on_change`` once.
2. **Watch** from that version with ``allowWatchBookmarks=true`` and a server-side
   ``timeoutSeconds``; every ADDED/MODIFIED/DELETED event updates the cache and calls
   ``on_change``; BOOKMARK events only move the version forward (so a re-watch after a quiet
   period does not start from a version the server has already compacted).
3. When a watch ends (server timeout, clean close, a dropped connection) re-watch from the last
   version seen; on **410 Gone** (an ERROR event with a 410 ``Status``, or an HTTP 410) the
   version is too old: go back to 1 and re-list. Other errors wait with exponential backoff
   (with jitter) before retrying; a success resets the backoff.

``on_change`` gets no arguments: handlers read :attr:`Reflector.objects` and recompute their
whole output (level-triggered), so a missed or repeated event cannot leave them wrong.

The HTTP calls go through kubernetes-asyncio (``ApiClient`` authentication, token refresh,
TLS, its ``Watch`` for the event stream). Two details are done here on purpose:

* ``timeout_seconds`` is always passed to ``Watch.stream``: without it the library retries a
  410 once *with the same stale version* and hides clean disconnects; with it, a 410 surfaces
  as ``ApiException(status=410)`` and the end of a stream as the end of the iteration, so the
  policy above (re-list on 410, re-watch on disconnect) lives in one place.
* Lists use ``_preload_content=False`` and decode the JSON here: every kind (Pods and custom
  resources) is handled as the plain dicts the wire carries, without building the generated
  models for thousands of pods.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import orjson
from kubernetes_asyncio import watch
from kubernetes_asyncio.client.exceptions import ApiException

log = logging.getLogger("igw.controllers")

Obj = dict[str, Any]
ListFn = Callable[..., Awaitable[Any]]


@dataclass(frozen=True, slots=True)
class WatchSettings:
    """How the reflectors talk to the API server."""

    watch_timeout_s: float = 300.0
    """Server-side ``timeoutSeconds`` of a watch; each watch draws from [t, 2t) like client-go."""
    page_size: int = 500
    """Objects per list page (``limit``); 0 lists everything in one response."""
    request_timeout_s: float = 30.0
    """Connect timeout, and read timeout of a list page."""
    backoff_initial_s: float = 0.8
    """First wait after an error; doubles up to ``backoff_max_s`` (with +-20% jitter)."""
    backoff_max_s: float = 30.0
    missing_retry_s: float = 60.0
    """A resource whose API is not installed (404 on list): look again after this long."""
    watch_idle_timeout_s: float = 120.0
    """A watch connection silent this long is dropped and re-opened from the last version: API
    servers send a bookmark about every minute, so silence means a half-open connection."""
    quiet_watch_s: float = 1.0
    """A watch that ends sooner than this without an event counts as an error (no hot loop)."""


class Gone(Exception):
    """The resource version is too old (410): re-list."""


class Backoff:
    """Exponential backoff with jitter; ``reset`` after a success."""

    def __init__(self, settings: WatchSettings, rng: random.Random | None = None) -> None:
        self._settings = settings
        self._rng = rng or random.Random()
        self._next = settings.backoff_initial_s

    def next_delay(self) -> float:
        delay = self._next * self._rng.uniform(0.8, 1.2)
        self._next = min(self._next * 2, self._settings.backoff_max_s)
        return delay

    def reset(self) -> None:
        self._next = self._settings.backoff_initial_s


def object_key(obj: Obj) -> str:
    meta = obj.get("metadata") or {}
    return f"{meta.get('namespace', '')}/{meta.get('name', '')}"


def resource_version(obj: Obj) -> str | None:
    rv = (obj.get("metadata") or {}).get("resourceVersion")
    return str(rv) if rv else None


class Reflector:
    """A cache of one kind of object (one namespace, optional label/field selector).

    ``list_fn`` is a kubernetes-asyncio list method (``CoreV1Api.list_namespaced_pod``,
    ``CustomObjectsApi.list_namespaced_custom_object``); ``args``/``kwargs`` are passed to every
    list and watch call (namespace, group, selectors...). ``optional``: a 404 on list means
    the API is not installed (a CRD missing): the cache is empty and synced, and the list is
    retried every ``missing_retry_s``.
    """

    def __init__(
        self,
        *,
        name: str,
        list_fn: ListFn,
        args: tuple[Any, ...] = (),
        kwargs: Mapping[str, Any] | None = None,
        on_change: Callable[[], None],
        settings: WatchSettings | None = None,
        optional: bool = False,
        rng: random.Random | None = None,
    ) -> None:
        self.name = name
        self._list_fn = list_fn
        self._args = args
        self._kwargs = dict(kwargs or {})
        self._on_change = on_change
        self.settings = settings or WatchSettings()
        self.optional = optional
        self._rng = rng or random.Random()
        self._backoff = Backoff(self.settings, self._rng)
        self.objects: dict[str, Obj] = {}
        """The cache: ``namespace/name`` -> the object as the API server sent it."""
        self.resource_version: str | None = None
        self.synced = False
        """True once the first list (or a 404 of an optional resource) has been applied."""
        self.installed = True
        """False while an optional resource's API answers 404."""
        self._synced_event = asyncio.Event()
        self.stats = {"lists": 0, "watches": 0, "events": 0, "bookmarks": 0, "gone": 0, "errors": 0}

    async def wait_synced(self) -> None:
        await self._synced_event.wait()

    async def run(self) -> None:
        """List, then watch, forever (until cancelled)."""
        while True:
            try:
                version = await self._list()
            except ApiException as exc:
                if exc.status == 404 and self.optional:
                    self._not_installed()
                    await asyncio.sleep(self.settings.missing_retry_s)
                    continue
                await self._error("list", exc)
                continue
            except Exception as exc:  # a transport error, a bad answer: retry after a pause
                await self._error("list", exc)
                continue
            self._backoff.reset()
            await self._watch_until_gone(version)

    # -- list -----------------------------------------------------------------------------------
    async def _list(self) -> str:
        self.stats["lists"] += 1
        items: dict[str, Obj] = {}
        token: str | None = None
        version = ""
        while True:
            kwargs = dict(self._kwargs)
            if self.settings.page_size:
                kwargs["limit"] = self.settings.page_size
            if token:
                kwargs["_continue"] = token
            body = await self._get_list(kwargs)
            meta = body.get("metadata") or {}
            for item in body.get("items") or ():
                items[object_key(item)] = item
            token = meta.get("continue") or None
            if not token:
                version = str(meta.get("resourceVersion") or "")
                break
        first = not self.synced
        self.objects = items
        self.resource_version = version
        self.installed = True
        self._mark_synced()
        log.debug("%s: listed %d object(s) at version %s", self.name, len(items), version)
        if first:
            log.info("%s: synced (%d object(s))", self.name, len(items))
        self._notify()
        return version

    async def _get_list(self, kwargs: dict[str, Any]) -> Obj:
        timeout = (self.settings.request_timeout_s, self.settings.request_timeout_s)
        response = await self._list_fn(*self._args, **kwargs, _preload_content=False, _request_timeout=timeout)
        try:
            data = await response.read()
        finally:
            response.release()
        if response.status != 200:
            exc = ApiException(status=response.status, reason=response.reason)
            exc.body = data.decode(errors="replace")
            if response.status == 410:
                raise Gone(exc.body) from exc
            raise exc
        body = orjson.loads(data)
        if not isinstance(body, dict):
            raise ValueError(f"{self.name}: the list answer is not an object")
        return body

    # -- watch ----------------------------------------------------------------------------------
    async def _watch_until_gone(self, version: str) -> None:
        """Watch (and re-watch) from ``version`` until the server says it is gone."""
        while True:
            started = time.monotonic()
            version = self.resource_version or version  # events and bookmarks move it forward
            try:
                seen = await self._watch_once(version)
            except Gone:
                self.stats["gone"] += 1
                log.info("%s: resource version %s is gone (410): re-listing", self.name, version)
                return
            except ApiException as exc:
                if exc.status == 410:
                    self.stats["gone"] += 1
                    log.info("%s: resource version %s is gone (410): re-listing", self.name, version)
                    return
                if exc.status == 404 and self.optional:
                    return  # uninstalled while watched: the list finds out
                await self._error("watch", exc)
                continue
            except Exception as exc:  # connection dropped, timeout, malformed event
                await self._error("watch", exc)
                continue
            if seen is None:  # ended quickly with nothing: pause instead of spinning
                if time.monotonic() - started < self.settings.quiet_watch_s:
                    await asyncio.sleep(self._backoff.next_delay())
                continue
            self._backoff.reset()

    async def _watch_once(self, version: str) -> str | None:
        """One watch request; returns the last version seen, None if there was no event."""
        self.stats["watches"] += 1
        timeout = int(self.settings.watch_timeout_s * self._rng.uniform(1.0, 2.0)) or 1
        latest: str | None = None
        stream = watch.Watch(return_type="object")
        async with stream:
            events = stream.stream(
                self._list_fn,
                *self._args,
                **self._kwargs,
                resource_version=version,
                allow_watch_bookmarks=True,
                timeout_seconds=timeout,
                # (connect, time between reads): a half-open connection is noticed after the idle timeout
                _request_timeout=(
                    self.settings.request_timeout_s,
                    min(timeout + self.settings.request_timeout_s, self.settings.watch_idle_timeout_s),
                ),
            )
            async for event in events:
                kind = event.get("type")
                raw = event.get("raw_object")
                if not isinstance(raw, dict):
                    raise ValueError(f"{self.name}: watch event without an object: {event!r}")
                seen = resource_version(raw)
                if kind == "BOOKMARK":
                    self.stats["bookmarks"] += 1
                elif kind in ("ADDED", "MODIFIED"):
                    self.objects[object_key(raw)] = raw
                elif kind == "DELETED":
                    self.objects.pop(object_key(raw), None)
                else:
                    raise ValueError(f"{self.name}: unknown watch event type {kind!r}")
                if seen:
                    latest = self.resource_version = seen
                if kind != "BOOKMARK":
                    self.stats["events"] += 1
                    self._notify()
        return latest

    # -- helpers --------------------------------------------------------------------------------
    def _mark_synced(self) -> None:
        self.synced = True
        self._synced_event.set()

    def _not_installed(self) -> None:
        if self.installed:
            log.info(
                "%s: the API is not installed (404); looking again every %.0fs",
                self.name,
                self.settings.missing_retry_s,
            )
        self.installed = False
        changed = bool(self.objects) or not self.synced
        self.objects = {}
        self._mark_synced()
        if changed:
            self._notify()

    def _notify(self) -> None:
        try:
            self._on_change()
        except Exception:  # a handler bug must not stop the watch (nor be retried as a watch error)
            log.exception("%s: change handler failed", self.name)

    async def _error(self, what: str, exc: BaseException) -> None:
        self.stats["errors"] += 1
        delay = self._backoff.next_delay()
        detail = f"{exc.status} {exc.reason}" if isinstance(exc, ApiException) else f"{type(exc).__name__}: {exc}"
        if isinstance(exc, ApiException) and exc.status == 404:
            detail += "; is the CRD installed?"
        elif isinstance(exc, ApiException) and exc.status == 403:
            detail += "; does the service account's Role allow list and watch?"
        log.warning("%s: %s failed (%s); retrying in %.1fs", self.name, what, detail, delay)
        await asyncio.sleep(delay)
