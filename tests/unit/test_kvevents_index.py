"""KVBlockIndex: request keys from real vLLM events, chaining, removal, tiers, speculation, memory bounds."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import msgpack
import pytest

from igw.datalayer.kvevents.index import KVBlockIndex, PrefixMatch
from igw.datalayer.kvevents.wire import AllBlocksCleared, BlockRemoved, BlockStored, KVEvent, decode_event

DATA = Path(__file__).parents[1] / "sim" / "data" / "vllm-0.32-cpu"
EP, EP2, EP3 = "10.0.0.1:8000", "10.0.0.2:8000", "[fd00::3]:8000"
BS = 4


def _steps() -> list[dict[str, Any]]:
    steps: list[dict[str, Any]] = json.loads((DATA / "steps.json").read_text())["steps"]
    return steps


def _real(raw: dict[str, Any]) -> KVEvent:
    """A captured event as vLLM sent it (a msgpack map), through the wire decoder."""
    event = decode_event(msgpack.unpackb(msgpack.packb(raw)))
    assert event is not None
    return event


def _stored(hashes: list[int], tokens: list[int], parent: int | None = None, **kw: Any) -> BlockStored:
    return BlockStored(block_hashes=tuple(hashes), parent=parent, token_ids=tuple(tokens), block_size=BS, **kw)


TOKENS = list(range(100, 124))  # 6 blocks of 4


def _chain(index: KVBlockIndex, endpoint: str, n: int = 6, *, first_hash: int = 1, **kw: Any) -> list[int]:
    """Store the first n blocks of TOKENS on endpoint in one event; return the request keys."""
    index.apply(endpoint, _stored(list(range(first_hash, first_hash + n)), TOKENS[: n * BS], **kw))
    return index.request_keys(TOKENS[: n * BS], BS)


def _blocks(index: KVBlockIndex, keys: list[int], *candidates: str, **kw: Any) -> dict[str, int]:
    return {ep: m.blocks for ep, m in index.match_prefix(keys, candidates or (EP, EP2, EP3), **kw).items()}


# -- parity with a real engine -------------------------------------------------------------------------


def test_keys_of_a_real_chain_equal_request_keys() -> None:
    """A1 stores 11 blocks from the root; A2 chains 2 more from A1's 10th block (parent = engine hash)."""
    steps = _steps()
    a1, a2 = steps[0], steps[1]
    index = KVBlockIndex(hash_seed="0")
    (e1,) = (_real(e) for e in a1["events"])
    (e2,) = (_real(e) for e in a2["events"])
    assert isinstance(e1, BlockStored)
    assert isinstance(e2, BlockStored)
    assert e2.parent == e1.block_hashes[9]
    index.apply(EP, e1)
    index.apply(EP, e2)
    chain = [index.request_key_of(EP, h) for h in (*e1.block_hashes[:10], *e2.block_hashes)]
    assert chain == index.request_keys(a2["prompt_ids"], 32)[:12]
    assert [index.request_key_of(EP, h) for h in e1.block_hashes] == index.request_keys(a1["prompt_ids"], 32)
    assert index.block_size(EP) == 32


def test_chaining_across_batches_with_generated_tokens() -> None:
    """C: the prompt's block, then (next step) a block completed by generated tokens, chained to it."""
    step = next(s for s in _steps() if s["name"] == "C gen-block")
    first, second = (_real(e) for e in step["events"])
    assert isinstance(first, BlockStored)
    assert isinstance(second, BlockStored)
    assert second.parent == first.block_hashes[0]
    index = KVBlockIndex()
    index.apply(EP, first)
    index.apply(EP, second)
    tokens = [*first.token_ids, *second.token_ids]
    assert [index.request_key_of(EP, first.block_hashes[0]), index.request_key_of(EP, second.block_hashes[0])] == (
        index.request_keys(tokens, 32)
    )


def test_predicts_the_real_engines_cache_hits() -> None:
    """Replaying every captured step, the index's prefix match before each request equals the
    ``cached_tokens`` the real vLLM engine reported for it (LoRA, cache salt and evictions included)."""
    index = KVBlockIndex(hash_seed="0")
    checked = 0
    for step in _steps():
        lora = None if step["model"] == "tiny" else step["model"]
        keys = index.request_keys(step["prompt_ids"], 32, lora, cache_salt=step["cache_salt"])
        blocks = _blocks(index, keys, EP).get(EP, 0)
        usable = (len(step["prompt_ids"]) - 1) // 32  # vLLM always computes the last prompt token
        assert min(blocks, usable) * 32 == step["cached_tokens"], step["name"]
        checked += step["cached_tokens"] > 0
        for raw in step["events"]:
            index.apply(EP, _real(raw))
    assert checked >= 5
    assert index.unknown_parent_blocks == 0


