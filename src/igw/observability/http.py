"""The metrics port: Prometheus ``/metrics``, ``/healthz`` and ``/debug/decisions``.

``/debug/decisions`` returns the recent scheduling decisions, newest first, as JSON; query
parameters ``limit`` (decisions) and ``top`` (candidates per decision, best first).
"""

from __future__ import annotations

import orjson
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from igw.observability.decisions import DecisionLog


def metrics_app(registry: CollectorRegistry, decisions: DecisionLog | None = None) -> web.Application:
    async def metrics(_: web.Request) -> web.Response:
        return web.Response(body=generate_latest(registry), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def healthz(_: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def recent_decisions(request: web.Request) -> web.Response:
        try:
            limit = _optional_int(request.query.get("limit"))
            top = _optional_int(request.query.get("top"))
        except ValueError as exc:
            raise web.HTTPBadRequest(text=f"{exc}\n") from None
        entries = decisions.render(limit=limit, top=top) if decisions is not None else []
        body = {"kept": decisions.size if decisions is not None else 0, "decisions": entries}
        return web.Response(body=orjson.dumps(body), content_type="application/json")

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/debug/decisions", recent_decisions)
    return app


def _optional_int(raw: str | None) -> int | None:
    if raw is None:
        return None
    if not raw.isdigit():
        raise ValueError(f"expected a non-negative integer, got {raw!r}")
    return int(raw)


async def start_metrics_server(
    registry: CollectorRegistry, host: str, port: int, decisions: DecisionLog | None = None
) -> tuple[web.AppRunner, int]:
    runner = web.AppRunner(metrics_app(registry, decisions), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port, reuse_port=False)
    await site.start()
    server = site._server  # aiohttp exposes the bound port only here
    sockets = getattr(server, "sockets", None) or []
    bound = sockets[0].getsockname()[1] if sockets else port
    return runner, int(bound)
