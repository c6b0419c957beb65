"""The approximate prefix cache: hash chains, the per-endpoint LRU index, the producer and the scorer.

Expected hashes are computed here with xxhash's streaming API, independently of the code under
test (which uses the one-shot ``xxh64_intdigest``).
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Sequence
from typing import Any

import orjson
import pytest
import xxhash
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from igw.api.types import Endpoint, EndpointMetrics, EndpointState, InferenceRequest
from igw.framework import registry
from igw.framework.scheduling import SchedulingResult, ScorerCategory
from igw.scheduling.plugins.prefix_index import PrefixIndex
from igw.scheduling.plugins.prefix_producer import (
    MATCH_INFO_KEY,
    ApproxPrefixCacheProducer,
    PrefixCacheMatchInfo,
    chain_reference,
    chain_rendered,
    reference_input,
    rendered_input,
)
from igw.scheduling.plugins.prefix_scorer import PrefixCacheScorer

COMPLETIONS = "/v1/completions"
CHAT = "/v1/chat/completions"

# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def xx(data: bytes, seed: int = 0) -> int:
    h = xxhash.xxh64(seed=seed)
    h.update(data)
    return h.intdigest()


def expected_reference(data: bytes, seed: int, block: int) -> list[int]:
    """The reference chain, written out the slow way: full blocks, then the partial tail."""
    if len(data) < block:
        return []
    out, prev = [], seed
    blocks = [data[i : i + block] for i in range(0, len(data), block)]
    for chunk in blocks:
        prev = xx(chunk + struct.pack("<Q", prev))
        out.append(prev)
    return out


def expected_rendered(data: bytes, seed: int, block: int) -> list[int]:
    out, prev = [], seed
    for i in range(len(data) // block):
        prev = xx(data[i * block : (i + 1) * block], seed=prev)
        out.append(prev)
    return out


def state(i: int, *, block_size: int | None = None, gpu_blocks: int | None = None) -> EndpointState:
    s = EndpointState(Endpoint(f"10.0.0.{i}:8000", f"10.0.0.{i}", 8000))
    s.metrics = EndpointMetrics(block_size=block_size, num_gpu_blocks=gpu_blocks, scraped_at=1.0)
    return s


def request(
    body: dict[str, Any] | None,
    path: str = COMPLETIONS,
    *,
    model: str = "m",
    prompt_text: str | None = None,
    target_model: str | None = None,
) -> InferenceRequest:
    return InferenceRequest(
        request_id="r",
        model=model,
        path=path,
        body_size=0,
        body=body,
        prompt_text=prompt_text,
        target_model=target_model,
    )


def completion(prompt: str, **body: Any) -> InferenceRequest:
    return request({"model": "m", "prompt": prompt, **body})


def chat(messages: list[dict[str, Any]], **body: Any) -> InferenceRequest:
    return request({"model": "m", "messages": messages, **body}, CHAT)


def producer(**kwargs: Any) -> ApproxPrefixCacheProducer:
    kwargs.setdefault("auto_tune", False)
    return ApproxPrefixCacheProducer(**kwargs)


def pick(req: InferenceRequest, target: EndpointState) -> SchedulingResult:
    return SchedulingResult(profile="default", endpoints=[target])


SEED_M = xx(b"m")


# --------------------------------------------------------------------------------------------
# hash chains
# --------------------------------------------------------------------------------------------


def test_reference_chain_by_hand() -> None:
    prompt = "a" * 64 + "b" * 64 + "c" * 10
    h1 = xx(b"a" * 64 + SEED_M.to_bytes(8, "little"))
    h2 = xx(b"b" * 64 + h1.to_bytes(8, "little"))
    h3 = xx(b"c" * 10 + h2.to_bytes(8, "little"))
    assert producer(hash_scheme="reference").hash_request(completion(prompt), 16) == [h1, h2, h3]


def test_rendered_chain_by_hand_drops_the_partial_block() -> None:
    prompt = "a" * 64 + "b" * 64 + "c" * 10
    h1 = xx(b"a" * 64, seed=SEED_M)
    h2 = xx(b"b" * 64, seed=h1)
    assert producer(hash_scheme="rendered").hash_request(completion(prompt), 16) == [h1, h2]


@pytest.mark.parametrize(
    ("length", "reference", "rendered"),
    [(0, 0, 0), (1, 0, 0), (63, 0, 0), (64, 1, 1), (65, 2, 1), (127, 2, 1), (128, 2, 2), (129, 3, 2)],
)
def test_block_boundaries(length: int, reference: int, rendered: int) -> None:
    data = bytes(range(256)) * 2
    data = data[:length]
    ref = chain_reference(data, 7, 64)
    ren = chain_rendered(data, 7, 64)
    assert len(ref) == reference
    assert len(ren) == rendered
    assert ref == expected_reference(data, 7, 64)
    assert ren == expected_rendered(data, 7, 64)


@pytest.mark.parametrize("scheme", ["reference", "rendered"])
def test_model_and_cache_salt_seed_the_chain(scheme: str) -> None:
    p = producer(hash_scheme=scheme)
    text = "x" * 128
    plain = p.hash_request(completion(text), 16)
    salted = p.hash_request(completion(text, cache_salt="tenant-a"), 16)
    other_model = p.hash_request(request({"model": "m2", "prompt": text}, model="m2"), 16)
    rewritten = p.hash_request(request({"model": "m", "prompt": text}, target_model="m2"), 16)
    assert len({plain[0], salted[0], other_model[0]}) == 3
    assert rewritten == other_model  # the *target* model seeds the chain
    chain = expected_reference if scheme == "reference" else expected_rendered
    assert plain == chain(text.encode(), xx(b"m"), 64)
    assert salted == chain(text.encode(), xx(b"mtenant-a"), 64)
    # a salt that is not a string is ignored
    assert p.hash_request(completion(text, cache_salt=7), 16) == plain


@pytest.mark.parametrize("scheme", ["reference", "rendered"])
def test_at_most_max_prefix_blocks(scheme: str) -> None:
    p = producer(hash_scheme=scheme, max_prefix_blocks=3)
    long = "".join(chr(ord("a") + i) * 64 for i in range(10)) + "tail"
    hashes = p.hash_request(completion(long), 16)
    assert len(hashes) == 3  # truncated to exactly 3 blocks: no partial block either way
    assert hashes == producer(hash_scheme=scheme).hash_request(completion(long[: 3 * 64]), 16)


def test_block_size_scales_the_block_bytes() -> None:
    p = producer(hash_scheme="rendered")
    text = "y" * 256
    assert len(p.hash_request(completion(text), 16)) == 4
    assert len(p.hash_request(completion(text), 32)) == 2
    assert p.hash_request(completion(text), 32) == expected_rendered(text.encode(), SEED_M, 128)


def test_multibyte_text_is_cut_in_bytes() -> None:
    text = "é" * 100  # 200 bytes
    assert reference_input(completion(text), 64) == text.encode()[:64]
    hashes = producer(hash_scheme="reference").hash_request(completion(text), 16)
    assert hashes == expected_reference(text.encode(), SEED_M, 64)


def test_reference_chat_is_the_json_of_messages() -> None:
    messages = [{"role": "system", "content": "s" * 70}, {"role": "user", "content": "hello <world> & é"}]
    req = chat(messages, temperature=0.2)
    data = orjson.dumps(messages)
    assert reference_input(req, 10_000) == data
    assert producer(hash_scheme="reference").hash_request(req, 16) == expected_reference(data, SEED_M, 64)


@settings(max_examples=150, deadline=None)
@given(
    messages=st.lists(
        st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant"]), "content": st.text(max_size=40)}),
        min_size=1,
        max_size=6,
    ),
    limit=st.integers(min_value=1, max_value=400),
)
def test_reference_chat_stops_early_but_equals_the_whole_dump(messages: list[dict[str, Any]], limit: int) -> None:
    assert reference_input(chat(messages), limit) == orjson.dumps(messages)[:limit]


def test_reference_other_apis() -> None:
    tools = [{"type": "function", "name": "f"}]
    responses = request({"model": "m", "instructions": "be nice", "tools": tools, "input": "q"}, "/v1/responses")
    assert reference_input(responses, 10_000) == orjson.dumps(
        [{"instructions": "be nice"}, {"tools": tools}, {"input": "q"}]
    )
    bare = request({"model": "m", "input": [{"role": "user", "content": "q"}]}, "/v1/responses")
    assert reference_input(bare, 10_000) == orjson.dumps([{"input": [{"role": "user", "content": "q"}]}])
    items = [{"type": "message", "role": "user", "content": "hi"}]
    conversations = request({"model": "m", "items": items}, "/v1/conversations")
    assert reference_input(conversations, 10_000) == orjson.dumps(items)
    embeddings = request({"model": "m", "input": ["a", "b"]}, "/v1/embeddings")
    assert reference_input(embeddings, 10_000) == b'["a","b"]'
    tokens = request({"model": "m", "prompt": [1, 2, 3]})
    assert reference_input(tokens, 10_000) == b"[1,2,3]"


@pytest.mark.parametrize("scheme", ["reference", "rendered"])
def test_without_a_decoded_body_the_prompt_text_is_hashed(scheme: str) -> None:
    text = "user\n" + "z" * 200 + "\n"
    req = request(None, CHAT, prompt_text=text)
    chain = expected_reference if scheme == "reference" else expected_rendered
    assert producer(hash_scheme=scheme).hash_request(req, 16) == chain(text.encode(), SEED_M, 64)
    assert producer(hash_scheme=scheme).hash_request(request(None, CHAT), 16) == []


def test_rendered_chat_text() -> None:
    req = chat(
        [
            {"role": "system", "content": "S"},
            {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
            {"role": "assistant", "content": None, "tool_calls": [{"id": "1", "function": {"name": "f"}}]},
        ]
    )
    assert rendered_input(req, 10_000) == (
        b"<|im_start|>system\nS<|im_end|>\n"
        b"<|im_start|>user\na\nb<|im_end|>\n"
        b'<|im_start|>assistant\n\n[{"id":"1","function":{"name":"f"}}]<|im_end|>\n'
    )
    with_tools = chat([{"role": "user", "content": "q"}], tools=[{"type": "function"}])
    assert rendered_input(with_tools, 10_000) == (
        b'<|im_start|>tools\n[{"type":"function"}]<|im_end|>\n<|im_start|>user\nq<|im_end|>\n'
    )


def test_rendered_images_become_digests() -> None:
    def image(url: str) -> InferenceRequest:
        return chat([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}]}])

    a, b = rendered_input(image("data:image/png;base64," + "A" * 5000), 10_000), rendered_input(image("u2"), 10_000)
    assert a != b
    assert len(a) < 100  # the 5 KB data URL is not hashed byte by byte
    assert a == rendered_input(image("data:image/png;base64," + "A" * 5000), 10_000)


def test_rendered_ignores_json_layout_and_non_prompt_fields() -> None:
    content = "You are a careful assistant. " * 10
    raw_a = '{"model": "m", "messages": [{"role": "system", "content": "CONTENT"}, {"role": "user", "content": "hi"}]}'
    raw_b = (
        '{\n  "temperature": 0.7,\n  "messages": [\n    {"content": "CONTENT",\n     "role": "system"},\n'
        '    {"name": "bob", "content": "hi", "role": "user"}\n  ],\n  "model": "m"\n}'
    )
    a = request(orjson.loads(raw_a.replace("CONTENT", content)), CHAT)
    b = request(orjson.loads(raw_b.replace("CONTENT", content)), CHAT)
    rendered = producer(hash_scheme="rendered")
    reference = producer(hash_scheme="reference")
    assert len(rendered.hash_request(a, 16)) >= 4
    assert rendered.hash_request(a, 16) == rendered.hash_request(b, 16)
    assert reference.hash_request(a, 16)[0] != reference.hash_request(b, 16)[0]


def test_rendered_next_turn_extends_the_previous_chain() -> None:
    turn1 = [{"role": "system", "content": "s" * 100}, {"role": "user", "content": "u" * 90}]
    turn2 = [*turn1, {"role": "assistant", "content": "a" * 50}, {"role": "user", "content": "more"}]
    rendered = producer(hash_scheme="rendered")
    first, second = rendered.hash_request(chat(turn1), 16), rendered.hash_request(chat(turn2), 16)
    assert second[: len(first)] == first  # every block of turn 1 is reusable
    reference = producer(hash_scheme="reference")
    first, second = reference.hash_request(chat(turn1), 16), reference.hash_request(chat(turn2), 16)
    assert first[-1] not in second  # the partial tail block of turn 1 never matches again


def test_rendered_responses_and_conversations() -> None:
    responses = request({"model": "m", "instructions": "I", "input": "Q"}, "/v1/responses")
    assert rendered_input(responses, 10_000) == b"<|im_start|>system\nI<|im_end|>\n<|im_start|>user\nQ<|im_end|>\n"
    items = [
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "hi"}]},
        {"type": "function_call", "name": "f", "arguments": "{}"},
    ]
    conversations = request({"model": "m", "items": items}, "/v1/conversations")
    assert rendered_input(conversations, 10_000) == (
        b"<|im_start|>user\nhi<|im_end|>\n"
        b'<|im_start|>function_call\n{"type":"function_call","name":"f","arguments":"{}"}<|im_end|>\n'
    )
    embeddings = request({"model": "m", "input": "e" * 70}, "/v1/embeddings")
    assert rendered_input(embeddings, 10_000) == b"e" * 70


def test_rendered_stops_rendering_once_there_is_enough() -> None:
    messages = [{"role": "user", "content": "x" * 1000}] * 50
    data = rendered_input(chat(messages), 256)
    assert len(data) == 256
    assert data == rendered_input(chat(messages[:1]), 256)


# --------------------------------------------------------------------------------------------
# the index
# --------------------------------------------------------------------------------------------


def chain_of(tokens: Sequence[int]) -> list[int]:
    """A hash chain over one "token" per block (prefix-determined, like the real one)."""
    out, prev = [], 0
    for t in tokens:
        prev = xx(t.to_bytes(4, "little"), seed=prev)
        out.append(prev)
    return out


def test_lru_evicts_tails_before_heads_and_touch_refreshes() -> None:
    a, b, c, d = chain_of([1, 2]), chain_of([3, 4]), chain_of([5]), chain_of([6])
    index = PrefixIndex(4)
    index.add("e", a)
    index.add("e", b)
    assert index.blocks("e") == [a[1], a[0], b[1], b[0]]  # tail first: the head is most recent
    index.add("e", c)
    assert index.blocks("e") == [a[0], b[1], b[0], c[0]]  # a's tail went first, its head stays
    assert index.match(a) == {"e": 1}
    index.add("e", a[:1])  # touch a's head
    index.add("e", d)
    assert index.blocks("e") == [b[0], c[0], a[0], d[0]]
    assert index.match(b) == {"e": 1}
    index.check_consistency()


def test_a_chain_longer_than_the_capacity_keeps_its_head() -> None:
    chain = chain_of(range(10))
    index = PrefixIndex(3)
    index.add("e", chain)
    assert index.blocks("e") == [chain[2], chain[1], chain[0]]
    assert index.match(chain) == {"e": 3}
    assert index.size == 3
    index.check_consistency()


def test_match_is_the_longest_consecutive_prefix() -> None:
    shared = chain_of([1, 2, 3, 4, 5, 6])
    index = PrefixIndex(100)
    index.add("a", shared)
    index.add("b", shared[:2])
    index.add("c", chain_of([9, 9]))
    index.add("d", shared[:4])
    assert index.match(shared) == {"a": 6, "b": 2, "d": 4}
    assert index.match(shared[:3]) == {"a": 3, "b": 2, "d": 3}
    assert index.match(chain_of([1, 2, 7])) == {"a": 2, "b": 2, "d": 2}
    assert index.match(chain_of([7])) == {}
    assert index.match([]) == {}
    assert index.holders(shared[2]) == {"a", "d"}


def test_remove_endpoint_purges_it_and_reuses_its_id() -> None:
    index = PrefixIndex(100)
    chain = chain_of([1, 2, 3])
    for e in ("a", "b", "c"):
        index.add(e, chain)
    assert index.size == 9
    assert index.remove_endpoint("b")
    assert not index.remove_endpoint("b")
    assert index.size == 6
    assert index.match(chain) == {"a": 3, "c": 3}
    assert index.holders(chain[0]) == {"a", "c"}
    index.check_consistency()
    index.add("new", chain[:1])  # takes b's freed id
    assert index.match(chain) == {"a": 3, "c": 3, "new": 1}
    assert index.retain({"new"}) == ["a", "c"]
    assert index.match(chain) == {"new": 1}
    assert index.size == 1
    index.check_consistency()
    index.clear()
    assert (index.size, index.heads, index.endpoints()) == (0, 0, [])


def test_capacity_per_endpoint_can_change() -> None:
    index = PrefixIndex(10)
    chain = chain_of(range(8))
    index.add("a", chain)
    index.add("b", chain, capacity=4)
    assert (index.capacity("a"), index.capacity("b"), index.capacity("z")) == (10, 4, None)
    assert index.match(chain) == {"a": 8, "b": 4}
    index.set_capacity("a", 5)
    assert index.entries("a") == 5
    assert index.match(chain) == {"a": 5, "b": 4}
    index.add("b", chain, capacity=6)
    assert index.match(chain) == {"a": 5, "b": 6}
    index.set_capacity("fresh", 2)
    assert index.capacity("fresh") == 2
    with pytest.raises(ValueError, match="at least 1"):
        index.set_capacity("a", 0)
    with pytest.raises(ValueError, match="at least 1"):
        PrefixIndex(0)
    index.check_consistency()


class NaiveIndex:
    """Lists as LRUs, linear walks: the model the real index must agree with."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.lrus: dict[str, list[int]] = {}
        self.caps: dict[str, int] = {}

    def add(self, endpoint: str, hashes: list[int], capacity: int | None) -> None:
        if endpoint not in self.lrus:
            self.lrus[endpoint] = []
            self.caps[endpoint] = capacity or self.capacity
        elif capacity:
            self.caps[endpoint] = capacity
        lru = self.lrus[endpoint]
        for h in reversed(hashes):
            if h in lru:
                lru.remove(h)
            lru.append(h)
        del lru[: max(0, len(lru) - self.caps[endpoint])]

    def set_capacity(self, endpoint: str, capacity: int) -> None:
        self.caps[endpoint] = capacity
        lru = self.lrus.setdefault(endpoint, [])
        del lru[: max(0, len(lru) - capacity)]

    def remove(self, endpoint: str) -> None:
        self.lrus.pop(endpoint, None)
        self.caps.pop(endpoint, None)

    def match(self, hashes: list[int]) -> dict[str, int]:
        """The brief's definition: walk in order, intersecting with the holders of every hash."""
        out: dict[str, int] = {}
        active = {e for e, lru in self.lrus.items() if hashes and hashes[0] in lru}
        for i, h in enumerate(hashes):
            still = {e for e in active if h in self.lrus[e]}
            for e in active - still:
                out[e] = i
            active = still
            if not active:
                break
        for e in active:
            out[e] = len(hashes)
        return out


