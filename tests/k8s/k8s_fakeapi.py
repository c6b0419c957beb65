"""A fake Kubernetes API server that speaks the real list/watch wire format (aiohttp, loopback).

No API server can run on the test machines, so the controllers are tested against this one.
It keeps objects per resource with one global ``resourceVersion`` counter and an event history,
and answers what the real server answers for the requests igw makes:

* ``GET .../{plural}``: a ``{Kind}List`` with ``metadata.resourceVersion`` (``labelSelector``
  with ``k=v`` terms, ``fieldSelector`` on ``metadata.name``/``metadata.namespace``,
  ``limit``/``continue`` pages); a ``resourceVersion`` older than the compaction point (or an
  old ``continue`` token) answers HTTP 410 with a ``Status`` object.
* ``GET .../{plural}?watch=1&resourceVersion=N&allowWatchBookmarks=true&timeoutSeconds=S``: a
  chunked stream of JSON lines ``{"type": ADDED|MODIFIED|DELETED|BOOKMARK|ERROR, "object": ...}``.
  Events after ``N`` are replayed from the history; a label-selected watch sees an object
  that stops matching as DELETED and one that starts matching as ADDED (as the real server);
  ``N`` older than the compaction point gets an ERROR event carrying a 410 ``Status``.
* ``GET/POST/PUT/DELETE`` of single objects, with ``resourceVersion`` conflicts (409) on PUT
  (Leases for leader election).

Test controls: :meth:`FakeKube.create` / ``update`` / ``delete`` (each bumps the version and
notifies watchers), :meth:`bookmark`, :meth:`compact` (older versions become 410),
:meth:`expire_watches` (ERROR 410 on open watches), :meth:`drop_watches` (clean end of stream
or an abrupt connection abort), :meth:`fail` (answer the next requests with an error status),
:meth:`uninstall` (a CRD that is not installed: 404), a bearer token check, and a request log.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import ssl
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import orjson
from aiohttp import web

Obj = dict[str, Any]


@dataclass(frozen=True)
class Resource:
    group: str
    version: str
    plural: str
    kind: str

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version


PODS = Resource("", "v1", "pods", "Pod")
LEASES = Resource("coordination.k8s.io", "v1", "leases", "Lease")
POOLS = Resource("inference.networking.k8s.io", "v1", "inferencepools", "InferencePool")
POOLS_V1ALPHA2 = Resource("inference.networking.x-k8s.io", "v1alpha2", "inferencepools", "InferencePool")
OBJECTIVES = Resource("inference.networking.x-k8s.io", "v1alpha2", "inferenceobjectives", "InferenceObjective")
REWRITES = Resource("inference.networking.x-k8s.io", "v1alpha2", "inferencemodelrewrites", "InferenceModelRewrite")
MODELS = Resource("inference.networking.x-k8s.io", "v1alpha2", "inferencemodels", "InferenceModel")
ALL = (PODS, LEASES, POOLS, POOLS_V1ALPHA2, OBJECTIVES, REWRITES, MODELS)


def status(code: int, reason: str, message: str) -> Obj:
    return {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    }


@dataclass
class Event:
    rv: int
    resource: Resource
    type: str
    obj: Obj
    old: Obj | None


@dataclass
class Watcher:
    resource: Resource
    namespace: str
    labels: dict[str, str]
    fields: dict[str, str]
    bookmarks: bool
    queue: asyncio.Queue[tuple[str, Obj] | str] = field(default_factory=asyncio.Queue)

    def matches(self, obj: Obj | None) -> bool:
        if obj is None:
            return False
        meta = obj.get("metadata", {})
        if self.namespace and meta.get("namespace") != self.namespace:
            return False
        return selects(meta, self.labels, self.fields)

    def translate(self, event: Event) -> tuple[str, Obj] | None:
        """The event this watcher sees (label-selected watches see ADDED/DELETED on edges)."""
        now, before = self.matches(event.obj), self.matches(event.old)
        if event.type == "ADDED":
            return ("ADDED", event.obj) if now else None
        if event.type == "DELETED":
            return ("DELETED", event.obj) if now else None
        if now and before:
            return ("MODIFIED", event.obj)
        if now:
            return ("ADDED", event.obj)
        if before:
            return ("DELETED", event.obj)
        return None


def parse_selector(text: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for term in filter(None, (t.strip() for t in text.split(","))):
        key, sep, value = term.partition("==") if "==" in term else term.partition("=")
        if not sep:
            raise ValueError(f"unsupported selector term {term!r}")
        out[key.strip()] = value.strip()
    return out


def selects(meta: Obj, labels: dict[str, str], fields: dict[str, str]) -> bool:
    have = meta.get("labels") or {}
    if any(have.get(k) != v for k, v in labels.items()):
        return False
    for key, value in fields.items():
        if key == "metadata.name" and meta.get("name") != value:
            return False
        if key == "metadata.namespace" and meta.get("namespace") != value:
            return False
    return True


class FakeKube:
    """The fake server. ``await start()`` (or ``async with``) binds 127.0.0.1 on a free port."""

    def __init__(self, *, token: str | None = None, ssl_context: ssl.SSLContext | None = None) -> None:
        self.token = token
        self.ssl_context = ssl_context
        self.rv = 1000
        self.compacted_rv = 0
        self.installed: set[Resource] = set(ALL)
        self.objects: dict[Resource, dict[tuple[str, str], Obj]] = {r: {} for r in ALL}
        self.history: list[Event] = []
        self.watchers: list[Watcher] = []
        self.requests: list[tuple[str, str, dict[str, str]]] = []
        self._failures: dict[tuple[str, str], list[int]] = {}
        self._runner: web.AppRunner | None = None
        self.port = 0

    # -- lifecycle ------------------------------------------------------------------------------
    async def start(self) -> FakeKube:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        # handler_cancellation: a watch whose client went away ends at once, as on a real server
        self._runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=0.1, handler_cancellation=True)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0, ssl_context=self.ssl_context)
        await site.start()
        server = site._server
        assert server is not None
        self.port = server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return self

    async def stop(self) -> None:
        for watcher in list(self.watchers):
            watcher.queue.put_nowait("end")
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> FakeKube:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    @property
    def url(self) -> str:
        scheme = "https" if self.ssl_context else "http"
        return f"{scheme}://127.0.0.1:{self.port}"

    # -- test controls --------------------------------------------------------------------------
    def create(self, resource: Resource, obj: Obj, *, namespace: str = "default") -> Obj:
        obj = copy.deepcopy(obj)
        meta = obj.setdefault("metadata", {})
        meta.setdefault("namespace", namespace)
        key = (meta["namespace"], meta["name"])
        if key in self.objects[resource]:
            raise KeyError(f"{resource.kind} {key} exists")
        obj.setdefault("apiVersion", resource.api_version)
        obj.setdefault("kind", resource.kind)
        meta.setdefault("uid", str(uuid.uuid4()))
        meta.setdefault("creationTimestamp", datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"))
        meta["generation"] = 1
        self._commit(resource, "ADDED", obj, None)
        return copy.deepcopy(obj)

    def update(self, resource: Resource, obj: Obj) -> Obj:
        obj = copy.deepcopy(obj)
        meta = obj["metadata"]
        key = (meta.get("namespace", "default"), meta["name"])
        old = self.objects[resource][key]
        meta.setdefault("namespace", key[0])
        for kept in ("uid", "creationTimestamp"):
            meta[kept] = old["metadata"][kept]
        meta["generation"] = old["metadata"].get("generation", 1) + (old.get("spec") != obj.get("spec"))
        obj.setdefault("apiVersion", resource.api_version)
        obj.setdefault("kind", resource.kind)
        self._commit(resource, "MODIFIED", obj, old)
        return copy.deepcopy(obj)

    def patch(self, resource: Resource, name: str, change: Callable[[Obj], None], *, namespace: str = "default") -> Obj:
        obj = copy.deepcopy(self.objects[resource][(namespace, name)])
        change(obj)
        return self.update(resource, obj)

    def delete(self, resource: Resource, name: str, *, namespace: str = "default") -> None:
        old = self.objects[resource][(namespace, name)]
        self._commit(resource, "DELETED", copy.deepcopy(old), old)

    def get(self, resource: Resource, name: str, *, namespace: str = "default") -> Obj | None:
        obj = self.objects[resource].get((namespace, name))
        return copy.deepcopy(obj) if obj is not None else None

    def bookmark(self) -> int:
        """Send a BOOKMARK at the current version to every watch that asked for bookmarks."""
        for watcher in self.watchers:
            if watcher.bookmarks:
                r = watcher.resource
                obj = {"kind": r.kind, "apiVersion": r.api_version, "metadata": {"resourceVersion": str(self.rv)}}
                watcher.queue.put_nowait(("BOOKMARK", obj))
        return self.rv

    def advance(self, by: int = 1) -> int:
        """Bump the version without an event watchers see (other resources changed)."""
        self.rv += by
        return self.rv

    def compact(self) -> None:
        """Forget the history: every version before the current one is too old (410 Gone)."""
        self.compacted_rv = self.rv
        self.history.clear()

    def expire_watches(self) -> None:
        """Tell every open watch its version is gone (ERROR event with a 410 Status)."""
        self.compact()
        for watcher in self.watchers:
            watcher.queue.put_nowait(("ERROR", status(410, "Expired", "too old resource version")))
            watcher.queue.put_nowait("end")

    def drop_watches(self, *, abrupt: bool = False) -> None:
        """End every open watch: a clean end of the stream, or a connection abort."""
        for watcher in self.watchers:
            watcher.queue.put_nowait("abort" if abrupt else "end")

    def fail(self, verb: str, resource: Resource, code: int = 500, *, times: int = 1) -> None:
        """Answer the next ``times`` requests (``list``, ``watch``, ``get``, ``create``, ``update``)."""
        self._failures.setdefault((verb, resource.plural), []).extend([code] * times)

    def uninstall(self, resource: Resource) -> None:
        self.installed.discard(resource)

    def watch_count(self, resource: Resource) -> int:
        return sum(1 for w in self.watchers if w.resource == resource)

    def count(self, verb: str, resource: Resource) -> int:
        return sum(1 for v, path, _ in self.requests if v == verb and path.endswith("/" + resource.plural))

    def queries(self, verb: str, resource: Resource) -> list[dict[str, str]]:
        return [q for v, path, q in self.requests if v == verb and path.endswith("/" + resource.plural)]

    # -- internals ------------------------------------------------------------------------------
    def _commit(self, resource: Resource, kind: str, obj: Obj, old: Obj | None) -> None:
        self.rv += 1
        obj["metadata"]["resourceVersion"] = str(self.rv)
        key = (obj["metadata"]["namespace"], obj["metadata"]["name"])
        if kind == "DELETED":
            del self.objects[resource][key]
        else:
            self.objects[resource][key] = obj
        event = Event(self.rv, resource, kind, copy.deepcopy(obj), copy.deepcopy(old) if old else None)
        self.history.append(event)
        for watcher in self.watchers:
            if watcher.resource == resource:
                seen = watcher.translate(event)
                if seen is not None:
                    watcher.queue.put_nowait(seen)

    def _resolve(self, path: str) -> tuple[Resource, str, str | None] | None:
        parts = [p for p in path.split("/") if p]
        if parts[:2] == ["api", "v1"]:
            group, version, rest = "", "v1", parts[2:]
        elif parts[:1] == ["apis"] and len(parts) >= 3:
            group, version, rest = parts[1], parts[2], parts[3:]
        else:
            return None
        if len(rest) < 3 or rest[0] != "namespaces":
            return None
        namespace, plural, name = rest[1], rest[2], rest[3] if len(rest) > 3 else None
        for resource in self.installed:
            if (resource.group, resource.version, resource.plural) == (group, version, plural):
                return resource, namespace, name
        return None

    def _json(self, obj: Obj, code: int = 200) -> web.Response:
        return web.Response(status=code, body=orjson.dumps(obj), content_type="application/json")

    def _failure(self, verb: str, resource: Resource) -> web.Response | None:
        queue = self._failures.get((verb, resource.plural))
        if queue:
            code = queue.pop(0)
            return self._json(status(code, "InternalError" if code >= 500 else "Forbidden", "injected failure"), code)
        return None

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        query = dict(request.query)
        watch = query.get("watch") in ("1", "true", "True")
        verb = {"GET": "watch" if watch else "get", "POST": "create", "PUT": "update", "DELETE": "delete"}.get(
            request.method, request.method.lower()
        )
        target = self._resolve(request.path)
        if target is not None and target[2] is None and verb == "get":
            verb = "list"
        self.requests.append((verb, request.path, query))
        if self.token is not None and request.headers.get("Authorization") != f"Bearer {self.token}":
            return self._json(status(401, "Unauthorized", "Unauthorized"), 401)
        if target is None:
            return self._json(
                status(404, "NotFound", f"the server could not find the requested resource ({request.path})"), 404
            )
        resource, namespace, name = target
        failure = self._failure(verb, resource)
        if failure is not None:
            return failure
        if verb == "list":
            return self._list(resource, namespace, query)
        if verb == "watch":
            return await self._watch(request, resource, namespace, query)
        assert name is not None or verb == "create"
        if verb == "get":
            obj = self.objects[resource].get((namespace, name or ""))
            if obj is None:
                return self._json(status(404, "NotFound", f'{resource.plural} "{name}" not found'), 404)
            return self._json(obj)
        if verb == "create":
            body = await request.json()
            key = (namespace, body["metadata"]["name"])
            if key in self.objects[resource]:
                return self._json(status(409, "AlreadyExists", f'{resource.plural} "{key[1]}" already exists'), 409)
            return self._json(self.create(resource, body, namespace=namespace), 201)
        if verb == "update":
            body = await request.json()
            current = self.objects[resource].get((namespace, name or ""))
            if current is None:
                return self._json(status(404, "NotFound", f'{resource.plural} "{name}" not found'), 404)
            sent = (body.get("metadata") or {}).get("resourceVersion")
            if sent != current["metadata"]["resourceVersion"]:
                msg = f'Operation cannot be fulfilled on {resource.plural} "{name}": the object has been modified'
                return self._json(status(409, "Conflict", msg), 409)
            body["metadata"]["namespace"] = namespace
            return self._json(self.update(resource, body))
        if verb == "delete":
            if (namespace, name or "") not in self.objects[resource]:
                return self._json(status(404, "NotFound", f'{resource.plural} "{name}" not found'), 404)
            self.delete(resource, name or "", namespace=namespace)
            return self._json(status(200, "", "deleted") | {"status": "Success"})
        return self._json(status(405, "MethodNotAllowed", request.method), 405)

    def _list(self, resource: Resource, namespace: str, query: dict[str, str]) -> web.Response:
        try:
            labels = parse_selector(query.get("labelSelector", ""))
            fields = parse_selector(query.get("fieldSelector", ""))
        except ValueError as exc:
            return self._json(status(400, "BadRequest", str(exc)), 400)
        offset, list_rv = 0, self.rv
        token = query.get("continue")
        if token:
            rv_text, _, offset_text = token.partition(":")
            list_rv, offset = int(rv_text), int(offset_text)
            if list_rv < self.compacted_rv:
                return self._json(status(410, "Expired", "the provided continue parameter is too old"), 410)
        requested = query.get("resourceVersion")
        if requested not in (None, "", "0") and int(requested) < self.compacted_rv:
            return self._json(status(410, "Expired", f"too old resource version: {requested}"), 410)
        items = [
            copy.deepcopy(obj)
            for (ns, _), obj in sorted(self.objects[resource].items())
            if ns == namespace and selects(obj["metadata"], labels, fields)
        ]
        limit = int(query.get("limit") or 0)
        meta: Obj = {"resourceVersion": str(list_rv)}
        if limit and offset + limit < len(items):
            meta["continue"] = f"{list_rv}:{offset + limit}"
            meta["remainingItemCount"] = len(items) - offset - limit
        page = items[offset : offset + limit] if limit else items[offset:]
        for item in page:  # the real server drops apiVersion/kind from list items
            item.pop("apiVersion", None)
            item.pop("kind", None)
        return self._json(
            {"kind": f"{resource.kind}List", "apiVersion": resource.api_version, "metadata": meta, "items": page}
        )

    async def _watch(
        self, request: web.Request, resource: Resource, namespace: str, query: dict[str, str]
    ) -> web.StreamResponse:
        watcher = Watcher(
            resource,
            namespace,
            parse_selector(query.get("labelSelector", "")),
            parse_selector(query.get("fieldSelector", "")),
            query.get("allowWatchBookmarks") in ("1", "true", "True"),
        )
        response = web.StreamResponse(status=200, headers={"Content-Type": "application/json"})
        response.enable_chunked_encoding()
        await response.prepare(request)
        timeout = float(query.get("timeoutSeconds") or 0) or None
        requested = query.get("resourceVersion")
        if requested not in (None, "", "0") and int(requested) < self.compacted_rv:
            await response.write(
                orjson.dumps({"type": "ERROR", "object": status(410, "Expired", "too old resource version")}) + b"\n"
            )
            await response.write_eof()
            return response
        if requested in (None, "", "0"):
            backlog = [("ADDED", o) for (ns, _), o in sorted(self.objects[resource].items()) if watcher.matches(o)]
        else:
            backlog = [
                seen
                for e in self.history
                if e.resource == resource and e.rv > int(requested)
                for seen in [watcher.translate(e)]
                if seen
            ]
        for item in backlog:
            watcher.queue.put_nowait(item)
        self.watchers.append(watcher)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout if timeout else None
        try:
            while True:
                wait = None if deadline is None else max(0.0, deadline - loop.time())
                try:
                    item = await asyncio.wait_for(watcher.queue.get(), wait)
                except TimeoutError:
                    break
                if item == "end":
                    break
                if item == "abort":
                    assert request.transport is not None
                    request.transport.abort()
                    return response
                assert isinstance(item, tuple)
                await response.write(orjson.dumps({"type": item[0], "object": item[1]}) + b"\n")
            with contextlib.suppress(ConnectionError):
                await response.write_eof()
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            self.watchers.remove(watcher)
        return response


# -- object builders ---------------------------------------------------------------------------


def pod(
    name: str,
    ip: str | None,
    *,
    labels: dict[str, str] | None = None,
    ready: bool = True,
    annotations: dict[str, str] | None = None,
    terminating: bool = False,
) -> Obj:
    meta: Obj = {"name": name, "labels": labels if labels is not None else {"app": "vllm"}}
    if annotations:
        meta["annotations"] = annotations
    if terminating:
        meta["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    status_: Obj = {
        "phase": "Running",
        "conditions": [
            {"type": "Initialized", "status": "True"},
            {"type": "Ready", "status": "True" if ready else "False"},
        ],
    }
    if ip is not None:
        status_["podIP"] = ip
        status_["podIPs"] = [{"ip": ip}]
    return {"metadata": meta, "spec": {"containers": [{"name": "vllm", "image": "vllm"}]}, "status": status_}


def pool(name: str, *, selector: dict[str, str] | None = None, ports: list[int] | None = None) -> Obj:
    return {
        "metadata": {"name": name},
        "spec": {
            "selector": {"matchLabels": selector if selector is not None else {"app": "vllm"}},
            "targetPorts": [{"number": p} for p in (ports or [8000])],
            "endpointPickerRef": {"name": f"{name}-epp", "port": {"number": 9002}},
        },
    }


def objective(name: str, priority: int | None, *, pool_name: str = "pool") -> Obj:
    spec: Obj = {"poolRef": {"name": pool_name}}
    if priority is not None:
        spec["priority"] = priority
    return {"metadata": {"name": name}, "spec": spec}


def rewrite(name: str, rules: list[Obj], *, pool_name: str = "pool", created: str | None = None) -> Obj:
    meta: Obj = {"name": name}
    if created:
        meta["creationTimestamp"] = created
    return {"metadata": meta, "spec": {"poolRef": {"name": pool_name}, "rules": rules}}


def rule(models: list[str], targets: list[tuple[str, int | None]]) -> Obj:
    out: Obj = {"targets": [{"modelRewrite": m} | ({"weight": w} if w is not None else {}) for m, w in targets]}
    if models:
        out["matches"] = [{"model": {"type": "Exact", "value": m}} for m in models]
    return out
