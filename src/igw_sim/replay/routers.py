"""Routing policies for replays, and the two small protocols between a policy and the replay.

A policy implements :class:`Router`: ``route(request, engines) -> index``, plus ``on_complete`` for the
policies that count their own in-flight requests. It sees each engine through an :class:`EngineView`
of plain numbers, so anything that can compute a choice from those (the igw scheduler behind an adapter,
say) can be replayed without ``igw_sim`` importing it.

What a view holds depends on the policy's ``true_state``:

* ``False`` (every realistic policy): the engine's metrics as of the last scrape (``waiting``,
  ``running``, ``kv_usage``; every ``scrape_interval``, 50 ms by default) and ``dispatched``, the
  requests this policy routed there since that scrape. ``cached_prefix_tokens`` and ``predicted_ttft``
  return ``None``.
* ``True`` (the oracle): live values, plus the true cached prefix of the request and the engine's own
  TTFT prediction.

Built-in policies (:data:`ROUTERS`):

``random``, ``round-robin``
    The baselines.
``least-queue``
    The smallest ``waiting + running + dispatched``; ties broken at random.
``prefix-load``
    igw's default scorer set, approximated: ``2 x queue + 2 x kv + 3 x prefix``, max score wins (ties at
    random). ``queue`` is min-max normalised ``waiting + dispatched`` (1.0 when all are equal), ``kv`` is
    ``1 - kv_usage``, ``prefix`` the matched fraction of the prompt's chunks in an approximate index like
    the reference EPP's: chunks of 64 characters (16 tokens at 4 characters per token) including a
    trailing partial one, at most 256 per prompt, recorded for the chosen engine after each decision, in a
    per-engine LRU of 31,250 chunks.
``cache-aware``
    SGLang's ``cache_aware`` (``reference/scheduling-anchors.md`` section 3.5) with its CLI defaults:
    when ``max - min load > 64`` and ``max > 1.5 x min`` (load = the policy's own in-flight count), the
    least loaded engine; otherwise the engine with the longest cached prefix in an approximate radix tree
    when it covers more than 30 % of the prompt, else the engine with the smallest tree. The tree is kept
    per segment (the prompt text is whole segments); every 120 s the least recently used segments are
    evicted until each engine's tree holds at most 2**26 characters.
``oracle``
    The smallest predicted TTFT (queueing + uncached prefill from the engine's true state, see
    ``FastEngine.predicted_ttft``), ties to the fewest running requests. The bound that the others are
    compared with below saturation; it is greedy, and past saturation it trades cache hits for short
    queues and does worse than the cache-aware policies (see ``docs/simulator.md`` section 6.4).
"""

from __future__ import annotations

import math
import random
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Protocol

from igw_sim.replay.requests import SimRequest, chunk_runs

__all__ = [
    "ROUTERS",
    "CacheAwareRouter",
    "EngineView",
    "LeastQueueRouter",
    "OracleRouter",
    "PrefixLoadRouter",
    "RandomRouter",
    "RoundRobinRouter",
    "Router",
    "make_router",
]


class EngineView(Protocol):
    """What a policy knows of one engine when it routes."""

    @property
    def index(self) -> int: ...
    @property
    def waiting(self) -> int: ...
    @property
    def running(self) -> int: ...
    @property
    def kv_usage(self) -> float:
        """Fraction of KV blocks in use, in ``[0, 1]``."""

    @property
    def dispatched(self) -> int:
        """Requests this policy routed here since the metrics were scraped (0 for live views)."""

    @property
    def block_size(self) -> int: ...
    @property
    def num_gpu_blocks(self) -> int: ...
    @property
    def max_num_seqs(self) -> int: ...
    @property
    def prefill_s_per_token(self) -> float:
        """Compute time of one prompt token once a step is compute-bound (the profile's, static)."""

    @property
    def now(self) -> float:
        """The current simulated time."""

    @property
    def scraped_at(self) -> float:
        """When ``waiting``, ``running`` and ``kv_usage`` were read (``now`` for live views). A policy may
        cache what it derives from them until this changes; ``dispatched`` changes in between."""

    def cached_prefix_tokens(self, request: SimRequest) -> int | None:
        """True cached prefix of ``request`` in tokens (live views only; ``None`` otherwise)."""

    def predicted_ttft(self, request: SimRequest) -> float | None:
        """The engine's own TTFT prediction in seconds (live views only; ``None`` otherwise)."""


