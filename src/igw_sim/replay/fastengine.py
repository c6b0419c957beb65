"""The event-jumping engine: vLLM v1's scheduler over a run-length KV cache, in virtual time.

:class:`FastEngine` computes what :class:`~igw_sim.scheduler.EngineCore` computes, step for step, with
the same step time (:meth:`~igw_sim.profiles.LatencyProfile.step_ms` of the same
:class:`~igw_sim.config.EngineConfig`) and the same scheduling rules, but its cost does not grow with
the number of tokens or of running sequences:

* **Decoding is aggregated.** Once prefilled, a request decodes one token per step until it finishes
  (vLLM gives running requests their tokens first, and ``max_num_seqs <= max_num_batched_tokens``, so no
  decoder ever waits), so a decoder is only ``(counter at join, computed tokens at join, finish
  counter)``: the engine keeps a step counter ``K``, the number of decoders, the sum of their contexts
  (the step's ``context_tokens``), a min-heap of finish counters, and a histogram of their positions
  modulo the block size, from which it knows how many of them start a new block at each step. A step
  costs O(1) whatever the batch size; a request costs O(log n) when it joins or leaves.
* **Steps are jumped.** Between two events of an engine (an arrival, a request's first token or last
  token, or the KV cache running out), every step is a decode step of the same batch, whose context grows
  by one token per sequence: step ``k`` lasts ``A + B k`` exactly (``step_ms`` is affine in the context
  with a fixed batch), so ``j`` steps take ``j A + B j (j - 1) / 2`` and :meth:`FastEngine.advance`
  applies them at once. While nothing waits, a run goes on past the steps that finish requests, with
  the smaller batch; the step that straddles the time asked for is put in flight by the same call (its
  blocks taken, its end computed), and requests that arrive during it join the next step together, as
  in vLLM.
* **The KV cache is run-length.** A request's prompt is a path of trie nodes (see
  :mod:`igw_sim.replay.requests`); the cache records, per node, how many of its blocks (a prefix of
  them) are cached, and how many running requests hold them. The free queue holds runs, not blocks:
  whole nodes nobody holds, and counts of *plain* blocks (never used, or a sequence's partial last
  block). Freeing a request puts its partial block at the front (vLLM 0.32 reuses blocks without a hash
  first), then appends its nodes last-first, as vLLM appends the cached blocks of a block table in
  reverse; allocation takes from the front and trims the tail of a cached node, so a prefix loses its
  tail first, as in vLLM. One of ``kv_blocks`` is vLLM's null block: ``kv_blocks - 1`` are usable.

Where it differs from :class:`~igw_sim.scheduler.EngineCore` (all of it is tested in
``tests/sim/test_sim_replay_agreement.py``):

1. A node is cached or reclaimed as a whole run: a hit that the ``num_tokens - 1`` cap cuts one block
   short takes that block out of the free queue with its node (vLLM leaves it there and computes a
   copy; the number of free blocks is the same); two requests that compute the same uncached
   block at the same time share it (vLLM keeps two copies); a node cached beyond a gap in its path is
   reused (vLLM recomputes it); when a request takes cached blocks of a node it holds them all, so they
   leave the free queue together.
2. ``max_num_batched_tokens`` must be at least ``max_num_seqs``.

LoRA is modelled as ``EngineCore`` does it: the adapter is part of every block hash (the trie root), a
waiting request whose adapter is not among the step's adapters is skipped once ``max_loras`` are in the
step, and every adapter of a step that is not resident is loaded into a slot (least recently used
evicted first), adding ``lora_load_ms`` to the step. Once a request names an adapter, steps are planned
one by one while requests wait (the skip rule can admit a request behind a head that cannot be).
"""

from __future__ import annotations

import heapq
import math
from collections import OrderedDict, deque
from typing import Final, final

from igw_sim.config import EngineConfig
from igw_sim.replay.requests import SimRequest
from igw_sim.replay.results import Recorder

__all__ = ["FastEngine", "RejectedError"]

_WAITING, _PREFILL, _DECODE, _DONE = 0, 1, 2, 3
_SEQ_BITS: Final = 32
_SEQ_MASK: Final = (1 << _SEQ_BITS) - 1
# Compiled, a Final module attribute is a C static: no lookup of ``heapq`` and its attribute per call.
_heappush: Final = heapq.heappush
_heappop: Final = heapq.heappop


class RejectedError(Exception):
    """The engine refused a request (vLLM's 400 or 429); ``status`` is the HTTP status."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@final
class _Node:
    """Cache state of one trie node in one engine, or a run of plain blocks; while nobody holds it, an
    entry of the engine's free queue (a doubly linked list through ``prev`` and ``next``)."""

    __slots__ = ("key", "n", "next", "owner", "plain", "prev", "ref")

    def __init__(self, key: int, head: _Node | None) -> None:
        self.key = key
        """The node id (``FastEngine.nodes``'s key); 0 for a plain run."""
        self.n = 0
        """Cached (materialised) blocks of the node, from its first block; the blocks of a plain run."""
        self.ref = 0
        """Running requests that hold its blocks."""
        self.owner: _Req | None = None
        """The decoding request whose output this is: ``n`` then lags its progress (see ``_sync``)."""
        self.plain = False
        """A run of blocks without cached content (never used, or a sequence's partial last block)."""
        # Out of the queue, both point at the queue's head (the sentinel, which points at itself when the
        # queue is empty): never ``None``, and never a reference cycle once unlinked.
        link = head if head is not None else self
        self.prev: _Node = link
        self.next: _Node = link


