"""Which endpoints hold which prompt prefixes, built from the engines' KV-cache events.

**Two key spaces** (llm-d's design). An engine names a cached block by its own hash, which depends on
the engine's hash algorithm, seed and version. The index instead keys every block by a *request key*
that it recomputes from the block's token ids, so a router can compute the same keys from a prompt
without knowing anything about the engine's hashing::

    root(lora)                 = xxh64(msgpack([hash_seed, lora_name]))
    key(parent, tokens, extra) = xxh64(parent as 8 bytes LE ++ tokens as uint32 LE [++ 0x00 ++ msgpack(extra)])

``extra`` is what the event reports for the block besides the LoRA name (the LoRA is already in the
root): vLLM's ``cache_salt`` on block 0, multimodal identifiers. A router can pass the salt
(:meth:`KVBlockIndex.request_keys`); blocks with multimodal identifiers never match a token-only
request, which is the safe direction (a missed hit, never a false one). Equal keys mean equal whole
prefixes, like the engine's chained hashes.

For each endpoint the index keeps ``engine hash -> (request key, tiers)``: a ``BlockStored`` whose
parent is an engine hash chains from that parent's request key, and a ``BlockRemoved`` finds the
request key to drop. A ``BlockStored`` whose parent the index does not know (its event was missed, or
forgotten under the memory bound) is not indexed: its blocks are counted in
:attr:`KVBlockIndex.unknown_parent_blocks`. Only KV-cache group 0 is indexed (a plain model has only
that group; a hybrid model's other groups cache the same tokens under other hashes).

**Tiers.** An event's ``medium`` (``"GPU"``, ``"CPU"``, ...; case-insensitive, default GPU) is the tier
of the copy it adds or removes; a block may sit in several tiers of one endpoint. :meth:`match` scores
each block by the best configured tier the endpoint holds it in.

**Speculative entries** (:meth:`add_speculative`): after routing a request, the scorer can record that
the chosen endpoint will soon hold its blocks, so a burst of same-prefix requests hits before the
engine's events arrive. They count as GPU copies until they expire or a real event for the same
block and endpoint arrives (stored: confirmed and replaced; removed or cleared: gone).

**Bounded memory.** At most ``max_keys`` request keys (LRU: a key is used when stored or matched) and
``max_engine_hashes`` engine hashes per endpoint (LRU over stores). Dropping an engine hash also drops
its endpoint from the key, so that every indexed copy stays removable by a later event. Dropping a key
keeps the engine hashes, so later blocks still chain.

One caveat, accepted: if two engine hashes of one endpoint map to the same request key (possible only
with extra keys the index ignores), removing one forgets the other: a missed hit, never a false one.

Not thread-safe: every method runs on the event loop. :meth:`apply` costs O(blocks of the event);
:meth:`match` O(matched blocks x candidates).
"""

from __future__ import annotations

import heapq
import time
from array import array
from collections import OrderedDict
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Final

import msgpack
import xxhash

from igw.datalayer.kvevents.wire import AllBlocksCleared, BlockRemoved, BlockStored, ExtraKeys, KVEvent

__all__ = ["DEFAULT_TIER_WEIGHTS", "IndexStats", "KVBlockIndex", "PrefixMatch"]

GPU: Final = "gpu"
DEFAULT_TIER_WEIGHTS: Final[Mapping[str, float]] = {"gpu": 1.0, "cpu": 0.8}
"""llm-d's example ``kvCacheBackendConfigs``."""

_xxh64 = xxhash.xxh64_intdigest
_ITEMSIZE: Final = array("I").itemsize
_TABLE_TIERS: Final = 8


@dataclass(frozen=True, slots=True)
class PrefixMatch:
    blocks: int
    """Consecutive blocks from the start of the prompt that the endpoint holds."""
    score: float
    """Sum over those blocks of the best tier weight."""


@dataclass(frozen=True, slots=True)
class IndexStats:
    keys: int
    endpoints: int
    engine_hashes: int
    speculative: int


class _Entry:
    """One request key: who holds it, in which tiers (bit masks), and who is expected to soon."""

    __slots__ = ("holders", "spec")

    def __init__(self) -> None:
        self.holders: dict[str, int] = {}
        self.spec: dict[str, float] | None = None  # endpoint -> expiry


