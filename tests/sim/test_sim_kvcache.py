"""The paged KV cache: prefix hits, reference counts, LRU eviction order and the events, by hand."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from igw_sim.hashing import BlockHasher
from igw_sim.kvcache import KVCacheManager
from igw_sim.kvevents import AllBlocksCleared, BlockRemoved, BlockStored

HASHER = BlockHasher(algo="sha256_cbor", block_size=4)


@dataclass
class Req:
    request_id: str
    token_ids: list[int]
    num_computed_tokens: int = 0
    lora_name: str | None = None
    lora_id: int | None = None
    cache_salt: str | None = None
    block_hashes: list[bytes] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.block_hashes = HASHER.hash_prefix(self.token_ids)


def _h(tokens: list[int]) -> list[bytes]:
    return HASHER.hash_prefix(tokens)


def test_hits_share_blocks_and_eviction_takes_the_lru_front_tail_first() -> None:
    kv = KVCacheManager(num_blocks=5, block_size=4)
    assert kv.free_queue() == [1, 2, 3, 4]  # block 0 is vLLM's null block
    a = Req("a", list(range(1, 11)))  # 10 tokens: 2 full blocks + 2 tokens
    assert kv.get_computed_blocks(a) == ([], 0)
    assert kv.allocate_slots(a, 10)
    assert kv.block_ids("a") == [1, 2, 3]
    (stored,) = kv.take_events()
    assert stored == BlockStored(
        block_hashes=tuple(_h(a.token_ids)),
        parent_block_hash=None,
        token_ids=tuple(range(1, 9)),
        block_size=4,
        lora_id=None,
        lora_name=None,
        extra_keys=(None, None),
    )
    kv.free("a")
    # Freed in reverse order: the partial block 3 (no hash) to the front, to be reused first; the cached
    # ones behind the never-used block 4, a's tail first.
    assert kv.free_queue() == [3, 4, 2, 1]
    assert kv.usage == 0.0
    assert kv.num_cached_blocks == 2

    b = Req("b", [*range(1, 9), 99, 100])
    hits, tokens = kv.get_computed_blocks(b)
    assert ([blk.block_id for blk in hits], tokens) == ([1, 2], 8)
    b.num_computed_tokens = 0
    assert kv.allocate_slots(b, 2, hits)
    assert kv.block_ids("b") == [1, 2, 3]
    assert kv.take_events() == []  # hit blocks are not stored again; the tail is partial
    assert kv.usage == pytest.approx(0.75)  # of the 4 usable blocks

    c = Req("c", list(range(50, 62)))  # 12 tokens: needs 3 blocks, only block 4 is free
    assert not kv.allocate_slots(c, 12)
    assert kv.block_ids("c") == []
    assert kv.free_queue() == [4]

    kv.free("b")
    assert kv.free_queue() == [3, 4, 2, 1]
    assert kv.allocate_slots(c, 12)
    assert kv.block_ids("c") == [3, 4, 2]  # block 2 (a's second block) is evicted, block 1 survives
    removed, stored_c = kv.take_events()
    assert removed == BlockRemoved(block_hashes=(_h(a.token_ids)[1],))
    assert isinstance(stored_c, BlockStored)
    assert stored_c.block_hashes == tuple(_h(c.token_ids))
    assert kv.evictions_total == 1

    d = Req("d", list(range(1, 12)))
    assert kv.get_computed_blocks(d)[1] == 4  # only a's first block is left


def test_blocks_without_a_hash_are_reused_first_in_reverse_table_order() -> None:
    kv = KVCacheManager(num_blocks=9, block_size=4, enable_caching=False)
    assert kv.allocate_slots(Req("a", list(range(9))), 9)
    assert kv.allocate_slots(Req("b", list(range(5))), 5)
    assert kv.block_ids("a") == [1, 2, 3]
    kv.free("a")
    assert kv.free_queue() == [3, 2, 1, 6, 7, 8]  # like a stack: the last block freed is reused first
    assert kv.allocate_slots(Req("c", list(range(2))), 2)
    assert kv.block_ids("c") == [3]


def test_one_block_is_the_null_block() -> None:
    with pytest.raises(ValueError, match="null block"):
        KVCacheManager(num_blocks=1, block_size=4)
    kv = KVCacheManager(num_blocks=2, block_size=4)
    assert kv.allocate_slots(Req("a", list(range(4))), 4)
    assert kv.usage == 1.0
    assert not kv.allocate_slots(Req("b", list(range(1))), 1)


def test_a_full_prompt_hit_still_recomputes_the_last_token() -> None:
    kv = KVCacheManager(num_blocks=8, block_size=4)
    a = Req("a", list(range(8)))
    assert kv.allocate_slots(a, 8)
    same = Req("same", list(range(8)))
    hits, tokens = kv.get_computed_blocks(same)
    assert (len(hits), tokens) == (1, 4)  # (8 - 1) // 4 blocks


def test_prefix_hits_reference_count_shared_blocks() -> None:
    kv = KVCacheManager(num_blocks=8, block_size=4)
    a = Req("a", list(range(9)))
    assert kv.allocate_slots(a, 9)
    b = Req("b", list(range(9)))
    hits, tokens = kv.get_computed_blocks(b)
    assert tokens == 8
    b.num_computed_tokens = 0
    assert kv.allocate_slots(b, 1, hits)
    assert kv.blocks[1].ref_cnt == kv.blocks[2].ref_cnt == 2
    assert kv.usage == pytest.approx(4 / 7)  # 2 shared + 1 tail each, of 7 usable blocks
    kv.free("a")
    assert kv.blocks[1].ref_cnt == 1
    assert kv.usage == pytest.approx(3 / 7)
    kv.free("b")
    assert kv.usage == 0.0


def test_without_prefix_caching_nothing_is_hashed_or_reported() -> None:
    kv = KVCacheManager(num_blocks=8, block_size=4, enable_caching=False)
    a = Req("a", list(range(9)))
    assert kv.allocate_slots(a, 9)
    kv.free("a")
    assert kv.get_computed_blocks(Req("b", list(range(9)))) == ([], 0)
    assert kv.take_events() == []


def test_reset_is_refused_while_blocks_are_in_use() -> None:
    kv = KVCacheManager(num_blocks=4, block_size=4)
    assert kv.allocate_slots(Req("a", list(range(5))), 5)
    kv.take_events()
    assert not kv.reset_prefix_cache()
    kv.free("a")
    assert kv.reset_prefix_cache()
    assert kv.take_events() == [AllBlocksCleared()]
    assert kv.num_cached_blocks == 0
    assert kv.get_computed_blocks(Req("b", list(range(5))))[1] == 0
