"""The OpenAI-style body parser (the reference ``openai-parser``).

The API is chosen from the request path's suffix; each API has one required field beside
``model``. Every refusal is a :class:`~igw.api.errors.BadRequest` whose message names the
field, so a client can fix its request.
"""

from __future__ import annotations

from typing import Any

import orjson

from igw.api.errors import BadRequest
from igw.api.types import InferenceRequest
from igw.framework.registry import register
from igw.framework.requestcontrol import Parser

# (path suffix, field that must be present and non-empty)
_REQUIRED: tuple[tuple[str, str], ...] = (
    ("/chat/completions", "messages"),
    ("/completions", "prompt"),
    ("/embeddings", "input"),
    ("/responses", "input"),
    ("/conversations", "items"),
)


def parse_request(body: bytes, *, path: str, request_id: str, headers: dict[str, str]) -> InferenceRequest:
    try:
        data: Any = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise BadRequest(f"request body is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise BadRequest("request body must be a JSON object")
    model = data.get("model")
    if not isinstance(model, str) or not model:
        raise BadRequest("model not found in request body: the 'model' field must be a non-empty string")
    route = path.split("?", 1)[0].rstrip("/")
    for suffix, required in _REQUIRED:
        if route.endswith(suffix):
            value = data.get(required)
            if value is None or value == "" or value == []:
                raise BadRequest(f"{suffix.lstrip('/')} request needs a non-empty '{required}' field")
            break
    return InferenceRequest(
        request_id=request_id,
        model=model,
        path=route,
        body_size=len(body),
        stream=data.get("stream") is True,
        prompt_text=_prompt_text(data),
        headers=headers,
        body=data,
    )


@register
class OpenAIParser(Parser):
    """``openai-parser``: the default; OpenAI completions, chat, embeddings, responses, conversations."""

    type_name = "openai-parser"

    def parse(self, body: bytes, *, path: str, request_id: str, headers: dict[str, str]) -> InferenceRequest:
        return parse_request(body, path=path, request_id=request_id, headers=headers)


def _prompt_text(data: dict[str, Any]) -> str | None:
    prompt = data.get("prompt")
    if isinstance(prompt, str):
        return prompt
    messages = data.get("messages")
    if isinstance(messages, list):
        parts: list[str] = []
        for msg in messages:
            if not isinstance(msg, dict):
                continue
            content = msg.get("content")
            if isinstance(content, list):
                content = "".join(
                    b.get("text", "") for b in content if isinstance(b, dict) and isinstance(b.get("text"), str)
                )
            parts.append(f"{msg.get('role', '')}\n{content if isinstance(content, str) else ''}\n")
        return "".join(parts)
    return None
