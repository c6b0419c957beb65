"""A paged KV cache with vLLM's prefix caching (``vllm/v1/core/block_pool.py`` + ``kv_cache_manager.py``).

Model, per engine:

* ``num_blocks`` blocks of ``block_size`` token slots. A sequence holds ``ceil(tokens / block_size)``
  blocks; blocks are reference-counted, so sequences that share a cached prefix share its blocks.
* A *full* block of a sequence is registered under its chained hash (see :mod:`igw_sim.hashing`) as soon
  as the step that computes it is scheduled (vLLM does the same: nobody can read it before that step
  ends). Registering emits :class:`~igw_sim.kvevents.BlockStored`. A partial tail block is never cached.
* Block 0 is vLLM's *null block*, set aside and never handed out: ``num_blocks`` is vLLM's
  ``num_gpu_blocks`` (``--num-gpu-blocks-override``) and ``num_blocks - 1`` blocks are usable.
* Free blocks (``ref_cnt == 0``) sit in one queue, cached or not. Allocation takes the *front* of the
  queue; when that block still holds a cached hash, the hash is dropped (an eviction, one
  :class:`~igw_sim.kvevents.BlockRemoved` per block). Freeing a sequence walks its blocks in *reverse*
  order, as vLLM 0.32's ``BlockPool.free_blocks`` does: blocks that hold a hash go to the back (LRU, so a
  prefix's tail is evicted before its head and cached chains stay usable), blocks without one (a partial
  last block, any block when caching is off) go to the front, to be reused first.
* Two sequences may compute the same block concurrently (both missed); both copies are registered under
  the same hash and both are reported stored, like vLLM. A lookup takes either.
* A prefix hit is capped at ``num_tokens - 1`` tokens: the last prompt token is always recomputed so the
  step can sample from it (vLLM's ``max_cache_hit_length``).
* ``usage`` is ``1 - free / (num_blocks - 1)``; cached blocks nobody references count as free.

Pure: no clock, no I/O. Events pile up until :meth:`KVCacheManager.take_events`.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from igw_sim.hashing import ExtraKeys, extra_keys_for
from igw_sim.kvevents import AllBlocksCleared, BlockRemoved, BlockStored, KVEvent

__all__ = ["Block", "CacheRequest", "KVCacheManager"]


class CacheRequest(Protocol):
    """What the cache reads from a request."""

    @property
    def request_id(self) -> str: ...
    @property
    def token_ids(self) -> Sequence[int]:
        """Every known token: prompt, then generated."""

    @property
    def num_computed_tokens(self) -> int: ...
    @property
    def block_hashes(self) -> Sequence[bytes]:
        """Hashes of every full block of ``token_ids``."""

    @property
    def lora_name(self) -> str | None: ...
    @property
    def lora_id(self) -> int | None: ...
    @property
    def cache_salt(self) -> str | None: ...


@dataclass(slots=True, eq=False)
class Block:
    block_id: int
    ref_cnt: int = 0
    block_hash: bytes | None = None


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


class KVCacheManager:
    """Blocks, the prefix-cache index, per-request block tables and the event log of one engine."""

    def __init__(self, *, num_blocks: int, block_size: int, enable_caching: bool = True) -> None:
        if num_blocks < 2 or block_size < 1:
            raise ValueError("num_blocks must be >= 2 (one is the null block) and block_size >= 1")
        self.num_blocks = num_blocks
        """vLLM's ``num_gpu_blocks``, the null block included."""
        self.num_usable_blocks = num_blocks - 1
        self.block_size = block_size
        self.enable_caching = enable_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(1, num_blocks))
        self._cached: dict[bytes, dict[int, Block]] = {}
        self._tables: dict[str, list[Block]] = {}
        self._num_cached_blocks: dict[str, int] = {}
        self._events: list[KVEvent] = []
        self.evictions_total = 0

    # -- reading -------------------------------------------------------------------------------------

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def usage(self) -> float:
        """Fraction of the usable blocks referenced by some sequence, in ``[0, 1]`` (vLLM's ``get_usage``)."""
        return 1.0 - len(self._free) / self.num_usable_blocks

    @property
    def num_cached_blocks(self) -> int:
        """Blocks currently registered under a hash (referenced or not)."""
        return sum(len(copies) for copies in self._cached.values())

    def is_cached(self, block_hash: bytes) -> bool:
        return block_hash in self._cached

    def block_ids(self, request_id: str) -> list[int]:
        """The block table of a request (empty when it holds none)."""
        return [b.block_id for b in self._tables.get(request_id, ())]

    def free_queue(self) -> list[int]:
        """Free block ids, next to be reused first."""
        return list(self._free)

    def take_events(self) -> list[KVEvent]:
        """Events since the last call, oldest first."""
        events, self._events = self._events, []
        return events

    # -- the manager API (called by the scheduler) -----------------------------------------------------

    def get_computed_blocks(self, request: CacheRequest) -> tuple[list[Block], int]:
        """The longest cached prefix of ``request``: its blocks and its length in tokens. No side effects."""
        if not self.enable_caching:
            return [], 0
        max_blocks = (len(request.token_ids) - 1) // self.block_size
        hits: list[Block] = []
        for block_hash in request.block_hashes[:max_blocks]:
            copies = self._cached.get(block_hash)
            if not copies:
                break
            hits.append(next(iter(copies.values())))
        return hits, len(hits) * self.block_size

    def allocate_slots(
        self, request: CacheRequest, num_new_tokens: int, new_computed_blocks: Sequence[Block] = ()
    ) -> bool:
        """Give ``request`` room for ``num_new_tokens`` more tokens (after ``new_computed_blocks``).

        Returns ``False``, changing nothing, when too few blocks are free. Otherwise takes the prefix-hit
        blocks, allocates the missing ones (evicting cached free blocks from the LRU front) and registers
        every block that the scheduled tokens complete.
        """
        table = self._tables.get(request.request_id)
        held = 0 if table is None else len(table)
        total = request.num_computed_tokens + len(new_computed_blocks) * self.block_size + num_new_tokens
        num_new_blocks = _cdiv(total, self.block_size) - held - len(new_computed_blocks)
        # Prefix-hit blocks that nobody references are in the free queue: taking them uses free blocks too.
        reclaimed = sum(1 for b in new_computed_blocks if b.ref_cnt == 0)
        if max(num_new_blocks, 0) + reclaimed > len(self._free):
            return False
        if table is None:
            table = self._tables[request.request_id] = []
            self._num_cached_blocks[request.request_id] = len(new_computed_blocks)
        for block in new_computed_blocks:
            if block.ref_cnt == 0:
                del self._free[block.block_id]
            block.ref_cnt += 1
        table.extend(new_computed_blocks)
        for _ in range(num_new_blocks):
            table.append(self._take_free_block())
        if self.enable_caching:
            self._cache_full_blocks(request, table, min(total, len(request.token_ids)))
        return True

    def free(self, request_id: str) -> None:
        """Release a finished, aborted or preempted request's blocks (they stay cached until evicted)."""
        table = self._tables.pop(request_id, None)
        self._num_cached_blocks.pop(request_id, None)
        if table is None:
            return
        free = self._free
        reuse_first: list[int] = []
        for block in reversed(table):
            block.ref_cnt -= 1
            if block.ref_cnt == 0:
                if block.block_hash is None:
                    reuse_first.append(block.block_id)
                else:
                    free[block.block_id] = None
        # Front of the queue, in the same reverse order: the partial last block is reused first.
        for block_id in reversed(reuse_first):
            free[block_id] = None
            free.move_to_end(block_id, last=False)

    def reset_prefix_cache(self) -> bool:
        """Forget every cached hash; refused (``False``) while any block is in use, like vLLM."""
        if len(self._free) != self.num_usable_blocks:
            return False
        for block in self.blocks:
            block.block_hash = None
        self._cached.clear()
        self._events.append(AllBlocksCleared())
        return True

    # -- internals -----------------------------------------------------------------------------------

    def _take_free_block(self) -> Block:
        block_id, _ = self._free.popitem(last=False)
        block = self.blocks[block_id]
        if block.block_hash is not None:
            copies = self._cached[block.block_hash]
            del copies[block_id]
            if not copies:
                del self._cached[block.block_hash]
            self._events.append(BlockRemoved(block_hashes=(block.block_hash,)))
            self.evictions_total += 1
            block.block_hash = None
        block.ref_cnt = 1
        return block

    def _cache_full_blocks(self, request: CacheRequest, table: list[Block], num_tokens: int) -> None:
        rid = request.request_id
        start = self._num_cached_blocks[rid]
        end = num_tokens // self.block_size
        if end <= start:
            return
        hashes = request.block_hashes
        extra: list[ExtraKeys] = []
        for i in range(start, end):
            block = table[i]
            block.block_hash = hashes[i]
            self._cached.setdefault(hashes[i], {})[block.block_id] = block
            extra.append(extra_keys_for(i, request.lora_name, request.cache_salt))
        self._num_cached_blocks[rid] = end
        size = self.block_size
        self._events.append(
            BlockStored(
                block_hashes=tuple(hashes[start:end]),
                parent_block_hash=hashes[start - 1] if start > 0 else None,
                token_ids=tuple(request.token_ids[start * size : end * size]),
                block_size=size,
                lora_id=request.lora_id,
                lora_name=request.lora_name,
                extra_keys=tuple(extra),
            )
        )