class Router(Protocol):
    """A routing policy. ``route`` must return an index into ``engines``."""

    name: str
    true_state: bool
    """Give this policy live views (the oracle) instead of scraped ones."""
    needs_completions: bool
    """Call :meth:`on_complete` as soon as each request finishes (costs the replay some speed)."""
    # Optional: ``reads_metrics = False`` tells the replay that the policy never reads the scraped
    # metrics (``waiting``, ``running``, ``kv_usage``, ``dispatched``), so it need not scrape at all.

    def route(self, request: SimRequest, engines: Sequence[EngineView]) -> int: ...
    def on_complete(self, request: SimRequest, engine: int) -> None: ...


class _Base:
    name = "base"
    true_state = False
    needs_completions = False
    reads_metrics = True

    def __init__(self, seed: int = 0) -> None:
        self.rng = random.Random(seed)

    def on_complete(self, request: SimRequest, engine: int) -> None:
        return None

    def _pick_min(self, values: Sequence[float]) -> int:
        best = min(values)
        ties = [i for i, v in enumerate(values) if v == best]
        return ties[0] if len(ties) == 1 else self.rng.choice(ties)

    def _below(self, n: int) -> int:
        """``self.rng.choice(range(n))``, drawn exactly as ``Random.choice`` draws its index (its
        ``_randbelow``: rejection sampling on ``getrandbits``), without its Python-level frames."""
        getrandbits = self.rng.getrandbits
        k = n.bit_length()
        r = getrandbits(k)
        while r >= n:
            r = getrandbits(k)
        return r


class RandomRouter(_Base):
    name = "random"
    reads_metrics = False

    def route(self, request: SimRequest, engines: Sequence[EngineView]) -> int:
        return self.rng.randrange(len(engines))


class RoundRobinRouter(_Base):
    name = "round-robin"
    reads_metrics = False

    def __init__(self, seed: int = 0) -> None:
        super().__init__(seed)
        self._next = 0

    def route(self, request: SimRequest, engines: Sequence[EngineView]) -> int:
        i = self._next % len(engines)
        self._next = i + 1
        return i


class LeastQueueRouter(_Base):
    name = "least-queue"

    def __init__(self, seed: int = 0) -> None:
        super().__init__(seed)
        # The loads as of the last scrape, kept up to date: between two scrapes only ``dispatched`` moves,
        # and only on the engines this policy chose, so only the last choice is read again. ``_low`` is the
        # smallest load and ``_nlow`` how many engines have it, kept with them.
        self._scraped_at = -math.inf
        self._loads: list[int] = []
        self._low = 0
        self._nlow = 0
        self._last = -1
        self._views: Sequence[EngineView] | None = None

    def route(self, request: SimRequest, engines: Sequence[EngineView]) -> int:
        loads = self._loads
        at = engines[0].scraped_at
        low = self._low
        nlow = self._nlow
        if at != self._scraped_at or engines is not self._views:
            self._scraped_at = at
            self._views = engines
            loads = self._loads = [v.waiting + v.running + v.dispatched for v in engines]
            nlow = 0
        else:
            last = self._last
            v = engines[last]
            load = v.waiting + v.running + v.dispatched
            old = loads[last]
            if load != old:
                loads[last] = load
                if load < low:
                    low = load
                    nlow = 1
                elif load == low:
                    nlow += 1
                elif old == low:
                    nlow -= 1  # 0: rescanned below
        if nlow == 0:
            # One pass (compiled: unboxed): the smallest load and how many engines have it.
            low = loads[0]
            nlow = 1
            for i in range(1, len(loads)):
                load = loads[i]
                if load < low:
                    low = load
                    nlow = 1
                elif load == low:
                    nlow += 1
        self._low = low
        self._nlow = nlow
        # The first engine with the smallest load, or (ties at random, drawn as ``rng.choice`` of the tied
        # indices would) the k-th.
        k = self._below(nlow) if nlow > 1 else 0
        choice = 0
        for i in range(len(loads)):
            if loads[i] == low:
                if k == 0:
                    choice = i
                    break
                k -= 1
        self._last = choice
        return choice


def _min_of(values: list[int]) -> int:
    """``min(values)`` of a non-empty list (compiled: a native loop, no generic comparisons)."""
    low = values[0]
    for i in range(1, len(values)):
        v = values[i]
        if v < low:
            low = v
    return low


