"""The HTTP face of one simulated vLLM endpoint (aiohttp).

Routes: ``POST /v1/completions``, ``POST /v1/chat/completions``, ``POST /tokenize``, ``GET /v1/models``,
``GET /health``, ``GET /version``, ``GET /metrics`` (Prometheus text, per-endpoint registry) and
``GET /sim/stats`` (simulator-only JSON).

Every response carries ``x-igw-sim-endpoint: <host:port>`` and echoes ``x-request-id`` when the request
has one; responses to POST requests also carry ``x-igw-sim-body-bytes`` and ``x-igw-sim-body-sha256`` of
the request body, so tests can check what a gateway forwarded. Errors are OpenAI-style JSON, including
unknown routes (404) and bodies over :data:`MAX_BODY_BYTES` (413).

Streams are written one SSE event per token (``data: {...}\\n\\n``), each flushed when produced, ending
with an optional usage chunk and ``data: [DONE]\\n\\n``. A client that goes away frees the engine slot:
a failed write or the handler's cancellation closes the :class:`~igw_sim.engine.Generation`. Run the app
with ``handler_cancellation=True`` (as :class:`~igw_sim.fleet.SimFleet` does) so that non-streaming
requests are aborted on disconnect too.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Awaitable, Callable, Sequence

import orjson
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from igw_sim import protocol
from igw_sim.engine import ContextLengthError, Engine, Generation, QueueFullError
from igw_sim.metrics import build_registry

__all__ = ["MAX_BODY_BYTES", "SimServer"]

MAX_BODY_BYTES = 64 * 1024 * 1024
"""Largest accepted request body."""

_BODY_INFO = web.RequestKey("igw_sim_body_info", tuple[int, str])
_UNCOUNTED_PATHS = frozenset({"/metrics", "/health", "/sim/stats"})
_HASH_IN_THREAD_BYTES = 1024 * 1024  # hashlib releases the GIL on large buffers
_Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _json(body: object, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(body), status=status, content_type="application/json")


def _error(exc: protocol.ApiError) -> web.Response:
    return _json(exc.body(), status=exc.status)


async def _digest(body: bytes) -> str:
    if len(body) >= _HASH_IN_THREAD_BYTES:
        return await asyncio.to_thread(lambda: hashlib.sha256(body).hexdigest())
    return hashlib.sha256(body).hexdigest()


class SimServer:
    """One endpoint: an :class:`Engine` behind the vLLM-compatible HTTP API.

    ``endpoint`` (``"host:port"``) is what the ``x-igw-sim-endpoint`` header and ``/sim/stats`` report;
    set it once the listening port is known. ``models`` are the served model names; the first one is
    the ``model_name`` metric label.
    """

    def __init__(self, engine: Engine, *, models: Sequence[str] = ("sim-model",), endpoint: str = "") -> None:
        if not models:
            raise ValueError("at least one served model name is required")
        self.engine = engine
        self.models = tuple(models)
        self.endpoint = endpoint
        self.requests_total = 0
        """Requests received on any path except /metrics, /health and /sim/stats."""
        self.registry = build_registry(engine, model_name=self.models[0])
        self._created = int(time.time())

    def build_app(self) -> web.Application:
        """A new aiohttp application serving this endpoint."""

        @web.middleware
        async def middleware(request: web.Request, handler: _Handler) -> web.StreamResponse:
            if request.path not in _UNCOUNTED_PATHS:
                self.requests_total += 1
            try:
                if request.method == "POST":
                    body = await request.read()
                    request[_BODY_INFO] = (len(body), await _digest(body))
                return await handler(request)
            except protocol.ApiError as exc:
                return _error(exc)
            except web.HTTPException as exc:
                if exc.status < 400:
                    raise
                return _error(protocol.ApiError(exc.status, exc.reason))

        app = web.Application(client_max_size=MAX_BODY_BYTES, middlewares=[middleware])
        app.on_response_prepare.append(self._add_headers)
        app.router.add_post("/v1/completions", self._completions)
        app.router.add_post("/v1/chat/completions", self._chat_completions)
        app.router.add_post("/tokenize", self._tokenize)
        app.router.add_get("/v1/models", self._models)
        app.router.add_get("/health", self._health)
        app.router.add_get("/version", self._version)
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/sim/stats", self._stats)
        return app

    async def _add_headers(self, request: web.Request, response: web.StreamResponse) -> None:
        response.headers["x-igw-sim-endpoint"] = self.endpoint
        request_id = request.headers.get("x-request-id")
        if request_id is not None:
            response.headers["x-request-id"] = request_id
        info = request.get(_BODY_INFO)
        if info is not None:
            response.headers["x-igw-sim-body-bytes"] = str(info[0])
            response.headers["x-igw-sim-body-sha256"] = info[1]

    # -- generation ---------------------------------------------------------------------------------

    async def _completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, "completion")

    async def _chat_completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, "chat")

    async def _generate(self, request: web.Request, kind: protocol.Kind) -> web.StreamResponse:
        payload = protocol.parse_json(await request.read())
        req = protocol.parse_generation(payload, kind=kind, models=self.models)
        try:
            gen = self.engine.submit(prompt_tokens=req.prompt.count, max_tokens=req.max_tokens, seed=req.prompt.seed)
        except QueueFullError as exc:
            raise protocol.ApiError(429, str(exc)) from None
        except ContextLengthError as exc:
            raise protocol.ApiError(400, str(exc)) from None
        rid = protocol.new_id(kind)
        async with gen:
            if req.stream:
                return await self._stream(request, req, gen, rid)
            text = "".join([token.piece async for token in gen])
        body = protocol.completion_body(
            req, rid=rid, text=text, completion_tokens=gen.generated, finish_reason=gen.finish_reason
        )
        return _json(body)

    async def _stream(
        self, request: web.Request, req: protocol.GenerationRequest, gen: Generation, rid: str
    ) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await response.prepare(request)
        created = int(time.time())
        completion_tokens = 0
        try:
            async for token in gen:
                completion_tokens += 1
                chunk = protocol.chunk_body(
                    req,
                    rid=rid,
                    created=created,
                    piece=token.piece,
                    first=token.index == 0,
                    finish_reason="length" if token.last else None,
                )
                await response.write(b"data: " + orjson.dumps(chunk) + b"\n\n")
            if req.include_usage:
                usage = protocol.usage_chunk_body(req, rid=rid, created=created, completion_tokens=completion_tokens)
                await response.write(b"data: " + orjson.dumps(usage) + b"\n\n")
            await response.write(b"data: [DONE]\n\n")
            await response.write_eof()
        except ConnectionResetError:
            pass  # the client went away; the caller's ``async with`` frees the slot
        return response

    # -- other routes -------------------------------------------------------------------------------

    async def _tokenize(self, request: web.Request) -> web.StreamResponse:
        payload = protocol.parse_json(await request.read())
        model = payload.get("model")
        if model is not None and model not in self.models:
            raise protocol.ApiError(404, f"The model `{model}` does not exist.", param="model")
        kind: protocol.Kind = "chat" if "messages" in payload else "completion"
        prompt = protocol.parse_prompt(payload, kind=kind, with_ids=True)
        tokens = prompt.ids if prompt.ids is not None else []
        return _json({"count": len(tokens), "max_model_len": self.engine.config.max_model_len, "tokens": tokens})

    async def _models(self, request: web.Request) -> web.StreamResponse:
        cards: list[dict[str, object]] = [
            {
                "id": name,
                "object": "model",
                "created": self._created,
                "owned_by": "vllm",
                "root": name,
                "parent": None,
                "max_model_len": self.engine.config.max_model_len,
                "permission": [],
            }
            for name in self.models
        ]
        return _json({"object": "list", "data": cards})

    async def _health(self, request: web.Request) -> web.StreamResponse:
        return web.Response(status=200)

    async def _version(self, request: web.Request) -> web.StreamResponse:
        return _json({"version": "0.32.0+igw-sim"})

    async def _metrics(self, request: web.Request) -> web.StreamResponse:
        return web.Response(body=generate_latest(self.registry), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def _stats(self, request: web.Request) -> web.StreamResponse:
        return _json(
            {
                "endpoint": self.endpoint,
                "requests_total": self.requests_total,
                "running": self.engine.running,
                "waiting": self.engine.waiting,
            }
        )
