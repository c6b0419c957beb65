"""The OpenAI body parser: refusals name the problem; accepted bodies become InferenceRequests."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from igw.api.errors import BadRequest, ErrorCode
from igw.parsing.openai import parse_request

COMPLETIONS = "/v1/completions"
CHAT = "/v1/chat/completions"
EMBEDDINGS = "/v1/embeddings"


def parse(body: bytes | dict[str, Any] | list[Any], path: str = COMPLETIONS, headers: dict[str, str] | None = None):
    raw = body if isinstance(body, bytes) else orjson.dumps(body)
    return parse_request(raw, path=path, request_id="rid-1", headers=headers or {})


@pytest.mark.parametrize(
    ("body", "path", "needle"),
    [
        (b"", COMPLETIONS, "not valid JSON"),
        (b"{", COMPLETIONS, "not valid JSON"),
        (b"{'model': 'm'}", COMPLETIONS, "not valid JSON"),
        (b"\xff\xfe{}", COMPLETIONS, "not valid JSON"),
        (b'{"model": "m", "prompt": "x"} trailing', COMPLETIONS, "not valid JSON"),
        (b"[]", COMPLETIONS, "JSON object"),
        (b'"just a string"', COMPLETIONS, "JSON object"),
        (b"null", COMPLETIONS, "JSON object"),
        (b"42", COMPLETIONS, "JSON object"),
        ({"prompt": "hi"}, COMPLETIONS, "model"),
        ({"model": "", "prompt": "hi"}, COMPLETIONS, "model"),
        ({"model": None, "prompt": "hi"}, COMPLETIONS, "model"),
        ({"model": 7, "prompt": "hi"}, COMPLETIONS, "model"),
        ({"model": ["m"], "prompt": "hi"}, COMPLETIONS, "model"),
        ({"model": "m"}, COMPLETIONS, "'prompt'"),
        ({"model": "m", "prompt": ""}, COMPLETIONS, "'prompt'"),
        ({"model": "m", "prompt": []}, COMPLETIONS, "'prompt'"),
        ({"model": "m", "prompt": None}, COMPLETIONS, "'prompt'"),
        ({"model": "m"}, CHAT, "'messages'"),
        ({"model": "m", "messages": []}, CHAT, "'messages'"),
        ({"model": "m", "prompt": "x"}, CHAT, "'messages'"),
        ({"model": "m"}, EMBEDDINGS, "'input'"),
        ({"model": "m", "input": ""}, EMBEDDINGS, "'input'"),
        ({"model": "m"}, "/v1/responses", "'input'"),
        ({"model": "m", "items": []}, "/v1/conversations", "'items'"),
        ({"model": "m"}, "/v1/completions?stream=true", "'prompt'"),
        ({"model": "m"}, "/v1/chat/completions/", "'messages'"),
    ],
    ids=[
        "empty-body",
        "truncated",
        "single-quotes",
        "not-utf8",
        "trailing-garbage",
        "array",
        "string",
        "null",
        "number",
        "missing-model",
        "empty-model",
        "null-model",
        "int-model",
        "list-model",
        "completions-no-prompt",
        "completions-empty-prompt",
        "completions-empty-prompt-list",
        "completions-null-prompt",
        "chat-no-messages",
        "chat-empty-messages",
        "chat-with-prompt-only",
        "embeddings-no-input",
        "embeddings-empty-input",
        "responses-no-input",
        "conversations-empty-items",
        "query-string-ignored",
        "trailing-slash-ignored",
    ],
)
def test_bad_requests_name_the_problem(body: bytes | dict[str, Any], path: str, needle: str) -> None:
    with pytest.raises(BadRequest) as info:
        parse(body, path)
    assert needle in info.value.message
    assert info.value.code is ErrorCode.BAD_REQUEST


@pytest.mark.parametrize(
    ("body", "path", "expected"),
    [
        (
            {"model": "m", "prompt": "Hello"},
            COMPLETIONS,
            {"model": "m", "path": COMPLETIONS, "stream": False, "prompt_text": "Hello"},
        ),
        (
            {"model": "m", "prompt": ["a", "b"]},
            COMPLETIONS,
            {"model": "m", "stream": False, "prompt_text": None},
        ),
        (
            {"model": "m", "prompt": [1, 2, 3]},
            COMPLETIONS,
            {"model": "m", "prompt_text": None},
        ),
        (
            {"model": "m", "prompt": "x", "stream": True},
            COMPLETIONS,
            {"stream": True},
        ),
        ({"model": "m", "prompt": "x", "stream": "true"}, COMPLETIONS, {"stream": False}),
        ({"model": "m", "prompt": "x", "stream": 1}, COMPLETIONS, {"stream": False}),
        ({"model": "m", "prompt": "x", "stream": False}, COMPLETIONS, {"stream": False}),
        (
            {"model": "emb", "input": "some text"},
            EMBEDDINGS,
            {"model": "emb", "path": EMBEDDINGS, "prompt_text": None},
        ),
        ({"model": "emb", "input": ["a", "b"]}, EMBEDDINGS, {"model": "emb"}),
        ({"model": "emb", "input": [[1, 2], [3]]}, EMBEDDINGS, {"model": "emb"}),
        ({"model": "m", "input": "hi"}, "/v1/responses", {"path": "/v1/responses"}),
        ({"model": "m", "items": [{"type": "message"}]}, "/v1/conversations", {"path": "/v1/conversations"}),
        ({"model": "m"}, "/v1/models", {"path": "/v1/models", "prompt_text": None}),
        ({"model": "m", "prompt": "p"}, "/v1/completions?x=1", {"path": COMPLETIONS}),
        ({"model": "m", "prompt": "p"}, "/v1/completions/", {"path": COMPLETIONS}),
        ({"model": "m", "prompt": "p"}, "", {"path": ""}),
    ],
    ids=[
        "completions",
        "prompt-list",
        "prompt-token-ids",
        "stream-true",
        "stream-string-is-not-true",
        "stream-one-is-not-true",
        "stream-false",
        "embeddings",
        "embeddings-list",
        "embeddings-token-ids",
        "responses",
        "conversations",
        "unknown-path-no-required-field",
        "query-stripped",
        "trailing-slash-stripped",
        "no-path",
    ],
)
def test_accepted_requests(body: dict[str, Any], path: str, expected: dict[str, Any]) -> None:
    raw = orjson.dumps(body)
    req = parse_request(raw, path=path, request_id="rid-1", headers={"h": "v"})
    assert req.request_id == "rid-1"
    assert req.body_size == len(raw)
    assert req.headers == {"h": "v"}
    assert req.priority == 0
    for key, value in expected.items():
        assert getattr(req, key) == value, key


@pytest.mark.parametrize(
    ("messages", "expected"),
    [
        ([{"role": "user", "content": "Hi"}], "user\nHi\n"),
        (
            [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
            "system\nBe brief.\nuser\nHi\n",
        ),
        (
            [
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "Look at "},
                        {"type": "image_url", "image_url": {"url": "http://x/y.png"}},
                        {"type": "text", "text": "this"},
                    ],
                }
            ],
            "user\nLook at this\n",
        ),
        ([{"role": "user", "content": [{"type": "text", "text": 5}, "bare", {"text": "ok"}]}], "user\nok\n"),
        ([{"role": "assistant", "content": None}], "assistant\n\n"),
        ([{"role": "assistant"}], "assistant\n\n"),
        ([{"content": "no role"}], "\nno role\n"),
        (["not a dict", {"role": "user", "content": "x"}], "user\nx\n"),
        ([{"role": "user", "content": 12}], "user\n\n"),
    ],
    ids=[
        "string-content",
        "two-messages",
        "block-content",
        "odd-blocks",
        "null-content",
        "no-content",
        "no-role",
        "non-dict-message-skipped",
        "non-string-content",
    ],
)
def test_chat_prompt_text(messages: list[Any], expected: str) -> None:
    req = parse({"model": "m", "messages": messages}, CHAT)
    assert req.prompt_text == expected
    assert req.path == CHAT


def test_prompt_wins_over_messages_for_prompt_text() -> None:
    req = parse({"model": "m", "prompt": "p", "messages": [{"role": "user", "content": "x"}]})
    assert req.prompt_text == "p"


def test_unicode_model_and_prompt_round_trip() -> None:
    req = parse({"model": "modèle/🦙", "prompt": "héllo wörld"})
    assert (req.model, req.prompt_text) == ("modèle/🦙", "héllo wörld")
