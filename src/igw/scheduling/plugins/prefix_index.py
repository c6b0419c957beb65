"""The approximate prefix index: which endpoint probably holds which prompt block in its KV cache.

The EPP never sees the engines' caches. It remembers instead which block hashes it *sent* to
which endpoint, in a bounded LRU per endpoint that mimics the engine's own eviction, and asks
which endpoints hold the longest run of a new request's leading blocks.

Hashes are *chains*: block ``i``'s hash folds in block ``i-1``'s, so a hash stands for the whole
prefix up to its block, and the first hash of every list given to :meth:`PrefixIndex.add` and
:meth:`PrefixIndex.match` is a chain's first block (it never appears at a later position,
short of a 64-bit collision).

Layout (measured by ``benchmarks/prefix_index_memory.py``: about 80 bytes per stored
(endpoint, block) entry, a third less than with a reverse map of every block):

* every endpoint gets a small integer id (freed ids are reused smallest first, so bitmasks stay
  short);
* per endpoint, an LRU that is a plain insertion-ordered ``dict[int, None]``: a touch deletes
  and re-inserts the key (it becomes the most recent), eviction takes keys from the front, in
  one batch per :meth:`~PrefixIndex.add`. A dict used as a FIFO has a slow front (deleted slots
  stay in its entry table until it is resized), so popping one key at a time would be
  quadratic; an ``OrderedDict`` pops in O(1) but costs twice the memory (91 vs 42 bytes per
  entry, measured);
* a reverse map of chain *heads* only: ``first block hash -> bitmask of endpoint ids``, exact
  on every insert, eviction and endpoint removal. A head held by one endpoint stores that
  endpoint's canonical ``1 << id`` object.

Why heads are enough. Within one :meth:`~PrefixIndex.add` the hashes are inserted tail first,
so a prompt's first block ends up the most recent (the order vLLM frees a request's blocks in:
a tail is evicted before its head). Any later touch of block ``i`` comes from a request whose
chain holds blocks ``0..i`` too, and touches those as well, more recently. So along every chain
recency never increases, LRU eviction always removes a *suffix*, and what an endpoint holds of
a chain is always a prefix of it. The longest consecutive prefix of a request an endpoint holds
is then found by binary search over the request's hashes in that endpoint's LRU (2 to 10
lookups for 256 blocks), for each endpoint holding the first block, and is exactly what walking
the hashes in order while intersecting the holders of each would give. A full reverse map of
every block (measured too) costs ~40 bytes more per entry, doubles the work of every insert and
eviction (an add of 256 new blocks: ~250 vs ~130 us) and makes a typical match walk up to 256
lookups in a dict of a million keys (~30 us vs a few us). What it does better: a prefix held
by hundreds of endpoints costs one big-int AND per block there and ~0.5 us per holder here.

Not thread-safe: every call happens on the event loop thread.
"""

from __future__ import annotations

import heapq
from collections.abc import Collection, Iterable, Sequence
from itertools import islice