@pytest.mark.parametrize(
    ("step_name", "lora", "salt"),
    [("A1 lora", "lora-a", None), ("A1 salt", None, "tenant-1")],
    ids=["lora", "cache-salt"],
)
def test_lora_and_salt_keys(step_name: str, lora: str | None, salt: str | None) -> None:
    step = next(s for s in _steps() if s["name"] == step_name)
    (event,) = (_real(e) for e in step["events"])
    assert isinstance(event, BlockStored)
    index = KVBlockIndex(hash_seed="0")
    index.apply(EP, event)
    own = index.request_keys(step["prompt_ids"], 32, lora, cache_salt=salt)
    assert [index.request_key_of(EP, h) for h in event.block_hashes] == own
    assert _blocks(index, own, EP) == {EP: 11}
    assert _blocks(index, index.request_keys(step["prompt_ids"], 32), EP) == {}  # the plain prompt: no false hit


# -- request keys --------------------------------------------------------------------------------------


def test_request_keys_full_blocks_only_and_prefix_stable() -> None:
    index = KVBlockIndex()
    keys = index.request_keys(TOKENS[:23], BS)
    assert len(keys) == 5
    assert keys == index.request_keys(TOKENS, BS)[:5]
    assert index.request_keys(TOKENS[:3], BS) == []
    assert len(set(keys)) == 5


def test_request_keys_depend_on_seed_lora_salt_and_tokens() -> None:
    base = KVBlockIndex().request_keys(TOKENS, BS)
    assert KVBlockIndex(hash_seed="other").request_keys(TOKENS, BS)[0] != base[0]
    assert KVBlockIndex().request_keys(TOKENS, BS, "ad")[0] != base[0]
    assert KVBlockIndex().request_keys(TOKENS, BS, "")[0] != base[0]  # an empty LoRA name is not the base model
    salted = KVBlockIndex().request_keys(TOKENS, BS, cache_salt="t")
    assert salted[0] != base[0]
    assert salted[1] != base[1]  # the salt, like any difference, carries down the chain
    changed = [*TOKENS[:5], 0, *TOKENS[6:]]
    other = KVBlockIndex().request_keys(changed, BS)
    assert other[0] == base[0]
    assert all(a != b for a, b in zip(other[1:], base[1:], strict=True))


def test_request_keys_token_ids_beyond_uint32() -> None:
    index = KVBlockIndex()
    tokens = [1, 2, 3, 2**40, 5, 6, 7, 8]
    keys = index.request_keys(tokens, BS)
    assert keys[1] == index.request_keys([*tokens[:4], 5, 6, 7, 8], BS)[1]
    assert keys != index.request_keys([1, 2, 3, 0, 5, 6, 7, 8], BS)
    index.apply(EP, _stored([1, 2], tokens))
    assert _blocks(index, keys, EP) == {EP: 2}


def test_request_keys_rejects_bad_block_size() -> None:
    with pytest.raises(ValueError, match="block_size"):
        KVBlockIndex().request_keys(TOKENS, 0)


# -- store / remove / clear ----------------------------------------------------------------------------


def test_store_then_match_longest_consecutive_prefix() -> None:
    index = KVBlockIndex()
    keys = _chain(index, EP, 6)
    _chain(index, EP2, 3, first_hash=50)
    assert _blocks(index, keys) == {EP: 6, EP2: 3}
    assert index.match(keys, [EP, EP2, EP3]) == {EP: 6.0, EP2: 3.0}
    assert _blocks(index, keys, EP2) == {EP2: 3}  # only the candidates


def test_a_missing_block_ends_the_prefix() -> None:
    index = KVBlockIndex()
    keys = _chain(index, EP, 6)
    index.apply(EP, BlockRemoved(block_hashes=(3,)))  # the third block
    assert _blocks(index, keys) == {EP: 2}
    assert _blocks(index, keys[3:]) == {EP: 3}  # the later blocks are still indexed


def test_stored_chains_from_the_parents_request_key() -> None:
    index = KVBlockIndex()
    index.apply(EP, _stored([1, 2], TOKENS[:8]))
    index.apply(EP, _stored([3, 4], TOKENS[8:16], parent=2))
    assert _blocks(index, index.request_keys(TOKENS, BS)) == {EP: 4}


def test_unknown_parent_is_not_indexed_and_counted() -> None:
    index = KVBlockIndex()
    index.apply(EP, _stored([3, 4], TOKENS[8:16], parent=999))
    assert index.unknown_parent_blocks == 2
    assert index.size == 0
    assert index.request_key_of(EP, 3) is None


