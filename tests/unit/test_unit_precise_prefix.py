"""token-producer and precise-prefix-cache-scorer, in process: parameters, tokens, scores, fallbacks."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

import igw.app.plugins  # noqa: F401  (registers every plugin type)
from igw.api.types import TOKENIZED_PROMPT_KEY, Endpoint, EndpointState, InferenceRequest, TokenizedPrompt
from igw.datalayer.kvevents.wire import AllBlocksCleared, BlockStored
from igw.framework.registry import PluginError, StaticHandle, create
from igw.framework.scheduling import SchedulingResult
from igw.parsing.token_producer import TokenProducer
from igw.scheduling.plugins.precise_prefix import KEYS_KEY, PrecisePrefixCacheScorer
from igw.scheduling.plugins.prefix_producer import MATCH_INFO_KEY, PrefixCacheMatchInfo
from igw_sim.hf_tokenizer import HFTokenizer

TOKENIZER = Path(__file__).resolve().parents[1] / "sim" / "data" / "hf-tokenizer"
A, B, C = "10.0.0.1:8000", "10.0.0.2:8000", "10.0.0.3:8000"


def state(address: str) -> EndpointState:
    host, _, port = address.rpartition(":")
    return EndpointState(Endpoint(address, host, int(port)))


CANDIDATES = [state(A), state(B), state(C)]


def request(body: dict[str, Any], *, path: str = "/v1/completions", model: str = "m") -> InferenceRequest:
    return InferenceRequest(request_id="r", model=model, path=path, body_size=10, body=body)


def producer(**params: Any) -> TokenProducer:
    plugin = create("token-producer", "token-producer", params)
    assert isinstance(plugin, TokenProducer)
    return plugin


def scorer(**params: Any) -> PrecisePrefixCacheScorer:
    params.setdefault("kvEvents", {"bind": "tcp://127.0.0.1:0"})
    plugin = create("precise-prefix-cache-scorer", "precise", params, StaticHandle(CANDIDATES))
    assert isinstance(plugin, PrecisePrefixCacheScorer)
    return plugin


# -- token-producer ------------------------------------------------------------------------------


def test_completion_and_chat_are_tokenized_like_the_simulated_engine() -> None:
    engine = HFTokenizer.load(TOKENIZER)
    p = producer(tokenizers={"m": str(TOKENIZER)})
    req = request({"model": "m", "prompt": "the river and the stone"})
    p.prepare(req, CANDIDATES)
    got = req.data[TOKENIZED_PROMPT_KEY]
    assert isinstance(got, TokenizedPrompt)
    assert list(got.token_ids) == engine.encode("the river and the stone", add_special_tokens=True)
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello there"}]
    chat = request({"model": "m", "messages": messages}, path="/v1/chat/completions")
    p.prepare(chat, CANDIDATES)
    rendered = engine.render_chat(messages, add_generation_prompt=True, template_kwargs=None)
    assert list(chat.data[TOKENIZED_PROMPT_KEY].token_ids) == engine.encode(rendered, add_special_tokens=False)


def test_adapters_use_the_base_tokenizer_and_are_named_salt_is_kept() -> None:
    p = producer(tokenizers={"base": str(TOKENIZER)}, loraAdapters={"sql": "base"})
    req = request({"model": "sql", "prompt": "select all", "cache_salt": "tenant-1"}, model="sql")
    p.prepare(req, CANDIDATES)
    got = req.data[TOKENIZED_PROMPT_KEY]
    assert (got.model, got.lora, got.cache_salt) == ("sql", "sql", "tenant-1")
    base = request({"model": "base", "prompt": "select all"}, model="base")
    p.prepare(base, CANDIDATES)
    assert base.data[TOKENIZED_PROMPT_KEY].lora is None


def test_missing_tokenizer_batches_and_token_prompts() -> None:
    p = producer(tokenizers={"other": str(TOKENIZER)})
    req = request({"model": "m", "prompt": "x"})
    p.prepare(req, CANDIDATES)
    assert TOKENIZED_PROMPT_KEY not in req.data
    assert p.missing == {"no-tokenizer": 1}
    q = producer(tokenizer=str(TOKENIZER))  # one directory for every model
    batch = request({"model": "m", "prompt": ["a", "b"]})
    q.prepare(batch, CANDIDATES)
    assert TOKENIZED_PROMPT_KEY not in batch.data
    assert q.missing == {"unsupported": 1}
    ids = request({"model": "m", "prompt": [5, 6, 7]})
    q.prepare(ids, CANDIDATES)
    assert list(ids.data[TOKENIZED_PROMPT_KEY].token_ids) == [5, 6, 7]


def test_a_broken_tokenizer_directory_is_refused_at_start_up(tmp_path: Path) -> None:
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"tokenizer\.json: not valid JSON"):
        producer(tokenizers={"m": str(tmp_path)})


# -- precise-prefix-cache-scorer -------------------------------------------------------------------


def _tokens(n: int, start: int = 100) -> list[int]:
    return list(range(start, start + n))


def _stored(tokens: list[int], *, block_size: int = 4, parent: int | None = None, first_hash: int = 1) -> BlockStored:
    blocks = len(tokens) // block_size
    return BlockStored(tuple(range(first_hash, first_hash + blocks)), parent, tuple(tokens), block_size)


def test_scores_the_longest_consecutive_run_each_endpoint_holds() -> None:
    s = scorer(blockSize=4, speculativeTTL=0)
    tokens = _tokens(16)  # 4 blocks
    s.index.apply(A, _stored(tokens))  # all 4
    s.index.apply(B, _stored(tokens[:8]))  # the first 2
    req = request({})
    req.data[TOKENIZED_PROMPT_KEY] = TokenizedPrompt(tokens, "m")
    assert s.score(req, CANDIDATES) == [1.0, 0.5, 0.0]
    s.index.apply(A, AllBlocksCleared())
    assert s.score(req, CANDIDATES) == [0.0, 0.5, 0.0]


def test_cpu_tier_blocks_count_less() -> None:
    s = scorer(blockSize=4, speculativeTTL=0, tierWeights={"gpu": 1.0, "cpu": 0.5})
    tokens = _tokens(8)
    s.index.apply(A, BlockStored((1, 2), None, tuple(tokens), 4, medium="CPU"))
    req = request({})
    req.data[TOKENIZED_PROMPT_KEY] = TokenizedPrompt(tokens, "m")
    assert s.score(req, CANDIDATES)[0] == pytest.approx(0.5)


def test_a_pick_is_speculatively_indexed_until_the_ttl() -> None:
    now = [0.0]
    plugin = create("precise-prefix-cache-scorer", "precise",
                    {"blockSize": 4, "speculativeTTL": "2s", "kvEvents": {"bind": "tcp://127.0.0.1:0"}},
                    StaticHandle(CANDIDATES, clock=lambda: now[0]))  # fmt: skip
    assert isinstance(plugin, PrecisePrefixCacheScorer)
    req = request({})
    req.data[TOKENIZED_PROMPT_KEY] = TokenizedPrompt(_tokens(12), "m")
    assert plugin.score(req, CANDIDATES) == [0.0, 0.0, 0.0]
    assert len(req.data[KEYS_KEY]) == 3
    plugin.pre_request(req, SchedulingResult(profile="default", endpoints=[CANDIDATES[2]]))
    again = request({})
    again.data[TOKENIZED_PROMPT_KEY] = TokenizedPrompt(_tokens(12), "m")
    assert plugin.score(again, CANDIDATES) == [0.0, 0.0, 1.0]
    now[0] = 2.5
    assert plugin.score(again, CANDIDATES) == [0.0, 0.0, 0.0]


def test_without_tokens_it_uses_the_approximate_index_and_counts_it() -> None:
    s = scorer()
    registry = CollectorRegistry()
    s.register_metrics(registry)
    req = request({})
    req.data[MATCH_INFO_KEY] = PrefixCacheMatchInfo(4, {B: 3}, 16, [1, 2, 3, 4])
    assert s.score(req, CANDIDATES) == [0.0, 0.75, 0.0]
    assert s.fallbacks == {"no-tokens": 1}
    assert registry.get_sample_value("igw_precise_prefix_fallbacks_total", {"reason": "no-tokens"}) == 1.0


def test_a_prefix_nobody_holds_goes_where_the_approximate_index_sent_it() -> None:
    s = scorer(blockSize=4, speculativeTTL=0)
    req = request({})
    req.data[TOKENIZED_PROMPT_KEY] = TokenizedPrompt(_tokens(16), "m")
    req.data[MATCH_INFO_KEY] = PrefixCacheMatchInfo(4, {B: 3}, 16, [1, 2, 3, 4])
    assert s.score(req, CANDIDATES) == [0.0, 0.75, 0.0]  # evicted everywhere: B is where it went
    assert s.fallbacks == {"no-holder": 1}
    s.index.apply(C, _stored(_tokens(8)))  # C really holds the first two blocks: that wins
    assert s.score(req, CANDIDATES) == [0.0, 0.0, 0.5]
    assert s.fallbacks == {"no-holder": 1}
    off = scorer(blockSize=4, speculativeTTL=0, unheldFallback=False)
    assert off.score(req, CANDIDATES) == [0.0, 0.0, 0.0]
    assert off.fallbacks == {}


def test_lora_requests_only_match_blocks_of_that_adapter() -> None:
    s = scorer(blockSize=4, speculativeTTL=0)
    tokens = _tokens(8)
    s.index.apply(A, BlockStored((1, 2), None, tuple(tokens), 4, lora_name="sql"))
    s.index.apply(B, _stored(tokens, first_hash=10))
    req = request({})
    req.data[TOKENIZED_PROMPT_KEY] = TokenizedPrompt(tokens, "sql", lora="sql")
    assert s.score(req, CANDIDATES) == [1.0, 0.0, 0.0]


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"kvEvents": {"bind": "tcp://127.0.0.1:1", "connect": "tcp://{host}:5557"}}, "not both"),
        ({"tierWeights": {"gpu": -1}}, "tierWeights"),
        ({"speculativeTTL": "-1s"}, "speculativeTTL"),
        ({"blockSize": 0}, "blockSize"),
        ({"tokenizerz": "x"}, "tokenizerz"),
    ],
)
def test_bad_parameters_are_named(params: dict[str, Any], message: str) -> None:
    with pytest.raises(PluginError, match=message):
        create("precise-prefix-cache-scorer", "precise", params, StaticHandle(CANDIDATES))


def test_the_subscriber_follows_the_pool() -> None:
    handle = StaticHandle(CANDIDATES)
    s = create("precise-prefix-cache-scorer", "precise",
               {"kvEvents": {"connect": "tcp://{host}:5557", "replay": "tcp://{host}:5558"}}, handle)  # fmt: skip
    assert isinstance(s, PrecisePrefixCacheScorer)
    assert s.subscriber is not None
    assert s.subscriber.accepts(A)
    assert not s.subscriber.accepts("10.9.9.9:8000")
    assert len(s.services()) == 1
