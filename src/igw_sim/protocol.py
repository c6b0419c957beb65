"""OpenAI-shaped request parsing and response bodies (no I/O here).

Parsing contract: every malformed or unsupported request raises :class:`ApiError` carrying the HTTP
status and an OpenAI-style error body (``{"error": {"message", "type", "param", "code"}}``); nothing
else escapes. Supported prompts: for ``/v1/completions`` a string, a list of token ids, or a one-element
list of either; for ``/v1/chat/completions`` a non-empty ``messages`` list (see
:func:`igw_sim.tokenizer.render_chat`). A missing ``model`` means the first served model; a ``model``
naming a loaded LoRA adapter selects that adapter. ``cache_salt`` (vLLM's extension) isolates a
request's prefix-cache entries.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import orjson

from igw_sim import tokenizer

__all__ = [
    "DEFAULT_MAX_TOKENS",
    "ApiError",
    "GenerationRequest",
    "Kind",
    "Prompt",
    "chunk_body",
    "completion_body",
    "new_id",
    "parse_generation",
    "parse_json",
    "parse_prompt",
    "usage_body",
    "usage_chunk_body",
]

DEFAULT_MAX_TOKENS = 16
"""``max_tokens`` when the request gives none (a fixed default keeps simulated runs short)."""

Kind = Literal["completion", "chat"]
JsonObject = dict[str, Any]

_ERROR_TYPES = {
    400: "BadRequestError",
    401: "AuthenticationError",
    404: "NotFoundError",
    413: "BadRequestError",
    429: "RateLimitError",
}


class ApiError(Exception):
    """A request that must be answered with ``status`` and :meth:`body`."""

    def __init__(self, status: int, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param

    def body(self) -> JsonObject:
        """The OpenAI-style error object."""
        err_type = _ERROR_TYPES.get(self.status, "InternalServerError" if self.status >= 500 else "Error")
        return {"error": {"message": self.message, "type": err_type, "param": self.param, "code": self.status}}


@dataclass(frozen=True, slots=True)
class Prompt:
    """A tokenized prompt: ``count`` tokens, a generation ``seed``, and the ids when asked for."""

    count: int
    seed: int
    ids: list[int] | None = None


@dataclass(frozen=True, slots=True)
class GenerationRequest:
    """A validated completion or chat request."""

    kind: Kind
    model: str
    prompt: Prompt
    max_tokens: int
    stream: bool
    include_usage: bool
    continuous_usage: bool = False
    """``stream_options.continuous_usage_stats``: every chunk carries ``usage``."""
    lora: str | None = None
    """The LoRA adapter named by ``model``, if any."""
    cache_salt: str | None = None


def parse_json(body: bytes) -> JsonObject:
    """Decode a JSON object body; ``ApiError(400)`` when it is not valid JSON or not an object."""
    try:
        value = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise ApiError(400, f"Invalid JSON in request body: {exc}") from None
    if not isinstance(value, dict):
        raise ApiError(400, "The request body must be a JSON object.")
    return value


def _model(payload: JsonObject, models: Sequence[str], adapters: Collection[str] = ()) -> str:
    model = payload.get("model")
    if model is None:
        return models[0]
    if not isinstance(model, str) or (model not in models and model not in adapters):
        raise ApiError(404, f"The model `{model}` does not exist.", param="model")
    return model


def _text_prompt(text: str, *, with_ids: bool) -> Prompt:
    ids = tokenizer.encode(text) if with_ids else None
    n = len(ids) if ids is not None else tokenizer.count(text)
    return Prompt(count=n, seed=tokenizer.seed_of(text), ids=ids)


def _is_ids(value: object) -> bool:
    return isinstance(value, list) and all(isinstance(i, int) and not isinstance(i, bool) for i in value)


def parse_prompt(payload: JsonObject, *, kind: Kind, with_ids: bool = False) -> Prompt:
    """Tokenize the prompt of a completion (``prompt``) or chat (``messages``) payload."""
    if kind == "chat":
        messages = payload.get("messages")
        if not isinstance(messages, list) or not messages:
            raise ApiError(400, "`messages` must be a non-empty list.", param="messages")
        add_generation_prompt = payload.get("add_generation_prompt", True)
        try:
            text = tokenizer.render_chat(messages, add_generation_prompt=bool(add_generation_prompt))
        except tokenizer.ChatFormatError as exc:
            raise ApiError(400, str(exc), param="messages") from None
        return _text_prompt(text, with_ids=with_ids)
    prompt = payload.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and (isinstance(prompt[0], str) or _is_ids(prompt[0])):
        prompt = prompt[0]
    if isinstance(prompt, str):
        return _text_prompt(prompt, with_ids=with_ids)
    if isinstance(prompt, list) and _is_ids(prompt):
        ids = [int(i) for i in prompt]
        return Prompt(count=len(ids), seed=tokenizer.seed_of(",".join(map(str, ids))), ids=ids)
    raise ApiError(
        400,
        "`prompt` must be a string or a list of token ids (batched prompts are not simulated).",
        param="prompt",
    )


def _positive_int(payload: JsonObject, key: str) -> int | None:
    value = payload.get(key)
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ApiError(400, f"`{key}` must be a positive integer.", param=key)
    return value


def parse_generation(
    payload: JsonObject, *, kind: Kind, models: Sequence[str], adapters: Collection[str] = ()
) -> GenerationRequest:
    """Validate a ``/v1/completions`` (``kind="completion"``) or ``/v1/chat/completions`` payload.

    The prompt is tokenized with its ids (the prefix cache needs them).
    """
    model = _model(payload, models, adapters)
    max_tokens = _positive_int(payload, "max_tokens")
    if kind == "chat":
        max_tokens = _positive_int(payload, "max_completion_tokens") or max_tokens
    stream = payload.get("stream", False)
    if not isinstance(stream, bool):
        raise ApiError(400, "`stream` must be a boolean.", param="stream")
    options = payload.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise ApiError(400, "`stream_options` must be an object.", param="stream_options")
    include_usage = bool(options and options.get("include_usage"))
    continuous_usage = bool(options and options.get("continuous_usage_stats"))
    cache_salt = payload.get("cache_salt")
    if cache_salt is not None and (not isinstance(cache_salt, str) or not cache_salt):
        raise ApiError(400, "`cache_salt` must be a non-empty string.", param="cache_salt")
    return GenerationRequest(
        kind=kind,
        model=model,
        prompt=parse_prompt(payload, kind=kind, with_ids=True),
        max_tokens=max_tokens or DEFAULT_MAX_TOKENS,
        stream=stream,
        include_usage=include_usage,
        continuous_usage=continuous_usage,
        lora=model if model not in models else None,
        cache_salt=cache_salt,
    )


# -- response bodies -------------------------------------------------------------------------------


def new_id(kind: Kind) -> str:
    """A fresh response id (``cmpl-...`` or ``chatcmpl-...``)."""
    return f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex}"


def usage_body(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> JsonObject:
    """The ``usage`` object; ``cached_tokens`` are the prompt tokens found in the prefix cache."""
    return {
        "prompt_tokens": prompt_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "completion_tokens": completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens},
    }


def completion_body(
    req: GenerationRequest,
    *,
    rid: str,
    text: str,
    completion_tokens: int,
    finish_reason: str | None,
    cached_tokens: int = 0,
) -> JsonObject:
    """A whole (non-streaming) completion or chat completion."""
    choice: JsonObject
    if req.kind == "chat":
        choice = {
            "index": 0,
            "message": {"role": "assistant", "content": text, "tool_calls": []},
            "logprobs": None,
            "finish_reason": finish_reason,
            "stop_reason": None,
        }
    else:
        choice = {
            "index": 0,
            "text": text,
            "logprobs": None,
            "finish_reason": finish_reason,
            "stop_reason": None,
        }
    return {
        "id": rid,
        "object": "chat.completion" if req.kind == "chat" else "text_completion",
        "created": int(time.time()),
        "model": req.model,
        "choices": [choice],
        "usage": usage_body(req.prompt.count, completion_tokens, cached_tokens),
    }


def chunk_body(
    req: GenerationRequest, *, rid: str, created: int, piece: str, first: bool, finish_reason: str | None
) -> JsonObject:
    """One streamed chunk carrying one token. In chat, the first delta also carries the role."""
    choice: JsonObject
    if req.kind == "chat":
        delta: JsonObject = {"role": "assistant", "content": piece} if first else {"content": piece}
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
    else:
        choice = {"index": 0, "text": piece, "logprobs": None, "finish_reason": finish_reason}
    return {
        "id": rid,
        "object": "chat.completion.chunk" if req.kind == "chat" else "text_completion",
        "created": created,
        "model": req.model,
        "choices": [choice],
    }


def usage_chunk_body(
    req: GenerationRequest, *, rid: str, created: int, completion_tokens: int, cached_tokens: int = 0
) -> JsonObject:
    """The final ``include_usage`` chunk: no choices, only ``usage``."""
    return {
        "id": rid,
        "object": "chat.completion.chunk" if req.kind == "chat" else "text_completion",
        "created": created,
        "model": req.model,
        "choices": [],
        "usage": usage_body(req.prompt.count, completion_tokens, cached_tokens),
    }