def test_engine_hashes_are_per_endpoint() -> None:
    """The same engine hash on two endpoints: a removal on one does not touch the other."""
    index = KVBlockIndex()
    keys = _chain(index, EP, 2)
    _chain(index, EP2, 2)
    index.apply(EP, BlockRemoved(block_hashes=(1, 2)))
    assert _blocks(index, keys) == {EP2: 2}
    index.apply(EP2, _stored([7], TOKENS[8:12], parent=2))
    assert _blocks(index, index.request_keys(TOKENS[:12], BS)) == {EP2: 3}


def test_block_removed_unknown_hash_is_counted() -> None:
    index = KVBlockIndex()
    index.apply(EP, BlockRemoved(block_hashes=(5,)))
    _chain(index, EP, 1)
    index.apply(EP, BlockRemoved(block_hashes=(5, 1)))
    assert index.unknown_removed_blocks == 2
    assert index.size == 0


def test_all_blocks_cleared_and_remove_endpoint() -> None:
    index = KVBlockIndex()
    keys = _chain(index, EP, 4)
    _chain(index, EP2, 4)
    index.apply(EP, AllBlocksCleared())
    assert _blocks(index, keys) == {EP2: 4}
    assert index.block_size(EP) == BS  # learned sizes survive a cache reset
    assert index.request_key_of(EP, 1) is None
    index.remove_endpoint(EP2)
    assert index.size == 0
    assert index.stats().engine_hashes == 0
    assert index.endpoints() == [EP]
    index.remove_endpoint("never-seen:1")


def test_events_of_other_kv_cache_groups_are_ignored() -> None:
    index = KVBlockIndex()
    index.apply(EP, _stored([1, 2], TOKENS[:8], group_idx=1))
    assert index.size == 0
    keys = _chain(index, EP, 2)
    index.apply(EP, BlockRemoved(block_hashes=(1,), group_idx=1))
    assert _blocks(index, keys) == {EP: 2}


def test_blocks_without_tokens_are_counted() -> None:
    index = KVBlockIndex()
    index.apply(EP, _stored([1, 2, 3], TOKENS[:9]))  # 2 full blocks of tokens for 3 hashes
    assert index.untokenized_blocks == 1
    assert _blocks(index, index.request_keys(TOKENS, BS)) == {EP: 2}


def test_lora_id_only_never_matches_the_base_model() -> None:
    index = KVBlockIndex()
    index.apply(EP, _stored([1], TOKENS[:4], lora_id=7, extra_keys=((7,),)))
    assert _blocks(index, index.request_keys(TOKENS, BS)) == {}


def test_hash_reused_for_other_content_replaces_the_old_copy() -> None:
    index = KVBlockIndex()
    old = _chain(index, EP, 1)
    index.apply(EP, _stored([1], [9, 9, 9, 9]))
    assert _blocks(index, old) == {}
    assert _blocks(index, index.request_keys([9, 9, 9, 9], BS)) == {EP: 1}


def test_block_size_learning() -> None:
    index = KVBlockIndex()
    assert index.block_size(EP) is None
    index.apply(EP, BlockStored(block_hashes=(1,), parent=None, token_ids=tuple(range(16)), block_size=16))
    index.apply(EP2, _stored([1], TOKENS[:4]))
    assert index.block_sizes() == {EP: 16, EP2: BS}


# -- tiers ---------------------------------------------------------------------------------------------


def test_tiers_best_weight_per_block_and_case_insensitive_medium() -> None:
    index = KVBlockIndex()
    keys = _chain(index, EP, 4, medium="cpu")
    index.apply(EP, _stored([1, 2], TOKENS[:8], medium="GPU"))
    weights = {"gpu": 1.0, "cpu": 0.5}
    assert index.match(keys, [EP], weights) == {EP: 1.0 + 1.0 + 0.5 + 0.5}
    index.apply(EP, BlockRemoved(block_hashes=(1,), medium="Gpu"))
    assert index.match(keys, [EP], weights) == {EP: 0.5 + 1.0 + 0.5 + 0.5}
    index.apply(EP, BlockRemoved(block_hashes=(1,), medium="CPU"))
    assert index.match(keys, [EP], weights) == {}
    assert index.request_key_of(EP, 1) is None


def test_tiers_not_configured_do_not_count() -> None:
    index = KVBlockIndex()
    keys = _chain(index, EP, 2, medium="DISK")
    _chain(index, EP2, 2)
    assert index.match(keys, [EP, EP2], {"gpu": 2.0}) == {EP2: 4.0}
    assert index.match(keys, [EP, EP2], {"gpu": 2.0, "disk": 0.0}) == {EP: 0.0, EP2: 4.0}
    assert _blocks(index, keys, tier_weights={"disk": 0.25}) == {EP: 2}


