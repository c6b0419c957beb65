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
    Perfect knowledge of every engine's queue, batch and cache (:mod:`igw_sim.replay.oracle`): the
    predicted TTFT from the engine's true state, a price on cache misses, prefixes of requests it has
    queued counted as cached, and a placement cost that spreads prefix groups by load. The strongest
    policy we know, the reference the others are compared with — not a proven bound (see
    ``docs/simulator.md`` section 6.4).
``oracle-miss-priced``
    The previous oracle: predicted TTFT + ``miss_weight`` x the prefill of the uncached tokens
    (``miss_weight=0`` is the greedy TTFT minimiser).
"""

from __future__ import annotations

import math
import random
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Protocol, final

from igw_sim.replay.oracle import OracleRouter
from igw_sim.replay.requests import SimRequest

__all__ = [
    "ROUTERS",
    "CacheAwareRouter",
    "EngineView",
    "LeastQueueRouter",
    "MissPricedOracleRouter",
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


@final
class _Held:
    """That one engine holds chunks of one node, in :class:`_ChunkIndex`: an entry of the engine's LRU
    list (``prev``/``next``, through the engine's sentinel) and of the node's list of holders
    (``hprev``/``hnext``, ``None`` at its ends)."""

    __slots__ = ("count", "engine", "hnext", "hprev", "next", "node", "prev")

    def __init__(self, node: int, engine: int, count: int, head: _Held | None) -> None:
        self.node = node
        self.engine = engine
        self.count = count
        # Out of the LRU list, both point at the sentinel (itself, for the sentinel): never ``None``, and
        # no reference cycle once unlinked.
        link = head if head is not None else self
        self.prev: _Held = link
        self.next: _Held = link
        self.hprev: _Held | None = None
        self.hnext: _Held | None = None


@final
class _ChunkIndex:
    """Per-engine LRU of chunk runs ``node -> chunks``, and the holders of every node.

    An engine's runs are :class:`_Held` entries, ordered least recently used first in a list through the
    engine's sentinel ``heads[engine]``; ``holders[node]`` is the first of the node's entries, which are
    linked to each other (one per engine that holds the node, in no particular order: a node has few
    holders, and one dict of every node is cheaper than one per engine). Routing a request is :meth:`cut`
    (its runs, into ``run_nodes``/``run_counts``), :meth:`match`, then :meth:`insert` for the chosen
    engine: the lists are reused, so a request allocates nothing but the entries of the runs it adds.
    """

    def __init__(self, engines: int, capacity: int) -> None:
        self.capacity = capacity
        self.heads = [_Held(0, e, 0, None) for e in range(engines)]
        self.size = [0] * engines
        self.holders: dict[int, _Held] = {}
        self.run_nodes: list[int] = []
        self.run_counts: list[int] = []
        self.m_engines: list[int] = []
        """The engines that :meth:`match` found (each once, in no particular order)."""
        self.m_counts: list[int] = []
        """Chunks matched from the start of the prompt, per engine of ``m_engines``."""
        # In :meth:`match`: an engine still matches whole runs while its stamp is the current generation,
        # and its entry in the lists is at ``_pos``.
        self._stamp = [0] * engines
        self._pos = [0] * engines
        self._gen = 0

    def cut(self, request: SimRequest, chunk_tokens: int, max_chunks: int) -> int:
        """``chunk_runs(request, chunk_tokens, partial=True, max_chunks=max_chunks)`` into ``run_nodes`` and
        ``run_counts`` (the same runs, computed the same way); returns the chunks in all."""
        nodes = self.run_nodes
        counts = self.run_counts
        nodes.clear()
        counts.clear()
        ends = request.ends
        prompt = request.prompt_tokens
        rnodes = request.nodes
        total = -(-prompt // chunk_tokens)
        if max_chunks > 0 and max_chunks < total:
            total = max_chunks
        first = 0
        for i in range(len(rnodes) - 1):
            end = ends[i]
            stop = end // chunk_tokens
            if end == prompt and end % chunk_tokens:
                stop += 1
            if stop > total:
                stop = total
            if stop > first:
                nodes.append(rnodes[i])
                counts.append(stop - first)
                first = stop
            if first >= total:
                break
        return first

    def match(self) -> int:
        """Chunks matched from the start of the prompt, per engine that matches at least one, into
        ``m_engines``/``m_counts``; returns how many engines."""
        engines = self.m_engines
        matched = self.m_counts
        engines.clear()
        matched.clear()
        nodes = self.run_nodes
        if not nodes:
            return 0
        holders = self.holders
        counts = self.run_counts
        stamp = self._stamp
        pos = self._pos
        # Every holder of the first run matches (counts are >= 1); only the engines that held every earlier
        # run whole go on (those stamped with ``gen``).
        gen = self._gen + 1
        alive = 0
        count = counts[0]
        h = holders.get(nodes[0])
        while h is not None:
            got = h.count
            e = h.engine
            if got >= count:
                stamp[e] = gen
                pos[e] = len(engines)
                alive += 1
                matched.append(count)
            else:
                matched.append(got)
            engines.append(e)
            h = h.hnext
        for j in range(1, len(nodes)):
            if not alive:
                break
            h = holders.get(nodes[j])
            if h is None:
                break
            count = counts[j]
            nxt = gen + 1
            alive = 0
            while h is not None:
                e = h.engine
                if stamp[e] == gen:
                    got = h.count
                    if got >= count:
                        matched[pos[e]] += count
                        stamp[e] = nxt
                        alive += 1
                    else:
                        matched[pos[e]] += got
                h = h.hnext
            gen = nxt
        self._gen = gen
        return len(engines)

    def insert(self, engine: int) -> None:
        """``engine`` now holds the runs of :meth:`cut` (most recently used); then evict, least recently used
        first, down to the capacity."""
        head = self.heads[engine]
        holders = self.holders
        size = self.size[engine]
        nodes = self.run_nodes
        counts = self.run_counts
        for j in range(len(nodes)):
            node = nodes[j]
            count = counts[j]
            first = holders.get(node)
            h = first
            while h is not None and h.engine != engine:
                h = h.hnext
            if h is None:
                h = _Held(node, engine, count, head)
                size += count
                if first is None:
                    holders[node] = h
                else:  # second in the node's list
                    after = first.hnext
                    h.hprev = first
                    h.hnext = after
                    first.hnext = h
                    if after is not None:
                        after.hprev = h
            else:
                if count > h.count:
                    size += count - h.count
                    h.count = count
                prev = h.prev
                after_ = h.next
                prev.next = after_
                after_.prev = prev
            last = head.prev
            h.prev = last
            h.next = head
            last.next = h
            head.prev = h
        capacity = self.capacity
        while size > capacity:
            h = head.next
            if h is head:
                break
            after_ = h.next
            head.next = after_
            after_.prev = head
            h.prev = h.next = head
            size -= h.count
            hp = h.hprev
            hn = h.hnext
            if hp is None:
                if hn is None:
                    del holders[h.node]
                else:
                    holders[h.node] = hn
                    hn.hprev = None
            else:
                hp.hnext = hn
                if hn is not None:
                    hn.hprev = hp
            h.hprev = h.hnext = None
        self.size[engine] = size


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
        self._bbest = 0.0
        self._bchoice = 0
        self._bties = 0
        self._views: Sequence[EngineView] | None = None

    def route(self, request: SimRequest, engines: Sequence[EngineView]) -> int:
        index = self._index
        n = len(engines)
        if index is None:
            index = self._index = _ChunkIndex(n, self.lru_capacity)
        total = index.cut(request, self.chunk_tokens, self.max_chunks)
        nm = index.match()
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
        # else ``wq / (qmax - qmin) * (qmax - queue) + kv``, computed in this order. With it, its first
        # highest entry (``_bchoice``) and how many entries have that value (``_bties``): a full pass when
        # it is computed, or when the entry that changed was one of the highest and went down.
        flat = qmax == qmin
        qs = 0.0 if flat else wq / (qmax - qmin)
        base = self._base
        rescan = False
        if base is None or qmin != self._bmin or qmax != self._bmax:
            base = self._base = [(wq if flat else qs * (qmax - queues[i])) + kv_terms[i] for i in range(n)]
            self._bmin = qmin
            self._bmax = qmax
            rescan = True
        elif moved:
            last = self._last
            old_score = base[last]
            score = (wq if flat else qs * (qmax - queues[last])) + kv_terms[last]
            base[last] = score
            best = self._bbest
            if score > best:
                self._bbest = score
                self._bchoice = last
                self._bties = 1
            elif score == best:
                if old_score != best:
                    self._bties += 1
                    if last < self._bchoice:
                        self._bchoice = last
            elif old_score == best:
                rescan = True
        if rescan:
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
            self._bbest = best
            self._bchoice = choice
            self._bties = ties
        best = self._bbest
        choice = self._bchoice
        ties = self._bties
        # The engines with a prefix match score ``base + prefix x matched`` (every term > 0 in the usual
        # case, checked): those beat their own base, so the best is theirs, or the base's best (whose
        # engines then matched nothing), or both tie.
        prefix = wp / total if total else 0.0
        exact = True
        m_engines = index.m_engines
        m_counts = index.m_counts
        if nm:
            mbest = -math.inf
            mties = 0
            mfirst = n
            for j in range(nm):
                i = m_engines[j]
                b = base[i]
                score = b + prefix * m_counts[j]
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
            for j in range(nm):
                scores[m_engines[j]] += prefix * m_counts[j]
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
        index.insert(choice)
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


class MissPricedOracleRouter(_Base):
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

    name = "oracle-miss-priced"
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
    "oracle-miss-priced": MissPricedOracleRouter,
    "oracle": OracleRouter,
}
"""Built-in policies by name; each factory takes a seed."""


def make_router(name: str, seed: int = 0) -> Router:
    try:
        factory = ROUTERS[name]
    except KeyError:
        raise ValueError(f"unknown policy {name!r} (choose from {', '.join(ROUTERS)})") from None
    return factory(seed)
