"""The simulator's toy tokenizer: lossless pieces, stable ids, and generated text that re-tokenizes 1:1."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from igw_sim import tokenizer


@given(st.text())
def test_pieces_join_back_to_the_text(text: str) -> None:
    assert "".join(tokenizer.pieces(text)) == text


@given(st.text())
def test_encode_gives_one_id_per_piece_in_range(text: str) -> None:
    ids = tokenizer.encode(text)
    assert len(ids) == len(tokenizer.pieces(text)) == tokenizer.count(text)
    assert all(tokenizer.FIRST_ID <= i < tokenizer.VOCAB_SIZE for i in ids)


def test_pieces_split_words_and_punctuation_with_leading_whitespace() -> None:
    assert tokenizer.pieces("Hello, world!  foo\n") == ["Hello", ",", " world", "!", "  foo", "\n"]


def test_ids_are_stable_across_runs() -> None:
    # Pinned values: ids must not depend on the process or PYTHONHASHSEED.
    assert tokenizer.encode("hi there") == [41397, 21457]
    assert tokenizer.encode(" there") == tokenizer.encode(" there")


@given(st.lists(st.sampled_from(tokenizer.GENERATION_WORDS)))
def test_any_concatenation_of_generated_pieces_retokenizes_one_to_one(words: list[str]) -> None:
    generated = [" " + w for w in words]
    assert tokenizer.pieces("".join(generated)) == generated


@given(st.integers(min_value=0, max_value=2**32), st.integers(min_value=0, max_value=200))
def test_generated_pieces_of_a_request_retokenize_to_their_count(seed: int, n: int) -> None:
    generated = [tokenizer.generated_piece(seed, i) for i in range(n)]
    assert tokenizer.count("".join(generated)) == n
    assert generated == [tokenizer.generated_piece(seed, i) for i in range(n)]


def test_generation_vocabulary_is_plain_words() -> None:
    assert len(tokenizer.GENERATION_WORDS) >= 200
    assert len(set(tokenizer.GENERATION_WORDS)) == len(tokenizer.GENERATION_WORDS)
    assert all(w.isalpha() and w.islower() for w in tokenizer.GENERATION_WORDS)


def test_chat_rendering_accepts_string_or_text_blocks() -> None:
    as_string = [{"role": "user", "content": "hello world"}]
    as_blocks = [{"role": "user", "content": [{"type": "text", "text": "hello "}, {"type": "text", "text": "world"}]}]
    rendered = tokenizer.render_chat(as_string)
    assert rendered == "<|user|>\nhello world\n<|assistant|>\n"
    assert tokenizer.render_chat(as_blocks) == rendered
    assert tokenizer.render_chat(as_string, add_generation_prompt=False) == "<|user|>\nhello world\n"


@pytest.mark.parametrize(
    "messages",
    [
        ["not an object"],
        [{"content": "no role"}],
        [{"role": "user", "content": 3}],
        [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}],
    ],
    ids=["not-object", "no-role", "int-content", "image-block"],
)
def test_chat_rendering_rejects_malformed_messages(messages: list[object]) -> None:
    with pytest.raises(tokenizer.ChatFormatError):
        tokenizer.render_chat(messages)