ENDPOINTS = ["a", "b", "c", "d"]
PROMPTS = st.lists(st.integers(min_value=0, max_value=2), min_size=1, max_size=7)  # a small prefix tree
OPERATIONS = st.lists(
    st.one_of(
        st.tuples(
            st.just("add"), st.sampled_from(ENDPOINTS), PROMPTS, st.none() | st.integers(min_value=1, max_value=12)
        ),
        st.tuples(st.just("remove"), st.sampled_from(ENDPOINTS)),
        st.tuples(st.just("capacity"), st.sampled_from(ENDPOINTS), st.integers(min_value=1, max_value=12)),
        st.tuples(st.just("match"), PROMPTS),
    ),
    max_size=60,
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(operations=OPERATIONS, capacity=st.integers(min_value=1, max_value=10))
def test_index_agrees_with_a_naive_model(operations: list[tuple[Any, ...]], capacity: int) -> None:
    index, naive = PrefixIndex(capacity), NaiveIndex(capacity)
    for op in operations:
        if op[0] == "add":
            _, endpoint, tokens, cap = op
            index.add(endpoint, chain_of(tokens), cap)
            naive.add(endpoint, chain_of(tokens), cap)
        elif op[0] == "remove":
            assert index.remove_endpoint(op[1]) == (op[1] in naive.lrus)
            naive.remove(op[1])
        elif op[0] == "capacity":
            index.set_capacity(op[1], op[2])
            naive.set_capacity(op[1], op[2])
        else:
            hashes = chain_of(op[1])
            assert index.match(hashes) == naive.match(hashes)
        index.check_consistency()
        for endpoint in ENDPOINTS:
            assert index.blocks(endpoint) == naive.lrus.get(endpoint, [])
        assert index.size == sum(map(len, naive.lrus.values()))
    for tokens in ([0], [0, 1, 2], [1, 1, 1, 1], [2, 0, 2, 0, 2, 0]):
        assert index.match(chain_of(tokens)) == naive.match(chain_of(tokens))


# --------------------------------------------------------------------------------------------
# the producer
# --------------------------------------------------------------------------------------------


class FakeHandle:
    def __init__(self, endpoints: list[EndpointState], now: list[float] | None = None) -> None:
        self.pool = endpoints
        self.now = now if now is not None else [0.0]
        self.listeners: list[Callable[[], None]] = []

    @property
    def clock(self) -> Callable[[], float]:
        return lambda: self.now[0]

    def endpoints(self) -> Sequence[EndpointState]:
        return self.pool

    def on_endpoints_change(self, listener: Callable[[], None]) -> None:
        self.listeners.append(listener)

    def plugin(self, name: str) -> None:
        return None

    def change(self, endpoints: list[EndpointState]) -> None:
        self.pool = endpoints
        for listener in self.listeners:
            listener()


def build(params: dict[str, Any] | None = None, handle: Any = None) -> ApproxPrefixCacheProducer:
    plugin = registry.create("approx-prefix-cache-producer", None, params or {}, handle)
    assert isinstance(plugin, ApproxPrefixCacheProducer)
    return plugin


LONG = "The quick brown fox jumps over the lazy dog. " * 30  # 1350 bytes: 21 blocks of 64


def test_prepare_then_pre_request_teaches_the_index() -> None:
    endpoints = [state(1), state(2), state(3)]
    p = build({"autoTune": False})
    scorer = PrefixCacheScorer()

    first = completion(LONG)
    p.prepare(first, endpoints)
    info = first.data[MATCH_INFO_KEY]
    assert isinstance(info, PrefixCacheMatchInfo)
    assert (info.total_blocks, info.matched, info.block_size_tokens) == (21, {}, 16)
    assert scorer.score(first, endpoints) == [0.0, 0.0, 0.0]
    p.pre_request(first, pick(first, endpoints[1]))
    assert p.indexer_size == 21

    again = completion(LONG)
    p.prepare(again, endpoints)
    assert again.data[MATCH_INFO_KEY].matched == {endpoints[1].address: 21}
    assert scorer.score(again, endpoints) == [0.0, 1.0, 0.0]

    shorter_tail = completion(LONG[:640] + "something else entirely, " * 20)
    p.prepare(shorter_tail, endpoints)
    scores = scorer.score(shorter_tail, endpoints)
    total = shorter_tail.data[MATCH_INFO_KEY].total_blocks
    assert scores == [0.0, pytest.approx(10 / total), 0.0]

    assert p.lookups == 3
    assert p.recorded == 1
    assert p.hit_ratio() == 0.0
    p.pre_request(again, pick(again, endpoints[1]))
    assert (p.recorded, p.hit_blocks, p.total_blocks) == (2, 21, 42)
    assert p.hit_ratio() == 0.5


def test_short_prompts_have_no_blocks_and_score_zero() -> None:
    p = build({"autoTune": False})
    req = completion("too short")
    p.prepare(req, [state(1)])
    assert req.data[MATCH_INFO_KEY].total_blocks == 0
    p.pre_request(req, pick(req, state(1)))
    assert p.indexer_size == 0
    assert p.lookups == 0
    assert PrefixCacheScorer().score(req, [state(1)]) == [0.0]


def test_on_match_reports_bytes() -> None:
    p = build({"autoTune": False, "hashScheme": "rendered"})
    seen: list[tuple[int, int]] = []
    p.on_match = lambda hit, total: seen.append((hit, total))
    target = state(1)
    for _ in range(2):
        req = completion(LONG)
        p.prepare(req, [target])
        p.pre_request(req, pick(req, target))
    assert seen == [(0, 21 * 64), (21 * 64, 21 * 64)]


def test_pre_request_without_prepare_or_pick_does_nothing() -> None:
    p = build({"autoTune": False})
    req = completion(LONG)
    p.pre_request(req, pick(req, state(1)))  # no data
    p.prepare(req, [state(1)])
    p.pre_request(req, SchedulingResult(profile="default", endpoints=[]))
    assert p.indexer_size == 0


def test_auto_tune_block_size_from_agreeing_candidates() -> None:
    handle = FakeHandle([])
    p = build({}, handle)
    req = completion(LONG)
    p.prepare(req, [state(1, block_size=32), state(2, block_size=32), state(3)])
    assert req.data[MATCH_INFO_KEY].block_size_tokens == 32
    assert req.data[MATCH_INFO_KEY].total_blocks == 10  # 1350 bytes / 128, full blocks
    handle.now[0] += 2.0
    disagree = completion(LONG)
    p.prepare(disagree, [state(1, block_size=32), state(2, block_size=64), state(3)])
    assert disagree.data[MATCH_INFO_KEY].block_size_tokens == 16
    handle.now[0] += 2.0
    unknown = completion(LONG)
    p.prepare(unknown, [state(1), state(2), state(3)])
    assert unknown.data[MATCH_INFO_KEY].block_size_tokens == 16


def test_auto_tune_block_size_is_cached_for_a_second() -> None:
    handle = FakeHandle([])
    p = build({}, handle)
    endpoints = [state(1, block_size=32), state(2, block_size=32)]
    req = completion(LONG)
    p.prepare(req, endpoints)
    endpoints[0].metrics = endpoints[1].metrics = EndpointMetrics(block_size=64)
    req = completion(LONG)
    p.prepare(req, endpoints)
    assert req.data[MATCH_INFO_KEY].block_size_tokens == 32
    p.prepare(req, [*endpoints, state(3)])  # a different number of candidates: look again
    assert req.data[MATCH_INFO_KEY].block_size_tokens == 64
    handle.now[0] += 1.5
    p.prepare(req, [state(1, block_size=16), state(2, block_size=16), state(3)])
    assert req.data[MATCH_INFO_KEY].block_size_tokens == 16


def test_auto_tune_capacity_from_num_gpu_blocks() -> None:
    p = build({"lruCapacityPerServer": 50})
    small, plain = state(1, gpu_blocks=5), state(2)
    req = completion(LONG)
    p.prepare(req, [small, plain])
    p.pre_request(req, pick(req, small))
    p.pre_request(req, pick(req, plain))
    assert p.index.capacity(small.address) == 5
    assert p.index.capacity(plain.address) == 50
    assert p.index.entries(small.address) == 5
    again = completion(LONG)
    p.prepare(again, [small, plain])
    assert again.data[MATCH_INFO_KEY].matched == {small.address: 5, plain.address: 21}

    fixed = build({"autoTune": False, "lruCapacityPerServer": 50})
    fixed.prepare(req, [small])
    fixed.pre_request(req, pick(req, small))
    assert fixed.index.capacity(small.address) == 50


def test_endpoints_leaving_the_pool_are_purged() -> None:
    a, b = state(1), state(2)
    handle = FakeHandle([a, b])
    p = build({"autoTune": False}, handle)
    assert len(handle.listeners) == 1
    for target in (a, b):
        req = completion(LONG)
        p.prepare(req, [a, b])
        p.pre_request(req, pick(req, target))
    assert p.indexer_size == 42
    late = completion(LONG)
    p.prepare(late, [a, b])
    handle.change([a])
    assert p.indexer_size == 21
    assert p.index.endpoints() == [a.address]
    p.pre_request(late, pick(late, b))  # picked before b left: not recorded
    assert p.index.endpoints() == [a.address]
    req = completion(LONG)
    p.prepare(req, [a])
    assert req.data[MATCH_INFO_KEY].matched == {a.address: 21}


def test_endpoints_are_accepted_until_the_pool_is_known() -> None:
    handle = FakeHandle([])
    p = build({"autoTune": False}, handle)
    req = completion(LONG)
    p.prepare(req, [state(1)])
    p.pre_request(req, pick(req, state(1)))
    assert p.indexer_size == 21
    handle.change([state(2)])
    assert p.indexer_size == 0


# --------------------------------------------------------------------------------------------
# parameters
# --------------------------------------------------------------------------------------------


def test_producer_defaults_and_describe() -> None:
    p = build()
    assert p.describe() == {
        "blockSizeTokens": 16,
        "maxPrefixBlocksToMatch": 256,
        "lruCapacityPerServer": 31_250,
        "autoTune": True,
        "hashScheme": "rendered",
    }
    assert p.produces == frozenset({MATCH_INFO_KEY})
    custom = build(
        {
            "blockSizeTokens": 32,
            "maxPrefixBlocksToMatch": 64,
            "lruCapacityPerServer": 1000,
            "autoTune": False,
            "hashScheme": "reference",
        }
    )
    assert custom.describe() == {
        "blockSizeTokens": 32,
        "maxPrefixBlocksToMatch": 64,
        "lruCapacityPerServer": 1000,
        "autoTune": False,
        "hashScheme": "reference",
    }
    assert custom.index.default_capacity == 1000


@pytest.mark.parametrize(
    ("params", "needle"),
    [
        ({"blockSize": 64}, "blockSizeTokens"),
        ({"blockSize": 64, "blockSizeTokens": 16}, "deprecated"),
        ({"blockSizeTokens": 0}, "blockSizeTokens"),
        ({"maxPrefixBlocksToMatch": 0}, "maxPrefixBlocksToMatch"),
        ({"lruCapacityPerServer": -1}, "lruCapacityPerServer"),
        ({"hashScheme": "sha256"}, "hashScheme"),
        ({"autoTune": "maybe"}, "autoTune"),
        ({"prefixCacheSize": 10}, "prefixCacheSize"),
    ],
)
def test_producer_bad_parameters(params: dict[str, Any], needle: str) -> None:
    with pytest.raises(registry.PluginError, match=needle):
        build(params)


def test_producer_constructor_checks() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        ApproxPrefixCacheProducer(block_size_tokens=0)
    with pytest.raises(ValueError, match="hashScheme"):
        ApproxPrefixCacheProducer(hash_scheme="md5")  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------
# the scorer
# --------------------------------------------------------------------------------------------


def test_scorer_contract() -> None:
    scorer = registry.create("prefix-cache-scorer")
    assert isinstance(scorer, PrefixCacheScorer)
    assert scorer.category is ScorerCategory.AFFINITY
    assert scorer.consumes == {"PrefixCacheMatchInfo": "approx-prefix-cache-producer"}
    assert scorer.describe() == {}
    endpoints = [state(1), state(2), state(3)]
    req = completion("x")
    assert scorer.score(req, endpoints) == [0.0, 0.0, 0.0]  # no data
    req.data[MATCH_INFO_KEY] = PrefixCacheMatchInfo(0, {}, 16, [])
    assert scorer.score(req, endpoints) == [0.0, 0.0, 0.0]  # no blocks
    req.data[MATCH_INFO_KEY] = PrefixCacheMatchInfo(8, {endpoints[0].address: 8, endpoints[2].address: 2}, 16, [])
    assert scorer.score(req, endpoints) == [1.0, 0.0, 0.25]
    req.data[MATCH_INFO_KEY] = {"not": "ours"}
    assert scorer.score(req, endpoints) == [0.0, 0.0, 0.0]


def test_scorer_keeps_legacy_producer_parameters() -> None:
    scorer = registry.create(
        "prefix-cache-scorer", "legacy", {"maxPrefixBlocksToMatch": 128, "lruCapacityPerServer": 1000}
    )
    assert isinstance(scorer, PrefixCacheScorer)
    assert scorer.producer_params == {"maxPrefixBlocksToMatch": 128, "lruCapacityPerServer": 1000}
    assert scorer.describe() == {"producerParams": {"maxPrefixBlocksToMatch": 128, "lruCapacityPerServer": 1000}}
    # they are valid producer parameters as they stand
    assert build(dict(scorer.producer_params)).describe()["lruCapacityPerServer"] == 1000


@pytest.mark.parametrize(
    ("params", "needle"),
    [({"blockSize": 64}, "blockSizeTokens"), ({"weight": 2}, "weight"), ({"hashScheme": "x"}, "hashScheme")],
)
def test_scorer_bad_parameters(params: dict[str, Any], needle: str) -> None:
    with pytest.raises(registry.PluginError, match=needle):
        registry.create("prefix-cache-scorer", None, params)


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/responses", {"model": "m", "input": 5}),
        ("/v1/responses", {"model": "m", "input": True}),
        ("/v1/responses", {"model": "m", "input": {"role": "user", "content": "x" * 200}}),
        (
            "/v1/chat/completions",
            {"model": "m", "messages": [{"role": "user", "content": [{"type": ["x"], "text": "y" * 200}]}]},
        ),
        ("/v1/chat/completions", {"model": "m", "messages": [{"role": "user", "content": [{"type": {"a": 1}}]}]}),
        ("/v1/chat/completions", {"model": "m", "messages": "not a list"}),
        ("/v1/conversations", {"model": "m", "items": 3}),
    ],
    ids=["int-input", "bool-input", "dict-input", "list-type", "dict-type", "string-messages", "int-items"],
)
@pytest.mark.parametrize("scheme", ["rendered", "reference"])
def test_odd_but_valid_json_bodies_hash_without_errors(path: str, body: dict[str, object], scheme: str) -> None:
    from igw.scheduling.plugins.prefix_producer import reference_input, rendered_input

    request = InferenceRequest(request_id="r", model="m", path=path, body_size=100, body=body)
    data = (rendered_input if scheme == "rendered" else reference_input)(request, 4096)
    assert isinstance(data, bytes)


def test_a_fallback_that_served_gets_the_blocks_recorded() -> None:
    prod = producer()
    a, b = state(1), state(2)
    first = completion("shared system prompt " * 40)
    prod.prepare(first, [a, b])
    prod.pre_request(first, pick(first, a))
    prod.on_response_headers(first, b.address, 200)  # the proxy fell back to b
    again = completion("shared system prompt " * 40)
    prod.prepare(again, [a, b])
    info = again.data["PrefixCacheMatchInfo"]
    assert info.matched.get(b.address) == info.total_blocks > 0