@final
class _Req:
    """One request inside one :class:`FastEngine`."""

    __slots__ = (
        "absorbed",
        "alloc",
        "base",
        "c0",
        "cached",
        "computed",
        "dup",
        "est",
        "finish_k",
        "first_token",
        "generated",
        "hi",
        "k0",
        "nodes",
        "nref",
        "num_tokens",
        "out",
        "out_hi",
        "out_lo",
        "partial",
        "res",
        "seq",
        "sim",
        "state",
        "step_new",
        "sts",
    )

    def __init__(self, sim: SimRequest, block_size: int, caching: bool) -> None:
        self.sim = sim
        hi: list[int] = []
        first = 0
        ends = sim.ends
        all_nodes = sim.nodes
        count = len(all_nodes)
        out = False
        for i in range(count):
            stop = ends[i] // block_size
            if stop > first:  # nodes that own no full block play no part in the cache
                hi.append(stop)
                out = True
            else:
                out = False
            first = stop
        if caching and len(hi) == count:
            self.nodes = all_nodes  # the usual case: no copy
        else:
            nodes: list[int] = []
            first = 0
            for i in range(count):
                stop = ends[i] // block_size
                if stop > first:
                    nodes.append(all_nodes[i] if caching else -(sim.request_id * 4096 + i) - 1)
                first = stop
            self.nodes = tuple(nodes)
        """The nodes that own a full block (the others play no part in the cache)."""
        self.hi = hi
        """Node ``i`` owns blocks ``[hi[i - 1], hi[i])`` (from 0 for the first node)."""
        self.out = out
        """The last node is the output's."""
        self.out_hi = hi[-1] if out else 0
        self.out_lo = (hi[-2] if len(hi) > 1 else 0) if out else 0
        """The output node's blocks (when ``out``)."""
        self.num_tokens = sim.prompt_tokens
        self.computed = 0
        self.alloc = 0
        """Tokens the request holds KV slots for."""
        self.partial = 0
        """1 when it holds a private, partially filled last block."""
        self.dup = 0
        """Private copies of cached blocks it recomputes (see ``FastEngine._lookup``)."""
        self.est = 0
        """Uncached prompt tokens expected when it was queued (for predictions)."""
        self.base = 0
        """Blocks of its output node it held when it started decoding."""
        self.absorbed = 0
        """Blocks it has filled by decoding that extended its output node (the others are copies)."""
        self.nref = 0
        """Nodes ``[0, nref)`` are held."""
        self.sts: list[_Node] = []
        """The states of the nodes it holds (``nref`` of them): held nodes are never evicted."""
        self.step_new = 0
        """Tokens it computes in the step in flight (when in ``FastEngine._sched``)."""
        self.generated = 0
        self.state = _WAITING
        self.cached = -1
        self.first_token = -1.0
        self.seq = 0
        self.k0 = self.c0 = self.res = self.finish_k = 0


_NO_REQS: Final[list[_Req]] = []
"""The (shared, never filled) schedule of a decode-only step."""


