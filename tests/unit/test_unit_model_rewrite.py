"""Model rewrites on the wire: body rewriting and restoring the client's model name in responses."""

from __future__ import annotations

import itertools

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st

from igw.routing.model_rewrite import ModelRestorer, rewrite_body


def restore(chunks: list[bytes], requested: str, target: str) -> bytes:
    restorer = ModelRestorer(requested, target)
    out = [restorer.feed(c) for c in chunks[:-1]]
    out.append(restorer.feed(chunks[-1], end_of_stream=True))
    return b"".join(out)


def test_rewrite_body_changes_only_the_model() -> None:
    body = {"model": "alias", "messages": [{"role": "user", "content": "hi"}], "stream": True}
    assert orjson.loads(rewrite_body(body, "real-model")) == {**body, "model": "real-model"}


def test_restores_both_spellings_and_leaves_the_rest() -> None:
    target = b'{"id":"x","model":"real","choices":[{"text":"the model: real"}]}\n{"model": "real"}'
    assert restore([target], "alias", "real") == (
        b'{"id":"x","model":"alias","choices":[{"text":"the model: real"}]}\n{"model":"alias"}'
    )


def test_sse_stream_split_inside_the_pattern() -> None:
    events = b"".join(f'data: {{"id":"c","model":"real","choices":[{{"delta":{{"content":"{i}"}}}}]}}\n\n'.encode()
                      for i in range(5)) + b"data: [DONE]\n\n"  # fmt: skip
    expected = events.replace(b'"model":"real"', b'"model":"alias"')
    for size in (1, 3, 7, 16, 64):
        chunks = [events[i : i + size] for i in range(0, len(events), size)]
        assert restore(chunks, "alias", "real") == expected


def test_names_with_quotes_are_json_escaped() -> None:
    assert restore([b'{"model":"we\\"ird"}'], "nice", 'we"ird') == b'{"model":"nice"}'


@settings(max_examples=200, deadline=None)
@given(
    text=st.lists(st.sampled_from([b'"model":"tgt"', b'"model": "tgt"', b'"model"', b'"', b"tgt", b"x", b":", b" "]),
                  max_size=30),
    cuts=st.lists(st.integers(min_value=0, max_value=400), max_size=10),
)  # fmt: skip
def test_any_chunking_gives_the_same_bytes_as_one_chunk(text: list[bytes], cuts: list[int]) -> None:
    body = b"".join(text) or b"{}"
    whole = restore([body], "requested-model", "tgt")
    points = sorted({min(c, len(body)) for c in cuts} | {0, len(body)})
    chunks = [body[a:b] for a, b in itertools.pairwise(points)] or [body]
    assert restore(chunks, "requested-model", "tgt") == whole