class _EndpointState:
    __slots__ = ("block_size", "engine", "spec_keys")

    def __init__(self) -> None:
        self.engine: OrderedDict[int, tuple[int, int]] = OrderedDict()  # engine hash -> (request key, tiers)
        self.spec_keys: set[int] = set()
        self.block_size: int | None = None


def _pack_block(tokens: Sequence[int]) -> bytes:
    try:
        return array("I", tokens).tobytes()
    except OverflowError:  # not a real tokenizer's id; still give it a stable, distinct packing
        return b"\xff" + b"".join(t.to_bytes(9, "little", signed=True) for t in tokens)


def _block_payloads(tokens: Sequence[int], block_size: int, n: int) -> list[bytes]:
    """The packed tokens of the first ``n`` full blocks (packing whole-prompt once on the fast path)."""
    try:
        packed = array("I", tokens[: n * block_size]).tobytes()
    except OverflowError:
        return [_pack_block(tokens[i * block_size : (i + 1) * block_size]) for i in range(n)]
    width = block_size * _ITEMSIZE
    return [packed[i * width : (i + 1) * width] for i in range(n)]


def _key(parent: int, payload: bytes, extra: bytes) -> int:
    return _xxh64(parent.to_bytes(8, "little") + payload + extra)


class KVBlockIndex:
    def __init__(
        self,
        *,
        hash_seed: str = "",
        max_keys: int = 2_000_000,
        max_engine_hashes: int = 500_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """``hash_seed`` namespaces the request keys (it need not equal the engines' seed);
        ``max_engine_hashes`` bounds each endpoint's engine-hash map."""
        if max_keys <= 0 or max_engine_hashes <= 0:
            raise ValueError("max_keys and max_engine_hashes must be positive")
        self.hash_seed = hash_seed
        self.max_keys = max_keys
        self.max_engine_hashes = max_engine_hashes
        self._clock = clock
        self._keys: OrderedDict[int, _Entry] = OrderedDict()
        self._endpoints: dict[str, _EndpointState] = {}
        self._roots: dict[str | None, int] = {}
        self._tier_bits: dict[str, int] = {GPU: 1}
        self._spec_heap: list[tuple[float, int, str]] = []
        self._tables: dict[tuple[int, tuple[tuple[str, float], ...]], list[float | None]] = {}
        self.unknown_parent_blocks = 0
        """Stored blocks not indexed because their parent's engine hash was unknown."""
        self.untokenized_blocks = 0
        """Stored blocks not indexed because the event lacked their token ids."""
        self.unknown_removed_blocks = 0
        """Removed engine hashes the index did not know (never stored, or already forgotten)."""
        self.evicted_keys = 0
        self.evicted_engine_hashes = 0

    # -- keys ---------------------------------------------------------------------------------------

    def root_key(self, lora: str | None = None) -> int:
        """The parent key of a sequence's first block (per LoRA adapter; ``None`` for the base model)."""
        root = self._roots.get(lora)
        if root is None:
            root = self._roots[lora] = _xxh64(msgpack.packb([self.hash_seed, lora], use_bin_type=True))
        return root

    def request_keys(
        self, token_ids: Sequence[int], block_size: int, lora: str | None = None, *, cache_salt: str | None = None
    ) -> list[int]:
        """The request keys of the prompt's full blocks, in order (what :meth:`match` takes)."""
        if block_size <= 0:
            raise ValueError(f"block_size {block_size} is not positive")
        n = len(token_ids) // block_size
        keys: list[int] = []
        parent = self.root_key(lora)
        for i, payload in enumerate(_block_payloads(token_ids, block_size, n)):
            extra = _extra_bytes((cache_salt,)) if i == 0 and cache_salt is not None else b""
            parent = _key(parent, payload, extra)
            keys.append(parent)
        return keys

    def request_key_of(self, endpoint: str, engine_hash: int) -> int | None:
        """The request key the index gave to one of ``endpoint``'s engine hashes (None if unknown)."""
        state = self._endpoints.get(endpoint)
        found = None if state is None else state.engine.get(engine_hash)
        return None if found is None else found[0]

    # -- events -------------------------------------------------------------------------------------

    def apply(self, endpoint: str, event: KVEvent) -> None:
        if isinstance(event, BlockStored):
            self._stored(endpoint, event)
        elif isinstance(event, BlockRemoved):
            self._removed(endpoint, event)
        elif isinstance(event, AllBlocksCleared):
            self.clear_endpoint(endpoint)

    def apply_all(self, endpoint: str, events: Iterable[KVEvent]) -> None:
        for event in events:
            self.apply(endpoint, event)

    def _state(self, endpoint: str) -> _EndpointState:
        state = self._endpoints.get(endpoint)
        if state is None:
            state = self._endpoints[endpoint] = _EndpointState()
        return state

    def _tier_bit(self, medium: str) -> int:
        name = medium.lower() or GPU
        bit = self._tier_bits.get(name)
        if bit is None:
            bit = self._tier_bits[name] = 1 << len(self._tier_bits)
        return bit

    def _stored(self, endpoint: str, event: BlockStored) -> None:
        if event.group_idx != 0:
            return
        state = self._state(endpoint)
        state.block_size = event.block_size
        if event.parent is None:
            parent = self.root_key(_lora_identity(event))
        else:
            found = state.engine.get(event.parent)
            if found is None:
                self.unknown_parent_blocks += len(event.block_hashes)
                return
            state.engine.move_to_end(event.parent)
            parent = found[0]
        bs = event.block_size
        n = min(len(event.block_hashes), len(event.token_ids) // bs)
        self.untokenized_blocks += len(event.block_hashes) - n
        bit = self._tier_bit(event.medium)
        strip = (event.lora_name, event.lora_id)
        engine = state.engine
        for i, payload in enumerate(_block_payloads(event.token_ids, bs, n)):
            extra = _event_extra(event.extra_keys[i] if i < len(event.extra_keys) else None, strip)
            key = _key(parent, payload, extra)
            block_hash = event.block_hashes[i]
            prev = engine.get(block_hash)
            tiers = bit
            if prev is not None:
                if prev[0] == key:
                    tiers |= prev[1]
                else:  # the engine reused a hash for other content: forget the old copy
                    self._release(prev[0], endpoint, prev[1])
                engine.move_to_end(block_hash)
            engine[block_hash] = (key, tiers)
            self._hold(key, endpoint, bit)
            parent = key
        while len(engine) > self.max_engine_hashes:
            _, (old_key, old_tiers) = engine.popitem(last=False)
            self._release(old_key, endpoint, old_tiers)
            self.evicted_engine_hashes += 1

    def _removed(self, endpoint: str, event: BlockRemoved) -> None:
        if event.group_idx != 0:
            return
        state = self._endpoints.get(endpoint)
        if state is None:
            self.unknown_removed_blocks += len(event.block_hashes)
            return
        bit = self._tier_bit(event.medium)
        for block_hash in event.block_hashes:
            found = state.engine.get(block_hash)
            if found is None or not found[1] & bit:
                self.unknown_removed_blocks += 1
                continue
            key, tiers = found
            if tiers & ~bit:
                state.engine[block_hash] = (key, tiers & ~bit)
            else:
                del state.engine[block_hash]
            self._release(key, endpoint, bit)
            self._drop_spec(key, endpoint, state)

    def clear_endpoint(self, endpoint: str) -> None:
        """Forget every block of ``endpoint`` (AllBlocksCleared, a missed event); keep its block size."""
        state = self._endpoints.get(endpoint)
        if state is None:
            return
        for key, tiers in state.engine.values():
            self._release(key, endpoint, tiers)
        state.engine.clear()
        for key in list(state.spec_keys):
            self._drop_spec(key, endpoint, state)

    def remove_endpoint(self, endpoint: str) -> None:
        """Forget ``endpoint`` entirely (it left the pool)."""
        self.clear_endpoint(endpoint)
        self._endpoints.pop(endpoint, None)

    # -- entries ------------------------------------------------------------------------------------

    def _entry(self, key: int) -> _Entry:
        entry = self._keys.get(key)
        if entry is None:
            entry = self._keys[key] = _Entry()
            while len(self._keys) > self.max_keys:
                self._evict()
        else:
            self._keys.move_to_end(key)
        return entry

    def _evict(self) -> None:
        key, entry = self._keys.popitem(last=False)
        self.evicted_keys += 1
        if entry.spec:
            for endpoint in entry.spec:
                state = self._endpoints.get(endpoint)
                if state is not None:
                    state.spec_keys.discard(key)

    def _hold(self, key: int, endpoint: str, bit: int) -> None:
        entry = self._entry(key)
        entry.holders[endpoint] = entry.holders.get(endpoint, 0) | bit
        if entry.spec and endpoint in entry.spec:  # confirmed by the engine: the real copy replaces it
            del entry.spec[endpoint]
            self._endpoints[endpoint].spec_keys.discard(key)

    def _release(self, key: int, endpoint: str, bits: int) -> None:
        entry = self._keys.get(key)
        if entry is None:
            return
        tiers = entry.holders.get(endpoint)
        if tiers is None:
            return
        tiers &= ~bits
        if tiers:
            entry.holders[endpoint] = tiers
        else:
            del entry.holders[endpoint]
            if not entry.holders and not entry.spec:
                del self._keys[key]

    def _drop_spec(self, key: int, endpoint: str, state: _EndpointState) -> None:
        state.spec_keys.discard(key)
        entry = self._keys.get(key)
        if entry is None or not entry.spec or entry.spec.pop(endpoint, None) is None:
            return
        if not entry.holders and not entry.spec:
            del self._keys[key]

    # -- speculative entries ------------------------------------------------------------------------

    def add_speculative(self, endpoint: str, keys: Iterable[int], ttl_s: float, now: float | None = None) -> None:
        """Expect ``endpoint`` to hold ``keys`` (GPU tier) for ``ttl_s`` unless an event says otherwise."""
        now = self._clock() if now is None else now
        self.expire(now)
        expiry = now + ttl_s
        state = self._state(endpoint)
        for key in keys:
            entry = self._entry(key)
            if entry.holders.get(endpoint, 0) & 1:  # really on the GPU already
                continue
            if entry.spec is None:
                entry.spec = {}
            entry.spec[endpoint] = expiry
            state.spec_keys.add(key)
            heapq.heappush(self._spec_heap, (expiry, key, endpoint))

    def expire(self, now: float | None = None) -> None:
        """Drop the speculative entries whose TTL has passed (:meth:`match` ignores them anyway)."""
        now = self._clock() if now is None else now
        heap = self._spec_heap
        while heap and heap[0][0] <= now:
            expiry, key, endpoint = heapq.heappop(heap)
            entry = self._keys.get(key)
            if entry is not None and entry.spec and entry.spec.get(endpoint) == expiry:
                state = self._endpoints.get(endpoint)
                if state is not None:
                    self._drop_spec(key, endpoint, state)

    # -- lookups ------------------------------------------------------------------------------------

    def match_prefix(
        self,
        keys: Sequence[int],
        candidates: Collection[str],
        tier_weights: Mapping[str, float] = DEFAULT_TIER_WEIGHTS,
        *,
        now: float | None = None,
    ) -> dict[str, PrefixMatch]:
        """Each candidate's longest *consecutive* run of ``keys`` from the first, and its score.

        Walking the keys in order, an endpoint drops out at its first missing block. A block counts
        with the best weight among the tiers the endpoint holds it in; tiers missing from
        ``tier_weights`` do not count (as if absent). Candidates without a single block are left out.
        """
        now = self._clock() if now is None else now
        table = self._weight_table(tier_weights)
        spec_weight = tier_weights.get(GPU)
        active = dict.fromkeys(candidates, 0.0)
        out: dict[str, PrefixMatch] = {}
        depth = 0
        for key in keys:
            if not active:
                break
            entry = self._keys.get(key)
            if entry is None:
                break
            holders, spec = entry.holders, entry.spec
            still: dict[str, float]
            if not spec and table is not None:  # the hot path: a lookup and an add per endpoint
                still = {ep: s + w for ep, s in active.items() if (w := table[holders.get(ep, 0)]) is not None}
            else:
                still = {}
                for endpoint, score in active.items():
                    best = self._tier_weight(holders.get(endpoint, 0), tier_weights, table)
                    if spec and spec_weight is not None:
                        expiry = spec.get(endpoint)
                        if expiry is not None and expiry > now and (best is None or spec_weight > best):
                            best = spec_weight
                    if best is not None:
                        still[endpoint] = score + best
            if len(still) < len(active) and depth:
                for endpoint in active.keys() - still.keys():
                    out[endpoint] = PrefixMatch(depth, active[endpoint])
            if still:
                self._keys.move_to_end(key)
                depth += 1
            active = still
        for endpoint, score in active.items():
            if depth:
                out[endpoint] = PrefixMatch(depth, score)
        return out

    def _weight_table(self, tier_weights: Mapping[str, float]) -> list[float | None] | None:
        """The best weight for every tier mask, cached per weights (None beyond 8 distinct tiers)."""
        n = len(self._tier_bits)
        if n > _TABLE_TIERS:
            return None
        cache_key = (n, tuple(sorted(tier_weights.items())))
        table = self._tables.get(cache_key)
        if table is None:
            bits = [(bit, tier_weights.get(name)) for name, bit in self._tier_bits.items()]
            table = [_best(mask, bits) for mask in range(1 << n)]
            if len(self._tables) > 64:  # callers passing ever-new weights: do not grow without bound
                self._tables.clear()
            self._tables[cache_key] = table
        return table

    def _tier_weight(
        self, tiers: int, tier_weights: Mapping[str, float], table: list[float | None] | None
    ) -> float | None:
        if table is not None:
            return table[tiers]
        return _best(tiers, [(bit, tier_weights.get(name)) for name, bit in self._tier_bits.items()])

    def match(
        self,
        keys: Sequence[int],
        candidates: Collection[str],
        tier_weights: Mapping[str, float] = DEFAULT_TIER_WEIGHTS,
        *,
        now: float | None = None,
    ) -> dict[str, float]:
        """:meth:`match_prefix` scores only (candidates without a hit are left out)."""
        return {ep: m.score for ep, m in self.match_prefix(keys, candidates, tier_weights, now=now).items()}

    # -- introspection ------------------------------------------------------------------------------

    def block_size(self, endpoint: str) -> int | None:
        """The block size of ``endpoint``'s last BlockStored (None before its first)."""
        state = self._endpoints.get(endpoint)
        return None if state is None else state.block_size

    def block_sizes(self) -> dict[str, int]:
        return {ep: s.block_size for ep, s in self._endpoints.items() if s.block_size is not None}

    def endpoints(self) -> list[str]:
        return list(self._endpoints)

    @property
    def size(self) -> int:
        """Request keys held (the number ``max_keys`` bounds)."""
        return len(self._keys)

    def stats(self) -> IndexStats:
        states = self._endpoints.values()
        return IndexStats(
            keys=len(self._keys),
            endpoints=len(self._endpoints),
            engine_hashes=sum(len(s.engine) for s in states),
            speculative=sum(len(s.spec_keys) for s in states),
        )


def _best(tiers: int, weights: Iterable[tuple[int, float | None]]) -> float | None:
    best: float | None = None
    for bit, weight in weights:
        if tiers & bit and weight is not None and (best is None or weight > best):
            best = weight
    return best


def _extra_bytes(extra: tuple[object, ...]) -> bytes:
    packed: bytes = msgpack.packb(list(extra), use_bin_type=True)
    return b"\x00" + packed


def _event_extra(keys: ExtraKeys, strip: tuple[str | None, int | None]) -> bytes:
    """A block's extra keys without the LoRA identity (folded into the root), packed; b"" when none."""
    if not keys:
        return b""
    lora_name, lora_id = strip
    rest = tuple(k for k in keys if not (k == lora_name and lora_name is not None) and not _is_id(k, lora_id))
    return _extra_bytes(rest) if rest else b""


def _lora_identity(event: BlockStored) -> str | None:
    """The adapter the root key is made of. Engines that report only the integer id (older vLLM) get a
    root of their own, which no request matches: a missed hit rather than a base-model false hit."""
    if event.lora_name is not None or event.lora_id is None:
        return event.lora_name
    return f"\x00lora-id:{event.lora_id}"


def _is_id(value: object, lora_id: int | None) -> bool:
    return lora_id is not None and type(value) is int and value == lora_id
