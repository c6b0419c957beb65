"""Request bodies for the overhead benchmark: exact sizes, valid chat requests, deterministic."""

from __future__ import annotations

import orjson
import pytest

from igw_bench.bodies import chat_body


@pytest.mark.parametrize("size", [1024, 200 * 1024])
def test_chat_body_has_the_exact_size_and_is_a_chat_request(size: int) -> None:
    body = chat_body(size)
    assert len(body) == size
    data = orjson.loads(body)
    assert data["stream"] is False
    assert data["messages"][-1]["role"] == "user"


def test_chat_body_is_the_same_for_the_same_seed() -> None:
    assert chat_body(4096) == chat_body(4096)
    assert chat_body(4096, seed=1) != chat_body(4096)


def test_chat_body_rejects_a_size_too_small_for_a_request() -> None:
    with pytest.raises(ValueError, match="too small"):
        chat_body(50)
