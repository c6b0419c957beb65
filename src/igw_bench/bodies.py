"""Request bodies for ``igw bench overhead``: OpenAI chat requests of an exact size in bytes.

The text is drawn from a small vocabulary with a fixed seed, so a size always gives the same
body (and the same bytes on the wire for both arms).
"""

from __future__ import annotations

import random
from typing import Any

import orjson

from igw_bench.backend import MODEL

_WORDS = [
    "the",
    "model",
    "gateway",
    "routes",
    "each",
    "request",
    "to",
    "the",
    "server",
    "with",
    "the",
    "best",
    "cache",
    "and",
    "the",
    "shortest",
    "queue",
    "while",
    "tokens",
    "stream",
    "back",
    "through",
    "envoy",
    "to",
    "the",
    "client",
    "that",
    "asked",
    "a",
    "question",
    "about",
    "latency",
]


def _text(rng: random.Random, n_chars: int) -> str:
    words: list[str] = []
    size = 0
    while size < n_chars:
        word = rng.choice(_WORDS)
        words.append(word)
        size += len(word) + 1
    return " ".join(words)[:n_chars]


def chat_body(target_bytes: int, *, seed: int = 0, message_bytes: int = 1500) -> bytes:
    """A non-streaming OpenAI chat request of exactly ``target_bytes`` of JSON (ASCII only).

    Small bodies are a system and a user message; large ones are a long conversation of
    ~``message_bytes`` turns (like a multi-turn chat with history)."""
    rng = random.Random(seed)
    body: dict[str, Any] = {
        "model": MODEL,
        "messages": [{"role": "system", "content": "You are a helpful assistant."}],
        "max_tokens": 16,
        "temperature": 0,
        "stream": False,
    }
    messages: list[dict[str, str]] = body["messages"]
    role = "user"
    while len(orjson.dumps(body)) + message_bytes + 40 < target_bytes:
        messages.append({"role": role, "content": _text(rng, message_bytes)})
        role = "assistant" if role == "user" else "user"
    if role == "assistant":  # end on a user turn
        messages.append({"role": "assistant", "content": ""})
    messages.append({"role": "user", "content": ""})
    missing = target_bytes - len(orjson.dumps(body))
    if missing < 0:
        raise ValueError(f"body of {target_bytes} bytes is too small for a chat request")
    messages[-1]["content"] = _text(rng, missing)
    data = orjson.dumps(body)
    assert len(data) == target_bytes, (len(data), target_bytes)
    return data