class PrefixIndex:
    """Per-endpoint LRU sets of chained block hashes plus the map chain head -> endpoints.

    ``default_capacity`` is the number of blocks an endpoint may hold unless :meth:`add` or
    :meth:`set_capacity` gives it its own (autoTune: the engine's ``num_gpu_blocks``).
    """

    __slots__ = ("_addresses", "_bits", "_capacities", "_free", "_heads", "_ids", "_lrus", "_size", "default_capacity")

    def __init__(self, default_capacity: int) -> None:
        if default_capacity < 1:
            raise ValueError(f"prefix index capacity must be at least 1, got {default_capacity}")
        self.default_capacity = default_capacity
        self._ids: dict[str, int] = {}
        self._addresses: list[str | None] = []
        """Endpoint address per id (``None``: a free id)."""
        self._lrus: list[dict[int, None]] = []
        """Per id: block hashes, least recently used first."""
        self._capacities: list[int] = []
        self._bits: list[int] = []
        """Per id: ``1 << id``; the heads map shares these objects for single-holder heads."""
        self._free: list[int] = []
        """Heap of free ids."""
        self._heads: dict[int, int] = {}
        """Chain head (first block hash) -> bitmask of the endpoints holding it."""
        self._size = 0

    # ---------------------------------------------------------------------------- queries

    @property
    def size(self) -> int:
        """Stored (endpoint, block) entries, over all endpoints."""
        return self._size

    @property
    def heads(self) -> int:
        """Distinct chain heads held by at least one endpoint."""
        return len(self._heads)

    def endpoints(self) -> list[str]:
        return list(self._ids)

    def entries(self, endpoint: str) -> int:
        """Blocks the index holds for ``endpoint`` (0 if it is unknown)."""
        eid = self._ids.get(endpoint)
        return 0 if eid is None else len(self._lrus[eid])

    def capacity(self, endpoint: str) -> int | None:
        """The capacity of ``endpoint``'s LRU, or ``None`` if the index does not know it."""
        eid = self._ids.get(endpoint)
        return None if eid is None else self._capacities[eid]

    def blocks(self, endpoint: str) -> list[int]:
        """``endpoint``'s block hashes, least recently used first (tests and debugging)."""
        eid = self._ids.get(endpoint)
        return [] if eid is None else list(self._lrus[eid])

    def holders(self, block_hash: int) -> set[str]:
        """The endpoints holding ``block_hash`` (tests and debugging: scans every endpoint)."""
        return {a for a, eid in self._ids.items() if block_hash in self._lrus[eid]}

    def match(self, hashes: Sequence[int]) -> dict[str, int]:
        """For every endpoint holding ``hashes[0]``: how many hashes from the first it holds in a row.

        That is the longest *consecutive* prefix, what an engine can actually reuse: the same
        as walking the hashes in order while intersecting the set of endpoints that held every
        previous one, computed here by binary search per holder of the first hash (exact, see
        the module docstring). The reference instead counts, per server, every hash it holds
        until a hash has no holder at all: its LRU evicts heads first, so a server that lost
        block 0 but still holds blocks 1-5 scores 5 there while it can reuse nothing (0 here,
        and tail-first eviction keeps such holes from arising at all).

        Endpoints without even the first hash are absent from the result. Cost: a dict lookup
        for the head, then about 2 (popular prefix: holders hold the same run) to
        ``2 + log2(len(hashes))`` lookups per holder.
        """
        if not hashes:
            return {}
        mask = self._heads.get(hashes[0], 0)
        if not mask:
            return {}
        out: dict[str, int] = {}
        n = len(hashes)
        addresses = self._addresses
        lrus = self._lrus
        # Per holder: ``good`` blocks are known held, ``bad`` blocks known not all held. The
        # first probes use the previous holder's answer (at first: all of it), since holders
        # of a popular prefix tend to hold the same run; then binary search.
        guess = n
        while mask:
            low = mask & -mask
            mask ^= low
            eid = low.bit_length() - 1
            lru = lrus[eid]
            good, bad = 1, n + 1
            if hashes[guess - 1] in lru:
                good = guess
                if guess < n:
                    if hashes[guess] in lru:
                        good = guess + 1
                    else:
                        bad = guess + 1
            else:
                bad = guess
            while bad - good > 1:
                mid = (good + bad) >> 1
                if hashes[mid - 1] in lru:
                    good = mid
                else:
                    bad = mid
            address = addresses[eid]
            assert address is not None
            out[address] = guess = good
        return out

    # ---------------------------------------------------------------------------- updates

    def add(self, endpoint: str, hashes: Sequence[int], capacity: int | None = None) -> None:
        """Record that ``endpoint`` now holds ``hashes`` (one chain's blocks, first to last).

        Known hashes are touched, new ones inserted, tail first; the endpoint's least recently
        used blocks beyond its capacity are evicted. ``capacity`` (if given and positive)
        becomes the endpoint's capacity from now on.
        """
        if not hashes:
            return
        eid = self._ids.get(endpoint)
        if eid is None:
            eid = self._allocate(endpoint, capacity or self.default_capacity)
        elif capacity is not None and capacity > 0:
            self._capacities[eid] = capacity
        lru = self._lrus[eid]
        before = len(lru)
        for h in reversed(hashes):  # tail first: the head ends up the most recently used
            lru.pop(h, None)
            lru[h] = None
        self._size += len(lru) - before
        head = hashes[0]
        bit = self._bits[eid]
        mask = self._heads.get(head)
        if mask is None:
            self._heads[head] = bit
        elif not mask & bit:
            self._heads[head] = mask | bit
        excess = len(lru) - self._capacities[eid]
        if excess > 0:
            self._evict(eid, excess)

    def set_capacity(self, endpoint: str, capacity: int) -> None:
        """Change ``endpoint``'s capacity (evicting at once if it now holds too much)."""
        if capacity < 1:
            raise ValueError(f"prefix index capacity must be at least 1, got {capacity}")
        eid = self._ids.get(endpoint)
        if eid is None:
            self._allocate(endpoint, capacity)
            return
        self._capacities[eid] = capacity
        excess = len(self._lrus[eid]) - capacity
        if excess > 0:
            self._evict(eid, excess)

    def remove_endpoint(self, endpoint: str) -> bool:
        """Forget ``endpoint`` and every block it held. Returns whether it was known.

        Costs time proportional to the endpoint's entries (about a millisecond for 31,250).
        """
        eid = self._ids.pop(endpoint, None)
        if eid is None:
            return False
        lru = self._lrus[eid]
        self._drop_heads(eid, lru)
        self._size -= len(lru)
        self._lrus[eid] = {}
        self._addresses[eid] = None
        heapq.heappush(self._free, eid)
        return True

    def retain(self, endpoints: Collection[str]) -> list[str]:
        """Remove every endpoint not in ``endpoints``; return the removed ones."""
        gone = [address for address in self._ids if address not in endpoints]
        for address in gone:
            self.remove_endpoint(address)
        return gone

    def clear(self) -> None:
        for address in list(self._ids):
            self.remove_endpoint(address)

    # ---------------------------------------------------------------------------- internals

    def _allocate(self, endpoint: str, capacity: int) -> int:
        if self._free:
            eid = heapq.heappop(self._free)
            self._addresses[eid] = endpoint
            self._capacities[eid] = capacity
        else:
            eid = len(self._addresses)
            self._addresses.append(endpoint)
            self._lrus.append({})
            self._capacities.append(capacity)
            self._bits.append(1 << eid)
        self._ids[endpoint] = eid
        return eid

    def _evict(self, eid: int, count: int) -> None:
        lru = self._lrus[eid]
        victims = list(islice(lru, count))
        for h in victims:
            del lru[h]
        self._size -= len(victims)
        self._drop_heads(eid, victims)

    def _drop_heads(self, eid: int, hashes: Iterable[int]) -> None:
        """Take endpoint ``eid`` out of the heads among ``hashes``."""
        heads = self._heads
        if not heads:
            return
        bit = self._bits[eid]
        bits = self._bits
        for h in hashes:
            mask = heads.get(h)
            if mask is None or not mask & bit:
                continue
            mask ^= bit
            if not mask:
                del heads[h]
            elif mask & (mask - 1):
                heads[h] = mask
            else:  # one holder left: share its canonical bit object
                heads[h] = bits[mask.bit_length() - 1]

    def check_consistency(self) -> None:
        """Raise ``AssertionError`` if the heads map, the LRUs and the counters disagree (tests)."""
        total = 0
        for eid, lru in enumerate(self._lrus):
            address = self._addresses[eid]
            if address is None:
                assert not lru, f"free id {eid} still holds {len(lru)} blocks"
                continue
            assert self._ids[address] == eid
            assert len(lru) <= self._capacities[eid], f"{address}: {len(lru)} > {self._capacities[eid]}"
            total += len(lru)
        assert total == self._size, f"size counter {self._size} != {total}"
        assert len(self._ids) == sum(a is not None for a in self._addresses)
        for h, mask in self._heads.items():
            expected = 0
            for eid, lru in enumerate(self._lrus):
                if h in lru:
                    expected |= self._bits[eid]
            assert mask == expected, f"head {h:#x}: mask {mask:#x}, LRUs say {expected:#x}"