def _max_of(values: list[int]) -> int:
    """``max(values)`` of a non-empty list (compiled: a native loop, no generic comparisons)."""
    high = values[0]
    for i in range(1, len(values)):
        v = values[i]
        if v > high:
            high = v
    return high


class _ChunkIndex:
    """Per-engine LRU of chunk runs ``node -> chunks`` and the reverse index ``node -> {engine: chunks}``."""

    def __init__(self, engines: int, capacity: int) -> None:
        self.capacity = capacity
        self.lru: list[OrderedDict[int, int]] = [OrderedDict() for _ in range(engines)]
        self.size = [0] * engines
        self.holders: dict[int, dict[int, int]] = {}

    def match(self, runs: list[tuple[int, int]]) -> dict[int, int]:
        """Chunks matched from the start of the prompt, per engine that matches at least one."""
        matched: dict[int, int] = {}
        alive: list[int] = []
        first = True
        holders = self.holders
        for node, count in runs:
            have = holders.get(node)
            if not have:
                break
            nxt: list[int] = []
            if first:  # every holder of the first run matches (counts are >= 1)
                first = False
                for e, got in have.items():
                    matched[e] = got if got < count else count
                    if got >= count:
                        nxt.append(e)
            else:  # only the engines that held every earlier run whole go on
                for e in alive:
                    got = have.get(e, 0)
                    if got:
                        matched[e] += got if got < count else count
                        if got >= count:
                            nxt.append(e)
            if not nxt:
                break
            alive = nxt
        return matched

    def insert(self, engine: int, runs: list[tuple[int, int]]) -> None:
        lru = self.lru[engine]
        holders = self.holders
        for node, count in runs:
            old = lru.get(node)
            if old is None:
                lru[node] = count
                self.size[engine] += count
                have = holders.get(node)
                if have is None:
                    holders[node] = {engine: count}
                else:
                    have[engine] = count
            else:
                if count > old:
                    lru[node] = count
                    self.size[engine] += count - old
                    holders[node][engine] = count
                lru.move_to_end(node)
        while self.size[engine] > self.capacity and lru:
            node, count = lru.popitem(last=False)
            self.size[engine] -= count
            have = holders[node]
            del have[engine]
            if not have:
                del holders[node]


