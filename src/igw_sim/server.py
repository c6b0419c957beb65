"""The HTTP face of one simulated vLLM endpoint (aiohttp).

Routes:

* OpenAI: ``POST /v1/completions``, ``POST /v1/chat/completions`` (a ``model`` naming a loaded LoRA
  adapter selects it), ``GET /v1/models`` (served names, then adapters with ``parent`` set);
* vLLM: ``POST /tokenize``, ``POST /v1/completions/render``, ``POST /v1/chat/completions/render``,
  ``POST /v1/load_lora_adapter``, ``POST /v1/unload_lora_adapter``, ``POST /reset_prefix_cache``,
  ``GET /health``, ``GET /version``, ``GET /metrics`` (Prometheus text, per-endpoint registry);
* SGLang, for routers that ask: ``GET /server_info`` and ``/get_server_info``, ``GET /model_info`` and
  ``/get_model_info`` (``model_path``/``tokenizer_path`` = the configured tokenizer path, else the
  tokenizer directory, else the model name), ``GET /get_load``;
* simulator only: ``GET /sim/stats`` (small JSON), ``GET /sim/engine`` (detailed state),
  ``GET``/``POST /sim/faults`` (see :mod:`igw_sim.faults`).

Every response carries ``x-igw-sim-endpoint: <host:port>`` and echoes ``x-request-id`` when the request
has one; responses to POST requests also carry ``x-igw-sim-body-bytes`` and ``x-igw-sim-body-sha256`` of
the request body, so tests can check what a gateway forwarded. Errors are OpenAI-style JSON, including
unknown routes (404) and bodies over :data:`MAX_BODY_BYTES` (413).

Tokenization (prompts, ``/tokenize``, the render routes, usage counts, and so the ids the engine hashes
and publishes in KV events) goes through the engine's :class:`~igw_sim.tokenizer.SimTokenizer`
(``EngineConfig.tokenizer``): the toy tokenizer by default, or an
:class:`~igw_sim.hf_tokenizer.HFTokenizer` for engine-exact ids. As in vLLM, completion prompts are
encoded with special tokens and rendered chats without, unless the request sets ``add_special_tokens``;
chats also honour ``chat_template_kwargs``, ``tools`` and ``documents`` (the toy tokenizer ignores these).

Streams are written one SSE event per token (``data: {...}\\n\\n``), each flushed when produced, ending
with an optional usage chunk and ``data: [DONE]\\n\\n``. A client that goes away frees the engine slot:
a failed write or the handler's cancellation closes the :class:`~igw_sim.engine.Generation`. Run the app
with ``handler_cancellation=True`` (as :class:`~igw_sim.fleet.SimFleet` does) so that non-streaming
requests are aborted on disconnect too.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import orjson
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from igw_sim import protocol, tokenizer
from igw_sim.engine import ContextLengthError, Engine, Generation, InvalidRequestError, QueueFullError
from igw_sim.faults import Faults
from igw_sim.kvpublisher import ZmqEventPublisher
from igw_sim.metrics import MetricsStyle, build_registry
from igw_sim.scheduler import LoraError

__all__ = ["MAX_BODY_BYTES", "VERSION", "SimServer"]

MAX_BODY_BYTES = 64 * 1024 * 1024
"""Largest accepted request body."""

VERSION = "0.32.0+igw-sim"

_BODY_INFO = web.RequestKey("igw_sim_body_info", tuple[int, str])
_UNCOUNTED_PATHS = frozenset({"/metrics", "/health", "/sim/stats", "/sim/engine", "/sim/faults"})
_HASH_IN_THREAD_BYTES = 1024 * 1024  # hashlib releases the GIL on large buffers
# protocol.parse_generation validates a request and tokenizes its prompt with the toy tokenizer; it is
# given this one-token stand-in instead, and the real prompt is tokenized here with the engine's tokenizer.
_STAND_IN_PROMPT: dict[str, Any] = {"prompt": [0], "messages": [{"role": "user", "content": ""}]}
_Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _json(body: object, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(body), status=status, content_type="application/json")


def _error(exc: protocol.ApiError) -> web.Response:
    return _json(exc.body(), status=exc.status)


def _is_ids(value: object) -> bool:
    return isinstance(value, list) and all(isinstance(i, int) and not isinstance(i, bool) for i in value)


def _template_kwargs(payload: dict[str, Any]) -> dict[str, object]:
    """Extra chat-template variables of a request: ``chat_template_kwargs``, then ``tools`` and
    ``documents`` (vLLM passes all three to the template)."""
    extra = payload.get("chat_template_kwargs")
    if extra is not None and not isinstance(extra, dict):
        raise protocol.ApiError(400, "`chat_template_kwargs` must be an object.", param="chat_template_kwargs")
    out: dict[str, object] = dict(extra or {})
    for key in ("tools", "documents"):
        value = payload.get(key)
        if value is not None:
            out[key] = value
    return out


async def _digest(body: bytes) -> str:
    if len(body) >= _HASH_IN_THREAD_BYTES:
        return await asyncio.to_thread(lambda: hashlib.sha256(body).hexdigest())
    return hashlib.sha256(body).hexdigest()


def _cut(request: web.Request) -> None:
    """Drop the connection without finishing the response (a crashed server)."""
    if request.transport is not None:
        request.transport.close()


class SimServer:
    """One endpoint: an :class:`Engine` behind the vLLM-compatible HTTP API.

    ``endpoint`` (``"host:port"``) is what the ``x-igw-sim-endpoint`` header and ``/sim/stats`` report;
    set it once the listening port is known. ``models`` are the served model names; the first one is
    the ``model_name`` metric label. ``on_crash`` is called once when a crash is injected (the fleet
    uses it to stop listening).
    """

    def __init__(
        self,
        engine: Engine,
        *,
        models: Sequence[str] = ("sim-model",),
        endpoint: str = "",
        metrics_style: MetricsStyle = "vllm",
        faults: Faults | None = None,
        tokenizer_path: str | None = None,
    ) -> None:
        if not models:
            raise ValueError("at least one served model name is required")
        self.engine = engine
        self.models = tuple(models)
        self.endpoint = endpoint
        self.faults = faults if faults is not None else Faults()
        self.tokenizer: tokenizer.SimTokenizer = engine.config.tokenizer
        """The engine's tokenizer (prompts here, generated tokens in the engine)."""
        self.tokenizer_path = tokenizer_path if tokenizer_path is not None else self.tokenizer.path
        self.kv_publisher: ZmqEventPublisher | None = None
        self.on_crash: Callable[[], None] | None = None
        self.requests_total = 0
        """Requests received on any path except /metrics, /health and /sim/*."""
        self.registry = build_registry(engine, model_name=self.models[0], style=metrics_style)
        self._created = int(time.time())

    def attach_publisher(self, publisher: ZmqEventPublisher) -> None:
        """Publish this engine's KV events through ``publisher``."""
        self.kv_publisher = publisher
        self.engine.kv_event_listeners.append(publisher.publish)

    def crash(self) -> None:
        """Crash now: cut every request, refuse new ones, and call ``on_crash``. Idempotent."""
        if self.faults.crashed:
            return
        self.faults.crashed = True
        self.engine.abort_all()
        if self.on_crash is not None:
            self.on_crash()

    def build_app(self) -> web.Application:
        """A new aiohttp application serving this endpoint."""

        @web.middleware
        async def middleware(request: web.Request, handler: _Handler) -> web.StreamResponse:
            if self.faults.crashed:
                _cut(request)
                return web.Response(status=503)
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
        add_get, add_post = app.router.add_get, app.router.add_post
        add_post("/v1/completions", self._completions)
        add_post("/v1/chat/completions", self._chat_completions)
        add_post("/v1/completions/render", self._render_completion)
        add_post("/v1/chat/completions/render", self._render_chat)
        add_post("/tokenize", self._tokenize)
        add_post("/v1/load_lora_adapter", self._load_lora)
        add_post("/v1/unload_lora_adapter", self._unload_lora)
        add_post("/reset_prefix_cache", self._reset_prefix_cache)
        add_get("/v1/models", self._models)
        add_get("/health", self._health)
        add_get("/version", self._version)
        add_get("/metrics", self._metrics)
        for path in ("/server_info", "/get_server_info"):
            add_get(path, self._server_info)
        for path in ("/model_info", "/get_model_info"):
            add_get(path, self._model_info)
        add_get("/get_load", self._get_load)
        add_get("/sim/stats", self._stats)
        add_get("/sim/engine", self._engine_state)
        add_get("/sim/faults", self._get_faults)
        add_post("/sim/faults", self._set_faults)
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
        req = protocol.parse_generation(
            {**payload, **_STAND_IN_PROMPT}, kind=kind, models=self.models, adapters=self.engine.core.adapters
        )
        req = dataclasses.replace(req, prompt=self._prompt(payload, kind))
        injected = self.faults.draw_error()
        if injected is not None:
            raise protocol.ApiError(*injected)
        try:
            gen = self.engine.submit(
                prompt_ids=req.prompt.ids,
                max_tokens=req.max_tokens,
                seed=req.prompt.seed,
                lora=req.lora,
                cache_salt=req.cache_salt,
            )
        except QueueFullError as exc:
            raise protocol.ApiError(429, str(exc)) from None
        except (ContextLengthError, InvalidRequestError) as exc:
            raise protocol.ApiError(400, str(exc)) from None
        rid = protocol.new_id(kind)
        async with gen:
            if req.stream:
                return await self._stream(request, req, gen, rid)
            text = "".join([token.piece async for token in gen])
        if self.faults.crashed:
            _cut(request)
            return web.Response(status=503)
        body = protocol.completion_body(
            req,
            rid=rid,
            text=text,
            completion_tokens=gen.generated,
            finish_reason=gen.finish_reason,
            cached_tokens=gen.cached_tokens,
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
                if req.continuous_usage:
                    chunk["usage"] = protocol.usage_body(req.prompt.count, completion_tokens, gen.cached_tokens)
                await response.write(b"data: " + orjson.dumps(chunk) + b"\n\n")
            if self.faults.crashed:
                _cut(request)
                return response
            if req.include_usage:
                usage = protocol.usage_chunk_body(
                    req, rid=rid, created=created, completion_tokens=completion_tokens, cached_tokens=gen.cached_tokens
                )
                await response.write(b"data: " + orjson.dumps(usage) + b"\n\n")
            await response.write(b"data: [DONE]\n\n")
            await response.write_eof()
        except ConnectionResetError:
            pass  # the client went away; the caller's ``async with`` frees the slot
        return response

    # -- tokenization -------------------------------------------------------------------------------

    def _check_model(self, payload: dict[str, Any]) -> str:
        model = payload.get("model")
        if model is None:
            return self.models[0]
        if model not in self.models and model not in self.engine.core.adapters:
            raise protocol.ApiError(404, f"The model `{model}` does not exist.", param="model")
        return str(model)

    def _prompt(self, payload: dict[str, Any], kind: protocol.Kind) -> protocol.Prompt:
        """Tokenize a completion's ``prompt`` or a chat's ``messages`` (the same checks and messages as
        :func:`protocol.parse_prompt`, with this endpoint's tokenizer)."""
        tok = self.tokenizer
        special = payload.get("add_special_tokens", kind == "completion")
        if not isinstance(special, bool):
            raise protocol.ApiError(400, "`add_special_tokens` must be a boolean.", param="add_special_tokens")
        if kind == "chat":
            messages = payload.get("messages")
            if not isinstance(messages, list) or not messages:
                raise protocol.ApiError(400, "`messages` must be a non-empty list.", param="messages")
            try:
                text = tok.render_chat(
                    messages,
                    add_generation_prompt=bool(payload.get("add_generation_prompt", True)),
                    template_kwargs=_template_kwargs(payload),
                )
            except tokenizer.ChatFormatError as exc:
                raise protocol.ApiError(400, str(exc), param="messages") from None
            ids = tok.encode(text, add_special_tokens=special)
            return protocol.Prompt(count=len(ids), seed=tokenizer.seed_of(text), ids=ids)
        prompt = payload.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and (isinstance(prompt[0], str) or _is_ids(prompt[0])):
            prompt = prompt[0]
        if isinstance(prompt, str):
            ids = tok.encode(prompt, add_special_tokens=special)
            return protocol.Prompt(count=len(ids), seed=tokenizer.seed_of(prompt), ids=ids)
        if isinstance(prompt, list) and _is_ids(prompt):
            ids = [int(i) for i in prompt]
            top = tok.max_token_id
            if top is not None and any(i < 0 or i > top for i in ids):
                raise protocol.ApiError(400, f"Token id out of vocabulary (0..{top}).", param="prompt")
            return protocol.Prompt(count=len(ids), seed=tokenizer.seed_of(",".join(map(str, ids))), ids=ids)
        raise protocol.ApiError(
            400,
            "`prompt` must be a string or a list of token ids (batched prompts are not simulated).",
            param="prompt",
        )

    def _token_ids(self, payload: dict[str, Any]) -> list[int]:
        kind: protocol.Kind = "chat" if "messages" in payload else "completion"
        ids = self._prompt(payload, kind).ids
        return ids if ids is not None else []

    async def _tokenize(self, request: web.Request) -> web.StreamResponse:
        payload = protocol.parse_json(await request.read())
        self._check_model(payload)
        tokens = self._token_ids(payload)
        return _json({"count": len(tokens), "max_model_len": self.engine.config.max_model_len, "tokens": tokens})

    def _render_body(self, payload: dict[str, Any], kind: protocol.Kind) -> dict[str, Any]:
        model = self._check_model(payload)
        tokens = self._token_ids(payload)
        max_tokens = payload.get("max_tokens") or protocol.DEFAULT_MAX_TOKENS
        return {
            "request_id": protocol.new_id(kind),
            "model": model,
            "token_ids": tokens,
            "sampling_params": {"max_tokens": max_tokens},
        }

    async def _render_completion(self, request: web.Request) -> web.StreamResponse:
        payload = protocol.parse_json(await request.read())
        return _json([self._render_body(payload, "completion")])

    async def _render_chat(self, request: web.Request) -> web.StreamResponse:
        payload = protocol.parse_json(await request.read())
        return _json(self._render_body(payload, "chat"))

    # -- LoRA and cache administration ----------------------------------------------------------------

    async def _load_lora(self, request: web.Request) -> web.StreamResponse:
        payload = protocol.parse_json(await request.read())
        name, path = payload.get("lora_name"), payload.get("lora_path")
        if not isinstance(name, str) or not name or not isinstance(path, str) or not path:
            raise protocol.ApiError(400, "Both 'lora_name' and 'lora_path' must be provided.")
        if name in self.models:
            raise protocol.ApiError(400, f"The lora adapter '{name}' has the name of a served model.")
        try:
            self.engine.core.load_adapter(name, path)
        except LoraError as exc:
            raise protocol.ApiError(exc.status, str(exc)) from None
        return web.Response(text=f"Success: LoRA adapter '{name}' added successfully.")

    async def _unload_lora(self, request: web.Request) -> web.StreamResponse:
        payload = protocol.parse_json(await request.read())
        name = payload.get("lora_name")
        if not isinstance(name, str) or not name:
            raise protocol.ApiError(400, "'lora_name' must be provided.")
        try:
            self.engine.core.unload_adapter(name)
        except LoraError as exc:
            raise protocol.ApiError(exc.status, str(exc)) from None
        return web.Response(text=f"Success: LoRA adapter '{name}' removed successfully.")

    async def _reset_prefix_cache(self, request: web.Request) -> web.StreamResponse:
        if not self.engine.reset_prefix_cache():
            raise protocol.ApiError(409, "The prefix cache is in use and cannot be reset now.")
        return web.Response(status=200)

    # -- information routes ---------------------------------------------------------------------------

    async def _models(self, request: web.Request) -> web.StreamResponse:
        max_len = self.engine.config.max_model_len
        cards: list[dict[str, object]] = [
            {
                "id": name,
                "object": "model",
                "created": self._created,
                "owned_by": "vllm",
                "root": name,
                "parent": None,
                "max_model_len": max_len,
                "permission": [],
            }
            for name in self.models
        ]
        cards.extend(
            {
                "id": adapter.name,
                "object": "model",
                "created": self._created,
                "owned_by": "vllm",
                "root": adapter.path,
                "parent": self.models[0],
                "max_model_len": max_len,
                "permission": [],
            }
            for adapter in self.engine.core.adapters.values()
        )
        return _json({"object": "list", "data": cards})

    async def _health(self, request: web.Request) -> web.StreamResponse:
        return web.Response(status=503 if self.faults.unhealthy else 200)

    async def _version(self, request: web.Request) -> web.StreamResponse:
        return _json({"version": VERSION})

    async def _metrics(self, request: web.Request) -> web.StreamResponse:
        return web.Response(body=generate_latest(self.registry), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def _server_info(self, request: web.Request) -> web.StreamResponse:
        cfg = self.engine.config
        path = self.tokenizer_path or self.models[0]
        return _json(
            {
                "model_path": path,
                "tokenizer_path": path,
                "served_model_name": self.models[0],
                "context_length": cfg.max_model_len,
                "max_total_num_tokens": cfg.kv_blocks * cfg.block_size,
                "max_running_requests": cfg.max_num_seqs,
                "chunked_prefill_size": cfg.max_num_batched_tokens,
                "page_size": cfg.block_size,
                "dp_size": 1,
                "tp_size": 1,
                "version": VERSION,
            }
        )

    async def _model_info(self, request: web.Request) -> web.StreamResponse:
        path = self.tokenizer_path or self.models[0]
        return _json(
            {
                "model_path": path,
                "tokenizer_path": path,
                "is_generation": True,
                "preferred_sampling_params": None,
                "weight_version": "default",
                "has_image_understanding": False,
                "has_audio_understanding": False,
                "model_type": "llama",
                "architectures": ["LlamaForCausalLM"],
            }
        )

    async def _get_load(self, request: web.Request) -> web.StreamResponse:
        eng = self.engine
        used_tokens = round(eng.kv_usage * (eng.config.kv_blocks - 1)) * eng.config.block_size
        return _json(
            [
                {
                    "dp_rank": 0,
                    "num_reqs": eng.running + eng.waiting,
                    "num_waiting_reqs": eng.waiting,
                    "num_tokens": used_tokens,
                }
            ]
        )

    async def _stats(self, request: web.Request) -> web.StreamResponse:
        return _json(
            {
                "endpoint": self.endpoint,
                "requests_total": self.requests_total,
                "running": self.engine.running,
                "waiting": self.engine.waiting,
            }
        )

    async def _engine_state(self, request: web.Request) -> web.StreamResponse:
        eng = self.engine
        core = eng.core
        stats = eng.stats
        cfg = eng.config
        running_loras, waiting_loras = core.lora_sets()
        return _json(
            {
                "endpoint": self.endpoint,
                "profile": core.profile.name,
                "time_dilation": cfg.time_dilation,
                "running": eng.running,
                "waiting": eng.waiting,
                "kv_usage": eng.kv_usage,
                "kv_blocks": cfg.kv_blocks,
                "block_size": cfg.block_size,
                "cached_blocks": core.kv.num_cached_blocks,
                "hash_algo": cfg.hash_algo,
                "tokenizer": self.tokenizer.path or "toy",
                "kv_events_topic": self.kv_publisher.topic if self.kv_publisher is not None else None,
                "adapters": sorted(core.adapters),
                "resident_loras": list(core.resident_loras),
                "running_loras": running_loras,
                "waiting_loras": waiting_loras,
                "counters": {
                    "requests": stats.requests_total,
                    "aborted": stats.aborted_total,
                    "preemptions": stats.preemptions_total,
                    "evictions": core.kv.evictions_total,
                    "prefix_cache_queries": stats.prefix_cache_queries_total,
                    "prefix_cache_hits": stats.prefix_cache_hits_total,
                    "prompt_tokens": stats.prompt_tokens_total,
                    "generation_tokens": stats.generation_tokens_total,
                    "lora_loads": stats.lora_loads_total,
                    "steps": stats.steps_total,
                    "busy_seconds": stats.busy_seconds,
                },
                "faults": self.faults.as_json(),
            }
        )

    async def _get_faults(self, request: web.Request) -> web.StreamResponse:
        return _json(self.faults.as_json())

    async def _set_faults(self, request: web.Request) -> web.StreamResponse:
        """Change faults: ``error_rate``, ``error_kinds``, ``unhealthy``; ``stall_s`` stalls the engine
        that long from now; ``crash: true`` crashes the endpoint (this request still gets its answer)."""
        payload = protocol.parse_json(await request.read())
        faults = self.faults
        before = (faults.error_rate, faults.error_kinds)
        try:
            if "error_rate" in payload:
                faults.error_rate = float(payload["error_rate"])
            if "error_kinds" in payload:
                faults.error_kinds = tuple(str(k) for k in payload["error_kinds"])
            faults.validate()
        except (TypeError, ValueError) as exc:
            faults.error_rate, faults.error_kinds = before
            raise protocol.ApiError(400, str(exc)) from None
        if "unhealthy" in payload:
            faults.unhealthy = bool(payload["unhealthy"])
        stall = payload.get("stall_s")
        if stall is not None:
            if not isinstance(stall, int | float) or stall < 0:
                raise protocol.ApiError(400, "`stall_s` must be a non-negative number.", param="stall_s")
            self.engine.stall(float(stall))
        body = faults.as_json()
        if payload.get("crash"):
            body["crashed"] = True
            asyncio.get_running_loop().call_soon(self.crash)
        return _json(body)