@final
class FastEngine:
    """One engine in virtual time (see the module docstring). Single-threaded; times in simulated seconds.

    The driver calls :meth:`advance` with non-decreasing times, and :meth:`submit` at a request's arrival.
    A step that starts before ``t`` is planned, and one that ends at or before ``t`` is applied: requests
    submitted at ``t`` join the first step that starts at or after ``t``.
    """

    def __init__(
        self, config: EngineConfig, *, index: int = 0, recorder: Recorder | None = None, predictions: bool = False
    ) -> None:
        if config.max_num_batched_tokens < config.max_num_seqs:
            raise ValueError("the fast engine needs max_num_batched_tokens >= max_num_seqs (use the exact engine)")
        self.config = config
        self.index = index
        self.recorder = recorder if recorder is not None else Recorder(index + 1)
        self.profile = config.profile
        self.bs = config.block_size
        self.num_blocks = config.kv_blocks - 1
        """Usable blocks: vLLM sets one of ``num_gpu_blocks`` aside as its null block."""
        self.caching = config.enable_prefix_caching
        # The limits read per request and per step, as native ints (``config`` is a Python object: every
        # attribute read from compiled code is a generic lookup).
        self.max_num_seqs = config.max_num_seqs
        self.max_num_batched_tokens = config.max_num_batched_tokens
        self.max_model_len = config.max_model_len
        self.max_waiting = config.max_waiting
        p = self.profile
        self._kv_s_per_token = p.ms_per_kv_ktoken / 1e6
        # ``step_ms``'s constants as native floats (see :meth:`_step_ms`).
        self._overhead_ms = p.step_overhead_ms
        self._weights_ms = p.weights_ms
        self._ms_per_token = p.ms_per_token
        self._ms_per_decode_seq = p.ms_per_decode_seq
        self._ms_per_kv_ktoken = p.ms_per_kv_ktoken
        self._prefill_overhead_ms = p.prefill_overhead_ms
        # cache
        self.free = 0
        self.nodes: dict[int, _Node] = {}
        self.head = _Node(0, None)
        """The free queue's sentinel: ``head.next`` is its front, ``head.prev`` its back. Its entries are
        cached nodes nobody holds and runs of plain blocks (vLLM's free block queue, run-length)."""
        self._free_plain(self.num_blocks)
        # scheduler
        self.predictions = predictions
        """Keep the queued uncached tokens up to date, for :meth:`predicted_ttft` (costs a lookup per request)."""
        self.pending_prefill = 0
        self.waiting: deque[_Req] = deque()
        self.running: dict[_Req, None] = {}
        self.prefilling: _Req | None = None
        # decoders
        self.K = 0
        self.n_dec = 0
        self.ctx = 0
        self.hist = [0] * self.bs
        self.heap: list[int] = []
        """Finish counters of the decoders, ``finish_k << 32 | seq`` (ordered as ``(finish_k, seq)``), and
        stale ones of requests that left; ``by_seq`` maps each entry's ``seq`` to its request."""
        self.by_seq: dict[int, _Req] = {}
        self._seq = 0
        # the step in flight
        self._inflight = False
        self._start = 0.0
        self._end = 0.0
        self._next: float | None = None
        self._sched: list[_Req] = _NO_REQS
        """The requests that compute tokens in the step in flight (``step_new`` each)."""
        self._step_dec = 0
        # The last :meth:`_stable` look at the head of the queue (``_hh_req``, ``None`` when none): its hit
        # blocks, duplicate blocks, the evicted blocks then, the tokens it would hold and the free blocks
        # that takes.
        self._hh_req: _Req | None = None
        self._hh_blocks = 0
        self._hh_dup = 0
        self._hh_evicted = 0
        self._hh_total = 0
        self._hh_need = 0
        # LoRA: adapters resident in slots (least recently used first), and the decoders' adapters
        self.resident_loras: OrderedDict[str, None] = OrderedDict()
        self.decoding_loras: dict[str, int] = {}
        self.lora_mode = False
        """Some request named an adapter: admission follows the ``max_loras`` rule, step by step."""
        self.lora_loads = 0
        # counters (vLLM's names)
        self.prefix_queries = 0
        self.prefix_hits = 0
        self.preemptions = 0
        self.steps = 0
        self.busy_s = 0.0
        self.generation_tokens = 0
        self.evicted_blocks = 0

    # -- what routers and scrapes read -------------------------------------------------------------

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def kv_usage(self) -> float:
        return 1.0 - self.free / self.num_blocks

    @property
    def idle(self) -> bool:
        return not self._inflight and self._next is None

    def cached_prefix_tokens(self, request: SimRequest) -> int:
        """Prompt tokens of ``request`` that would hit this engine's cache now (capped like vLLM)."""
        if not self.caching:
            return 0
        bs = self.bs
        states = self.nodes
        blocks = 0
        start = 0
        nodes = request.nodes
        ends = request.ends
        for i in range(len(nodes) - 1):
            end = ends[i]
            first, stop = start // bs, end // bs
            start = end
            if stop == first:
                continue
            st = states.get(nodes[i])
            if st is None:
                break
            if st.owner is not None:
                self._sync(st, st.owner)
            if st.n < stop - first:
                blocks = first + st.n
                break
            blocks = stop
        return min(blocks, (request.prompt_tokens - 1) // bs) * bs

    def predicted_ttft(self, request: SimRequest, now: float) -> float:
        """A prediction of the request's TTFT if it arrived now, from the engine's true state.

        Queueing plus prefill: the uncached prompt tokens already queued (and the rest of a chunked prompt)
        and this request's own are computed in chunks of the budget left by the decoders, each chunk a step
        of ``step_ms``; when no running slot is free, add the time until enough decoders finish. KV
        pressure and later arrivals are ignored.
        """
        self.advance(now)
        cfg = self.config
        wait = max(self._end - now, 0.0) if self._inflight else 0.0
        mine = request.prompt_tokens - self.cached_prefix_tokens(request)
        if self.predictions:
            ahead = self.pending_prefill
        else:
            ahead = sum(r.num_tokens - self._hit_blocks(r) * self.bs for r in self.waiting)
        p = self.prefilling
        if p is not None:
            ahead += p.num_tokens - p.alloc
        tokens = ahead + mine
        chunk = max(cfg.max_num_batched_tokens - self.n_dec, 1)
        steps = -(-tokens // chunk)
        step_s = (
            self.profile.step_ms(prefill_tokens=min(tokens, chunk), decode_seqs=self.n_dec, context_tokens=self.ctx)
            / 1000.0
        )
        prefill = steps * step_s
        short = len(self.running) + len(self.waiting) + 1 - cfg.max_num_seqs
        if short > 0:
            left = sorted(fk - self.K for fk, r in self._decoders())
            decode_s = self.profile.step_ms(prefill_tokens=0, decode_seqs=self.n_dec, context_tokens=self.ctx) / 1000.0
            steps_left = left[short - 1] if short <= len(left) else (left[-1] if left else 0) * 2 + 1
            slot = steps_left * decode_s + (-(-mine // chunk)) * step_s
            prefill = max(prefill, slot)
        return wait + prefill

    # -- driving -----------------------------------------------------------------------------------

    def submit(self, request: SimRequest, now: float) -> None:
        """A request arrives at ``now``. Raises :class:`RejectedError` like vLLM's admission checks."""
        total = request.prompt_tokens + request.output_tokens
        if total > self.max_model_len:
            raise RejectedError(400, f"prompt + max_tokens = {total} exceeds max_model_len {self.max_model_len}")
        if -(-total // self.bs) > self.num_blocks:
            raise RejectedError(400, f"the request needs {total} tokens of KV cache")
        self.advance(now)
        if len(self.running) >= self.max_num_seqs and len(self.waiting) >= self.max_waiting:
            raise RejectedError(429, "waiting queue is full")
        r = _Req(request, self.bs, self.caching)
        if request.lora is not None:
            self.lora_mode = True
        if self.predictions:
            r.est = r.num_tokens - self._hit_blocks(r) * self.bs
            self.pending_prefill += r.est
        self.waiting.append(r)
        rec = self.recorder
        if len(self.waiting) > rec.max_waiting[self.index]:
            rec.max_waiting[self.index] = len(self.waiting)
        if not self._inflight and self._next is None:
            self._next = now

    def advance(self, t: float) -> None:
        """Apply every step that ends at or before ``t``; plan the one that starts before ``t``."""
        while True:
            if self._inflight:
                if self._end > t:
                    return
                self._complete()
            s = self._next
            if s is None or s >= t:
                return
            if self.n_dec and self.prefilling is None and self._stable():
                s = self._decode(s, t)
                if s is None:
                    continue
            self._plan(s)

    def next_wake(self) -> float:
        """When the next request may finish, if nothing arrives (``inf`` when idle); never too late."""
        if self._inflight:
            base, pending = self._end, 1
        elif self._next is not None:
            base, pending = self._next, 0
        else:
            return math.inf
        if not self.n_dec or self.prefilling is not None or self._sched or not self._stable():
            self._hh_req = None
            return self._end if self._inflight else base
        self._hh_req = None
        left = self._first_finish() - self.K - pending
        if left <= 0:
            return self._end if self._inflight else base
        a = (
            self.profile.step_ms(
                prefill_tokens=0, decode_seqs=self.n_dec, context_tokens=self.ctx + pending * self.n_dec
            )
            / 1000.0
        )
        b = self.n_dec * self._kv_s_per_token
        return base + left * a + b * left * (left - 1) / 2.0

    # -- cache -------------------------------------------------------------------------------------

    def _lookup(self, r: _Req) -> tuple[int, int]:
        """``(hit blocks, duplicate blocks)`` if ``r`` were admitted now.

        The hit is capped at ``num_tokens - 1`` tokens. When the cap leaves out a cached block that a
        running request holds, vLLM computes a second copy of it: that is the one duplicate block. (When
        nobody holds it, vLLM leaves it in the free queue while this model takes the whole node: the same
        number of free blocks.)
        """
        states = self.nodes
        nodes = r.nodes
        hi = r.hi
        blocks = 0
        first = 0
        last: _Node | None = None
        for i in range(len(nodes)):
            st = states.get(nodes[i])
            if st is None:
                break
            if st.owner is not None:
                self._sync(st, st.owner)
            last = st
            stop = hi[i]
            if st.n < stop - first:
                blocks = first + st.n
                break
            blocks = first = stop
        cap = (r.num_tokens - 1) // self.bs
        if blocks <= cap:
            return blocks, 0
        return cap, 1 if last is not None and last.ref > 0 else 0

    def _hit_blocks(self, r: _Req) -> int:
        return self._lookup(r)[0]

    def _need(self, r: _Req, new_total: int) -> int:
        """Free blocks that growing ``r``'s allocation to ``new_total`` tokens takes (reclaims included)."""
        full = new_total // self.bs
        need = (1 if new_total % self.bs else 0) - r.partial
        states = self.nodes
        nodes, hi = r.nodes, r.hi
        nref = r.nref
        i = nref - 1 if nref else 0
        first = hi[i - 1] if i else 0
        while i < len(nodes):
            if first >= full:
                break
            stop = hi[i]
            target = (stop if stop < full else full) - first
            first = stop
            st = r.sts[i] if i < nref else states.get(nodes[i])
            if st is None:
                need += target
            else:
                if i >= nref and st.ref == 0:
                    need += st.n
                if target > st.n:
                    need += target - st.n
            i += 1
        return need

    def _grow(self, r: _Req, new_total: int) -> None:
        """Hold KV slots for ``new_total`` tokens of ``r`` (the caller checked :meth:`_need`)."""
        full = new_total // self.bs
        states = self.nodes
        head = self.head
        nodes, hi = r.nodes, r.hi
        sts = r.sts
        old = r.nref
        # From the last node it holds (which may grow), through the new ones it starts.
        i = old - 1 if old else 0
        first = hi[i - 1] if i else 0
        ext = 0
        count = len(nodes)
        while i < count and first < full:
            st: _Node | None
            if i < old:
                st = sts[i]
            else:
                node = nodes[i]
                st = states.get(node)
                if st is None:
                    st = states[node] = _Node(node, head)
                elif st.ref == 0 and st.n:
                    # Reclaimed from the free queue.
                    prev = st.prev
                    nxt = st.next
                    prev.next = nxt
                    nxt.prev = prev
                    st.prev = st.next = head
                    self.free -= st.n
                st.ref += 1
                sts.append(st)
            stop = hi[i]
            target = (stop if stop < full else full) - first
            first = stop
            if target > st.n:
                ext += target - st.n
                st.n = target
            i += 1
        r.nref = i
        partial = 1 if new_total % self.bs else 0
        ext += partial - r.partial
        r.partial = partial
        r.alloc = new_total
        if ext > 0:
            self._take(ext)
        else:
            self._free_plain(-ext)

    def _take(self, k: int) -> None:
        """Take ``k`` free blocks from the front of the free queue, evicting the cached ones taken."""
        self.free -= k
        head = self.head
        while k:
            e = head.next
            n = e.n
            if n > k:
                e.n = n - k
                if not e.plain:
                    self.evicted_blocks += k
                return
            k -= n
            nxt = e.next
            head.next = nxt
            nxt.prev = head
            e.prev = e.next = head
            if not e.plain:
                self.evicted_blocks += n
                del self.nodes[e.key]

    def _free_plain(self, k: int, front: bool = False) -> None:
        """Put ``k`` blocks that hold no cached content in the free queue: at the back, or at the ``front``
        (to be reused first: vLLM 0.32's ``BlockPool.free_blocks`` does that with blocks without a hash)."""
        if k <= 0:
            return
        self.free += k
        head = self.head
        end = head.next if front else head.prev
        if end.plain:  # the sentinel is not plain: an empty queue gets a new run
            end.n += k
            return
        e = _Node(0, head)
        e.plain = True
        e.n = k
        if front:
            e.next = end
            head.next = e
            end.prev = e
        else:
            e.prev = end
            head.prev = e
            end.next = e

    def _release(self, r: _Req) -> None:
        """Give back ``r``'s blocks, last first; cached ones stay cached until evicted."""
        self._free_plain(r.partial, front=True)
        self._free_plain(r.dup)
        r.partial = r.dup = 0
        self._unref_nodes(r)

    def _unref_nodes(self, r: _Req) -> None:
        """Drop ``r``'s references to its nodes, last first: a node nobody holds any more stays cached
        (at the back of the free queue, evictable) or, with caching off, is freed."""
        sts = r.sts
        if self.caching:
            head = self.head
            for i in range(r.nref - 1, -1, -1):
                st = sts[i]
                st.ref -= 1
                if st.ref == 0:
                    if st.n:
                        last = head.prev
                        st.prev = last
                        st.next = head
                        last.next = st
                        head.prev = st
                        self.free += st.n
                    else:
                        del self.nodes[st.key]
        else:
            for i in range(r.nref - 1, -1, -1):
                st = sts[i]
                st.ref -= 1
                if st.ref == 0:
                    self._free_plain(st.n, front=True)  # caching is off: no block has a hash
                    del self.nodes[st.key]
        sts.clear()
        r.nref = 0
        r.alloc = 0

    # -- decoders ----------------------------------------------------------------------------------

    def _sync(self, st: _Node, owner: _Req) -> None:
        """Bring a decoding request's output node up to the blocks its tokens filled so far (vLLM caches
        each block of generated tokens as soon as it is full, so a later request can hit it)."""
        target = min((owner.c0 + self.K - owner.k0) // self.bs, owner.out_hi) - owner.out_lo
        if target > st.n:
            owner.absorbed += target - st.n
            st.n = target

    def _leave(self, r: _Req) -> None:
        """``r`` stops decoding (finished or preempted): settle its counters and its output blocks."""
        c = r.c0 + self.K - r.k0
        lora = r.sim.lora
        if lora is not None:
            left = self.decoding_loras[lora] - 1
            if left:
                self.decoding_loras[lora] = left
            else:
                del self.decoding_loras[lora]
        self.n_dec -= 1
        self.ctx -= c
        self.hist[r.res] -= 1
        r.generated += self.K - r.k0
        r.computed = c
        r.num_tokens = c + 1
        r.alloc = c
        r.partial = 1 if c % self.bs else 0
        if r.out:
            st = r.sts[-1]  # it holds its output node while it decodes
            self._sync(st, r)
            st.owner = None
            # Output blocks it filled that another request had already computed (quoting the answer
            # while it was generated) are private copies.
            own = max(min(c // self.bs, r.out_hi) - r.out_lo, 0)
            r.dup += own - r.base - r.absorbed

    def _finish(self, r: _Req, now: float) -> None:
        """``r`` generated its last token at ``now``: settle its counters, give back its blocks, record it.

        The decoder's exit (:meth:`_leave`) and :meth:`_release` inlined: this runs once per request.
        """
        bs = self.bs
        if r.state == _DECODE:
            steps = self.K - r.k0
            c = r.c0 + steps
            lora = r.sim.lora
            if lora is not None:
                left = self.decoding_loras[lora] - 1
                if left:
                    self.decoding_loras[lora] = left
                else:
                    del self.decoding_loras[lora]
            self.n_dec -= 1
            self.ctx -= c
            self.hist[r.res] -= 1
            r.generated += steps
            r.computed = c
            partial = 1 if c % bs else 0
            plain = r.dup
            if r.out:
                st = r.sts[-1]  # it holds its output node while it decodes
                own = min(c // bs, r.out_hi) - r.out_lo
                if own > st.n:  # vLLM cached each block of generated tokens as it filled (see _sync)
                    r.absorbed += own - st.n
                    st.n = own
                st.owner = None
                # Output blocks it filled that another request had already computed (quoting the answer
                # while it was generated) are private copies.
                plain += max(own, 0) - r.base - r.absorbed
        else:
            partial = r.partial
            plain = r.dup
        r.state = _DONE
        del self.running[r]
        # _release: its partial block (to the front) and copies, then its nodes last first; cached ones
        # stay cached.
        if partial:
            self._free_plain(1, front=True)
        if plain > 0:
            self._free_plain(plain)
        r.partial = r.dup = 0
        self._unref_nodes(r)
        self.recorder.finish(r.sim, self.index, r.first_token, now, r.cached)

    def _preempt(self, r: _Req) -> None:
        if r.state == _DECODE:
            self._leave(r)
        else:
            self.prefilling = None
        del self.running[r]
        self._release(r)
        r.computed = 0
        r.state = _WAITING
        if self.predictions:
            r.est = r.num_tokens - self._hit_blocks(r) * self.bs
            self.pending_prefill += r.est
        self.waiting.appendleft(r)
        self.preemptions += 1

    # -- steps -------------------------------------------------------------------------------------

    def _stable(self) -> bool:
        """No waiting request can be admitted until a request finishes (so the batch stays as it is)."""
        if not self.waiting or len(self.running) >= self.max_num_seqs:
            return True
        if self.lora_mode:
            return False  # the max_loras rule may skip the head and admit one behind it: plan every step
        head = self.waiting[0]
        blocks, dup = self._lookup(head)
        hit = blocks * self.bs
        total = hit + min(head.num_tokens - hit, self.max_num_batched_tokens - self.n_dec)
        need = self._need(head, total)
        # _plan, called next when this is False, reuses the lookup unless its decoders evict something.
        self._hh_req = head
        self._hh_blocks = blocks
        self._hh_dup = dup
        self._hh_evicted = self.evicted_blocks
        self._hh_total = total
        self._hh_need = need
        return need + dup > self.free - self.hist[(-self.K) % self.bs]

    def _decode(self, s: float, t: float) -> float | None:
        """Apply decode-only steps from ``s`` (the batch is stable: nothing can be admitted) at once.

        Runs of steps that end by ``t`` are applied up to each step that finishes a request; while nothing
        waits, the run goes on with the smaller batch. The step that straddles ``t`` is put in flight (its
        blocks taken now, as :meth:`_plan` would), so the next arrival joins the step after it, as in vLLM.
        Returns ``None``, or the start of the next step when not even that one fits in the free blocks
        (:meth:`_plan` preempts).
        """
        heap = self.heap
        bs = self.bs
        hist = self.hist
        p = self.profile
        kvs = self._kv_s_per_token
        overhead, weights, mpt, per_seq, kv = (
            p.step_overhead_ms, p.weights_ms, p.ms_per_token, p.ms_per_decode_seq, p.ms_per_kv_ktoken,
        )  # fmt: skip
        waiting = self.waiting
        self._hh_req = None
        while True:
            fk = self._first_finish()
            k0 = self.K
            n = self.n_dec
            j = fk - k0  # up to the step that finishes the first request (>= 1)
            free = self.free
            if free < n * (-(-j // bs)):
                # KV: n blocks every bs steps; count whole cycles, then walk the next one.
                cycles = free // n
                used = cycles * n
                walk = cycles * bs
                k = k0 + walk
                while walk < j:
                    need = hist[(-k) % bs]
                    if used + need > free:
                        break
                    used += need
                    walk += 1
                    k += 1
                j = walk
                if j <= 0:
                    self._next = s
                    return s
            ctx = self.ctx
            compute = n * mpt
            a = (overhead + (weights if weights > compute else compute) + (n * per_seq + ctx * kv / 1000.0)) / 1000.0
            b = n * kvs
            jt = j
            if t != math.inf:
                span = t - s
                if b > 0:
                    half = a - b / 2.0
                    jt = int((-half + math.sqrt(half * half + 2.0 * b * span)) / b)
                elif a > 0:
                    jt = int(span / a)
                jt = max(jt, 0)
                while jt > 0 and jt * a + b * jt * (jt - 1) / 2.0 > span:
                    jt -= 1
                while jt < j and (jt + 1) * a + b * (jt + 1) * jt / 2.0 <= span:
                    jt += 1
            straddle = jt < j
            if straddle:
                j = jt
            # Blocks the decoders start: hist over the residues (-k) % bs for k in [k0, k0 + j), and in the
            # step in flight (all taken at once: the free queue ends up the same).
            cycles, rest = divmod(j + straddle, bs)
            blocks = cycles * n
            if rest:
                top = (-k0) % bs + 1
                low = top - rest
                blocks += sum(hist[low:top]) if low >= 0 else sum(hist[:top]) + sum(hist[bs + low :])
            if blocks:
                self._take(blocks)
            if j:
                if self.decoding_loras:
                    self._load_loras(set(self.decoding_loras))  # every step needs the same, resident adapters
                span = j * a + b * j * (j - 1) / 2.0
                self.K = k = k0 + j
                self.ctx = ctx + j * n
                self.steps += j
                self.busy_s += span
                self.generation_tokens += j * n
                s = s + span
            if straddle:
                # The step in flight at t: decode only (the driver submits arrivals after this).
                if self.decoding_loras:
                    self._load_loras(set(self.decoding_loras))
                self._sched = _NO_REQS
                self._step_dec = n
                self._inflight = True
                self._start = s
                self._end = s + (a + b * j)
                self._next = s
                return None
            if heap[0] >> _SEQ_BITS <= k:
                self._finish_until(k, s)
            if not self.n_dec or waiting:
                self._next = s
                return None

    def _plan(self, now: float) -> None:
        """Schedule one step at ``now`` (vLLM's ``schedule``): running requests, then waiting ones."""
        cfg = self.config
        bs = self.bs
        budget = self.max_num_batched_tokens - self.n_dec
        head_hit = self._hh_req
        self._hh_req = None
        dec_need = self.hist[(-self.K) % bs] if self.n_dec else 0
        sched: list[_Req] = []
        p = self.prefilling
        p_new = 0
        p_need = 0
        if p is not None and budget > 0:
            p_new = min(p.num_tokens - p.computed, budget)
            p_need = self._need(p, p.computed + p_new)
        preempted = False
        if dec_need + p_need > self.free:
            # vLLM preempts the last running request until the allocations fit (recompute mode).
            if p is not None:
                self._preempt(p)
                p = None
                p_need = p_new = 0
            while dec_need > self.free and self.running:
                victim = next(reversed(self.running))
                if victim.res == (-self.K) % bs:
                    dec_need -= 1
                self._preempt(victim)
            budget = self.max_num_batched_tokens - self.n_dec
            preempted = True
        if dec_need:
            self._take(dec_need)
        if p is not None and p_new:
            self._grow(p, p.computed + p_new)
            p.step_new = p_new
            sched.append(p)
            budget -= p_new
        loras: set[str] | None = None
        if self.lora_mode:
            loras = set(self.decoding_loras)
            if sched and p is not None and p.sim.lora is not None:
                loras.add(p.sim.lora)
        if not preempted:
            waiting = self.waiting
            running = self.running
            skipped: list[_Req] = []
            max_seqs = self.max_num_seqs
            while waiting and budget > 0 and len(running) < max_seqs:
                r = waiting[0]
                lora = r.sim.lora
                if loras is not None and lora is not None and lora not in loras and len(loras) >= cfg.max_loras:
                    skipped.append(waiting.popleft())  # vLLM skips it and keeps looking behind it
                    continue
                if head_hit is r and self._hh_evicted == self.evicted_blocks:
                    blocks = self._hh_blocks
                    dup = self._hh_dup
                    need = self._hh_need
                    hit = blocks * bs
                    num_new = min(r.num_tokens - hit, budget)
                    if hit + num_new != self._hh_total:
                        need = self._need(r, hit + num_new)
                else:
                    blocks, dup = self._lookup(r)
                    hit = blocks * bs
                    num_new = min(r.num_tokens - hit, budget)
                    need = self._need(r, hit + num_new)
                head_hit = None
                if need + dup > self.free:
                    break
                waiting.popleft()
                self.pending_prefill -= r.est
                self._grow(r, hit + num_new)
                if dup:
                    r.dup = dup
                    self._take(dup)
                r.computed = hit
                r.state = _PREFILL
                seq = self._seq = self._seq + 1
                if seq > _SEQ_MASK:
                    raise OverflowError("more than 2**32 admissions in one engine")
                r.seq = seq
                running[r] = None
                if r.cached < 0:
                    r.cached = hit
                    self.prefix_queries += r.num_tokens
                    self.prefix_hits += hit
                if num_new < r.num_tokens - hit:
                    self.prefilling = r
                r.step_new = num_new
                sched.append(r)
                budget -= num_new
                if loras is not None and lora is not None:
                    loras.add(lora)
            if skipped:
                waiting.extendleft(reversed(skipped))
        n = self.n_dec
        if not sched and not n:
            self._next = None
            return
        prefill = 0
        resumed = 0
        ctx = self.ctx
        for r in sched:
            num_new = r.step_new
            if num_new == 1 and r.generated and r.computed == r.num_tokens - 1:
                resumed += 1  # a preempted decoder whose whole context hit: a decode seq (as EngineCore counts it)
            else:
                prefill += num_new
            ctx += r.computed
        ms = self._step_ms(prefill, n + resumed, ctx)
        if loras:
            ms += self._load_loras(loras) * cfg.lora_load_ms
        self._sched = sched
        self._step_dec = n
        self._inflight = True
        self._start = now
        self._end = now + ms / 1000.0

    def _step_ms(self, prefill_tokens: int, decode_seqs: int, context_tokens: int) -> float:
        """``LatencyProfile.step_ms`` with the same operations in the same order (the same floats), native."""
        compute = (prefill_tokens + decode_seqs) * self._ms_per_token
        weights = self._weights_ms
        ms = self._overhead_ms + (compute if compute > weights else weights)
        ms += decode_seqs * self._ms_per_decode_seq + context_tokens * self._ms_per_kv_ktoken / 1000.0
        if prefill_tokens:
            ms += self._prefill_overhead_ms
        return ms

    def _load_loras(self, needed: set[str]) -> int:
        """Load the step's adapters into slots, least recently used evicted first (``EngineCore._load_loras``);
        returns how many were loaded."""
        resident = self.resident_loras
        loads = sorted(name for name in needed if name not in resident)
        for name in loads:
            if len(resident) >= self.config.max_loras:
                victim = next((n for n in resident if n not in needed), None)
                if victim is not None:
                    del resident[victim]
            resident[name] = None
        for name in sorted(needed):
            resident.move_to_end(name)
        self.lora_loads += len(loads)
        return len(loads)

    def _complete(self) -> None:
        """Apply the step in flight at its end (vLLM's ``update_from_output``)."""
        now = self._end
        self._inflight = False
        self._next = now
        self.steps += 1
        self.busy_s += now - self._start
        n = self._step_dec
        if n:
            self.K = k = self.K + 1
            self.ctx += n
            self.generation_tokens += n
            heap = self.heap
            if heap and heap[0] >> _SEQ_BITS <= k:
                self._finish_until(k, now)
        sched = self._sched
        if not sched:
            return
        self._sched = _NO_REQS
        bs = self.bs
        for r in sched:
            if r.state != _PREFILL:
                continue
            c = r.computed = r.computed + r.step_new
            if c < r.num_tokens:
                continue  # a chunk of a long prompt: no token yet
            if self.prefilling is r:
                self.prefilling = None
            r.generated += 1
            r.num_tokens += 1
            self.generation_tokens += 1
            if r.first_token < 0:
                r.first_token = now
            if r.generated >= r.sim.output_tokens:
                self._finish(r, now)
                continue
            # It joins the decoders: one token per step from the next step on.
            if r.out:
                if r.nref < len(r.nodes):  # hold the output node, which decoding fills block by block
                    node = r.nodes[-1]
                    st = self.nodes.get(node)
                    if st is None:
                        st = self.nodes[node] = _Node(node, self.head)
                    elif st.ref == 0 and st.n:  # a stale copy of this output: drop it
                        prev = st.prev
                        nxt = st.next
                        prev.next = nxt
                        nxt.prev = prev
                        st.prev = st.next = self.head
                        self.free -= st.n
                        self._free_plain(st.n)
                        st.n = 0
                    st.ref += 1
                    r.sts.append(st)
                    r.nref = len(r.nodes)
                else:
                    st = r.sts[-1]
                st.owner = r
                r.base = max(min(c // bs, r.out_hi) - r.out_lo, 0)
                r.absorbed = 0
            r.state = _DECODE
            lora = r.sim.lora
            if lora is not None:
                self.decoding_loras[lora] = self.decoding_loras.get(lora, 0) + 1
            k = self.K
            r.k0 = k
            r.c0 = c
            res = r.res = (c - k) % bs
            self.hist[res] += 1
            self.n_dec += 1
            self.ctx += c
            fk = r.finish_k = k + r.sim.output_tokens - r.generated
            _heappush(self.heap, fk << _SEQ_BITS | r.seq)
            self.by_seq[r.seq] = r

    def _first_finish(self) -> int:
        """The finish counter of the first decoder to finish (stale entries on top are dropped)."""
        heap = self.heap
        by_seq = self.by_seq
        while True:
            key = heap[0]
            fk = key >> _SEQ_BITS
            r = by_seq[key & _SEQ_MASK]
            if r.state == _DECODE and r.finish_k == fk:
                return fk
            _heappop(heap)
            del by_seq[key & _SEQ_MASK]

    def _finish_until(self, k: int, now: float) -> None:
        """Finish, at ``now``, the decoders whose finish counter is ``k`` or less, in ``(finish_k, seq)`` order."""
        heap = self.heap
        by_seq = self.by_seq
        limit = (k + 1) << _SEQ_BITS
        while heap and heap[0] < limit:
            key = _heappop(heap)
            r = by_seq.pop(key & _SEQ_MASK)
            if r.state == _DECODE and r.finish_k == key >> _SEQ_BITS:
                self._finish(r, now)

    def _decoders(self) -> list[tuple[int, _Req]]:
        """``(finish_k, request)`` of every decoder (heap order)."""
        out: list[tuple[int, _Req]] = []
        by_seq = self.by_seq
        for key in self.heap:
            fk = key >> _SEQ_BITS
            r = by_seq[key & _SEQ_MASK]
            if r.state == _DECODE and r.finish_k == fk:
                out.append((fk, r))
        return out