# -- speculative entries -------------------------------------------------------------------------------


def test_speculative_entries_match_as_gpu_until_they_expire() -> None:
    index = KVBlockIndex(clock=lambda: 100.0)
    keys = index.request_keys(TOKENS, BS)
    index.add_speculative(EP, keys[:3], ttl_s=2.0, now=100.0)
    assert index.stats().speculative == 3
    assert index.match(keys, [EP, EP2], {"gpu": 1.0, "cpu": 0.5}) == {EP: 3.0}
    assert index.match(keys, [EP], now=101.9) == {EP: 3.0}
    assert index.match(keys, [EP], now=102.0) == {}
    index.expire(now=102.0)
    assert index.stats().speculative == 0
    assert index.size == 0


def test_speculation_extends_a_real_prefix() -> None:
    index = KVBlockIndex(clock=lambda: 0.0)
    _chain(index, EP, 2, medium="cpu")
    keys = index.request_keys(TOKENS, BS)
    index.add_speculative(EP, keys[:4], ttl_s=1.0)
    assert index.match(keys, [EP], {"gpu": 1.0, "cpu": 0.5}) == {EP: 4.0}  # speculative GPU beats real CPU


def test_a_real_store_confirms_a_speculative_entry() -> None:
    index = KVBlockIndex(clock=lambda: 0.0)
    keys = index.request_keys(TOKENS, BS)
    index.add_speculative(EP, keys[:2], ttl_s=1.0)
    _chain(index, EP, 2)
    assert index.stats().speculative == 0
    assert _blocks(index, keys, EP, now=5.0) == {EP: 2}  # real: no expiry
    index.add_speculative(EP, keys[:2], ttl_s=1.0)  # already really on the GPU: nothing to expect
    assert index.stats().speculative == 0


def test_removal_and_clear_drop_speculative_entries() -> None:
    index = KVBlockIndex(clock=lambda: 0.0)
    keys = _chain(index, EP, 2, medium="cpu")
    index.add_speculative(EP, keys, ttl_s=10.0)
    index.apply(EP, BlockRemoved(block_hashes=(2,), medium="cpu"))
    assert _blocks(index, keys, EP) == {EP: 1}
    index.add_speculative(EP2, keys, ttl_s=10.0)
    index.apply(EP2, AllBlocksCleared())
    assert _blocks(index, keys, EP2) == {}
    index.remove_endpoint(EP)
    assert index.stats() == index.stats().__class__(keys=0, endpoints=1, engine_hashes=0, speculative=0)


def test_re_adding_a_speculative_entry_extends_it() -> None:
    index = KVBlockIndex(clock=lambda: 0.0)
    keys = index.request_keys(TOKENS[:4], BS)
    index.add_speculative(EP, keys, ttl_s=1.0, now=0.0)
    index.add_speculative(EP, keys, ttl_s=1.0, now=0.5)
    index.expire(now=1.2)  # the first expiry is stale
    assert _blocks(index, keys, EP, now=1.2) == {EP: 1}


# -- bounded memory ------------------------------------------------------------------------------------


def test_keys_are_evicted_least_recently_stored_or_matched() -> None:
    index = KVBlockIndex(max_keys=4)
    keys = _chain(index, EP, 4)
    assert _blocks(index, keys[:2], EP) == {EP: 2}  # touches the first two
    index.apply(EP2, _stored([10, 11], [7] * 8))  # two new keys evict the two least recently used
    assert index.size == 4
    assert index.evicted_keys == 2
    assert _blocks(index, keys, EP) == {EP: 2}
    # The engine hashes survive: blocks stored later still chain from the evicted ones.
    index.apply(EP, _stored([5], TOKENS[16:20], parent=4))
    assert index.request_key_of(EP, 5) == index.request_keys(TOKENS, BS)[4]


def test_engine_hash_map_is_bounded_per_endpoint() -> None:
    index = KVBlockIndex(max_engine_hashes=3)
    keys = _chain(index, EP, 5)
    assert index.stats().engine_hashes == 3
    assert index.evicted_engine_hashes == 2
    # Dropping an engine hash drops its copy too (no removal could reach it any more).
    assert _blocks(index, keys[2:], EP) == {EP: 3}
    assert _blocks(index, keys, EP) == {}
    assert index.size == 3


def test_invalid_bounds() -> None:
    with pytest.raises(ValueError, match="positive"):
        KVBlockIndex(max_keys=0)


def test_prefix_match_value() -> None:
    index = KVBlockIndex()
    keys = _chain(index, EP, 2, medium="cpu")
    assert index.match_prefix(keys, [EP]) == {EP: PrefixMatch(blocks=2, score=1.6)}