class PrefixLoadRouter(_Base):
    name = "prefix-load"

    def __init__(
        self,
        seed: int = 0,
        *,
        queue_weight: float = 2.0,
        kv_weight: float = 2.0,
        prefix_weight: float = 3.0,
        chunk_chars: int = 64,
        chars_per_token: int = 4,
        max_chunks: int = 256,
        lru_capacity: int = 31_250,
    ) -> None:
        super().__init__(seed)
        self.weights = (queue_weight, kv_weight, prefix_weight)
        self.chunk_tokens = max(chunk_chars // chars_per_token, 1)
        self.max_chunks = max_chunks
        self.lru_capacity = lru_capacity
        self._index: _ChunkIndex | None = None
        # Per scrape: the kv term of every engine and the queues, which only ``dispatched`` changes until
        # the next scrape, and only on the engines this policy chose (the last choice is read back from its
        # view, not counted here, so rejected requests do not count); the queues' min and max, kept with
        # them; and the queue and kv part of the scores (``_base``, for the range ``_bmin``..``_bmax``).
        self._scraped_at = -math.inf
        self._kv_terms: list[float] = []
        self._queues: list[int] = []
        self._qmin = 0
        self._qmax = 0
        self._last = -1
        self._base: list[float] | None = None
        self._bmin = 0
        self._bmax = 0
        self._views: Sequence[EngineView] | None = None

    def route(self, request: SimRequest, engines: Sequence[EngineView]) -> int:
        index = self._index
        n = len(engines)
        if index is None:
            index = self._index = _ChunkIndex(n, self.lru_capacity)
        runs = chunk_runs(request, self.chunk_tokens, partial=True, max_chunks=self.max_chunks)
        total = 0
        for _, count in runs:
            total += count
        matched = index.match(runs)
        wq, wkv, wp = self.weights
        at = engines[0].scraped_at
        queues = self._queues
        qmin = self._qmin
        qmax = self._qmax
        moved = False
        if at != self._scraped_at or engines is not self._views:
            self._scraped_at = at
            self._views = engines
            self._kv_terms = [wkv * (1.0 - v.kv_usage) for v in engines]
            queues = self._queues = [v.waiting + v.dispatched for v in engines]
            qmin = _min_of(queues)
            qmax = _max_of(queues)
            self._base = None
        else:
            last = self._last
            v = engines[last]
            q = v.waiting + v.dispatched
            old = queues[last]
            if q != old:
                moved = True
                queues[last] = q
                if q > qmax:
                    qmax = q
                elif old == qmax:
                    qmax = _max_of(queues)
                if q < qmin:
                    qmin = q
                elif old == qmin:
                    qmin = _min_of(queues)
        self._qmin = qmin
        self._qmax = qmax
        kv_terms = self._kv_terms
        # The queue and kv part of every score, kept until a scrape or until the queues' min or max moves;
        # in between only the last choice's entry changes. Always ``wq + kv`` when all queues are equal,
        # else ``wq / (qmax - qmin) * (qmax - queue) + kv``, computed in this order.
        flat = qmax == qmin
        qs = 0.0 if flat else wq / (qmax - qmin)
        base = self._base
        if base is None or qmin != self._bmin or qmax != self._bmax:
            base = self._base = [(wq if flat else qs * (qmax - queues[i])) + kv_terms[i] for i in range(n)]
            self._bmin = qmin
            self._bmax = qmax
        elif moved:
            last = self._last
            base[last] = (wq if flat else qs * (qmax - queues[last])) + kv_terms[last]
        # One pass over the base (compiled: unboxed): the first highest and how many engines have it.
        choice = 0
        best = base[0]
        ties = 1
        for i in range(1, n):
            score = base[i]
            if score > best:
                best = score
                choice = i
                ties = 1
            elif score == best:
                ties += 1
        # The engines with a prefix match score ``base + prefix x matched`` (every term > 0 in the usual
        # case, checked): those beat their own base, so the best is theirs, or the base's best (whose
        # engines then matched nothing), or both tie.
        prefix = wp / total if total else 0.0
        exact = True
        if matched:
            mbest = -math.inf
            mties = 0
            mfirst = n
            for i, m in matched.items():
                b = base[i]
                score = b + prefix * m
                if not score > b:
                    exact = False
                    break
                if score > mbest:
                    mbest = score
                    mties = 1
                    mfirst = i
                elif score == mbest:
                    mties += 1
                    if i < mfirst:
                        mfirst = i
            if mbest > best:
                best = mbest
                ties = mties
                choice = mfirst
            elif mbest == best:
                ties += mties
                if mfirst < choice:
                    choice = mfirst
        if ties > 1 or not exact:
            # Every score, as the scan above would see it; ties at random, drawn as ``rng.choice`` of the
            # tied indices would: the k-th of them.
            scores = base.copy()
            for i, m in matched.items():
                scores[i] += prefix * m
            choice = 0
            best = scores[0]
            ties = 1
            for i in range(1, n):
                score = scores[i]
                if score > best:
                    best = score
                    choice = i
                    ties = 1
                elif score == best:
                    ties += 1
            if ties > 1:
                k = self._below(ties)
                for i in range(n):
                    if scores[i] == best:
                        if k == 0:
                            choice = i
                            break
                        k -= 1
        index.insert(choice, runs)
        self._last = choice
        return choice


class CacheAwareRouter(_Base):
    name = "cache-aware"
    needs_completions = True

    def __init__(
        self,
        seed: int = 0,
        *,
        cache_threshold: float = 0.3,
        balance_abs_threshold: int = 64,
        balance_rel_threshold: float = 1.5,
        eviction_interval_s: float = 120.0,
        max_tree_size: int = 2**26,
        chars_per_token: int = 4,
    ) -> None:
        super().__init__(seed)
        self.cache_threshold = cache_threshold
        self.balance_abs = balance_abs_threshold
        self.balance_rel = balance_rel_threshold
        self.eviction_interval = eviction_interval_s
        self.max_tree_chars = max_tree_size
        self.cpt = chars_per_token
        self.load: list[int] = []
        self.trees: list[OrderedDict[int, int]] = []
        """Per engine: segment node -> its length in characters, least recently used first."""
        self.tree_chars: list[int] = []
        self.holders: dict[int, set[int]] = {}
        self._last_eviction = 0.0

    def route(self, request: SimRequest, engines: Sequence[EngineView]) -> int:
        n = len(engines)
        if not self.load:
            self.load = [0] * n
            self.trees = [OrderedDict() for _ in range(n)]
            self.tree_chars = [0] * n
        now = engines[0].now
        if now - self._last_eviction >= self.eviction_interval:
            self._evict()
            self._last_eviction = now
        load = self.load
        lo, hi = min(load), max(load)
        nodes = request.nodes[:-1]
        if hi - lo > self.balance_abs and hi > self.balance_rel * lo:
            choice = load.index(lo)
        else:
            matched: dict[int, int] = {}
            alive: set[int] | None = None
            for node, end in zip(nodes, request.ends, strict=False):
                have = self.holders.get(node)
                if not have:
                    break
                alive = set(have) if alive is None else alive & have
                if not alive:
                    break
                for e in alive:
                    matched[e] = end
            best_len = max(matched.values()) if matched else 0
            if best_len / request.prompt_tokens > self.cache_threshold:
                cands = [e for e, m in matched.items() if m == best_len]
                choice = min(cands, key=lambda e: (load[e], e))
            else:
                chars = self.tree_chars
                choice = chars.index(min(chars))
        load[choice] += 1
        self._insert(choice, request)
        return choice

    def on_complete(self, request: SimRequest, engine: int) -> None:
        if self.load:
            self.load[engine] -= 1

    def _insert(self, engine: int, request: SimRequest) -> None:
        tree = self.trees[engine]
        start = 0
        for node, end in zip(request.nodes[:-1], request.ends, strict=False):
            if node in tree:
                tree.move_to_end(node)
            else:
                chars = (end - start) * self.cpt
                tree[node] = chars
                self.tree_chars[engine] += chars
                self.holders.setdefault(node, set()).add(engine)
            start = end

    def _evict(self) -> None:
        for engine, tree in enumerate(self.trees):
            while self.tree_chars[engine] > self.max_tree_chars and tree:
                node, chars = tree.popitem(last=False)
                self.tree_chars[engine] -= chars
                have = self.holders[node]
                have.discard(engine)
                if not have:
                    del self.holders[node]


class OracleRouter(_Base):
    """Perfect knowledge of every engine's queue, batch and cache, and a price on cache misses.

    For each engine: ``cost = predicted TTFT + miss_weight x prefill_s_per_token x uncached prompt
    tokens``, the smallest wins (ties to the fewest requests, then the lowest index). The first term is
    the engine's own prediction from its true state (``FastEngine.predicted_ttft``); the second prices
    what a miss does to *other* requests, which a greedy TTFT minimiser ignores: the prefill work it adds
    to the cluster (every later request on that engine waits for it) and the cached blocks it evicts (a
    group copied to a second engine pushes another group out, whose next request misses in turn). With
    ``miss_weight = 0`` this is the greedy oracle, which past saturation spreads every group over every
    engine, halves the hit rate and collapses; with a weight of a few units a group stays where it is
    cached and spills to another engine only when its queue there costs more than recomputing it
    elsewhere, several times over. It does not look at future arrivals.
    """

    name = "oracle"
    true_state = True

    def __init__(self, seed: int = 0, *, miss_weight: float = 16.0) -> None:
        super().__init__(seed)
        self.miss_weight = miss_weight

    def route(self, request: SimRequest, engines: Sequence[EngineView]) -> int:
        best = (math.inf, 0)
        choice = 0
        prompt = request.prompt_tokens
        for i, v in enumerate(engines):
            ttft = v.predicted_ttft(request)
            cached = v.cached_prefix_tokens(request)
            if ttft is None or cached is None:
                raise ValueError("the oracle needs live engine views")
            cost = ttft + self.miss_weight * v.prefill_s_per_token * (prompt - cached)
            key = (cost, v.running + v.waiting)
            if key < best:
                best = key
                choice = i
        return choice


ROUTERS: dict[str, Callable[[int], Router]] = {
    "random": RandomRouter,
    "round-robin": RoundRobinRouter,
    "least-queue": LeastQueueRouter,
    "prefix-load": PrefixLoadRouter,
    "cache-aware": CacheAwareRouter,
    "oracle": OracleRouter,
}
"""Built-in policies by name; each factory takes a seed."""


def make_router(name: str, seed: int = 0) -> Router:
    try:
        factory = ROUTERS[name]
    except KeyError:
        raise ValueError(f"unknown policy {name!r} (choose from {', '.join(ROUTERS)})") from None
    return factory(seed)
