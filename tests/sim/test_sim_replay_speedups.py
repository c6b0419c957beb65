"""The replay's hand-made fast paths compute what the plain versions compute.

* ``_ChunkIndex`` (prefix-load's index: linked LRU lists and holder lists, reused buffers) against a
  model written with the ``OrderedDict`` and dict-of-dicts it replaces;
* ``_Arrivals`` draws exactly what ``Random.expovariate`` and ``Random.randrange`` draw;
* the fast engine's free queue (a linked list of runs) stays consistent with its counters.
"""

from __future__ import annotations

import random
from collections import OrderedDict

import pytest

from igw_sim.config import EngineConfig
from igw_sim.replay.fastengine import FastEngine
from igw_sim.replay.requests import SimRequest, chunk_runs
from igw_sim.replay.routers import _ChunkIndex
from igw_sim.replay.workloads import _Arrivals, _Params, build_workload


class _NaiveIndex:
    """The chunk index as it was first written: per-engine ``OrderedDict`` LRUs and ``node -> {engine: n}``."""

    def __init__(self, engines: int, capacity: int) -> None:
        self.capacity = capacity
        self.lru: list[OrderedDict[int, int]] = [OrderedDict() for _ in range(engines)]
        self.size = [0] * engines
        self.holders: dict[int, dict[int, int]] = {}

    def match(self, runs: list[tuple[int, int]]) -> dict[int, int]:
        matched: dict[int, int] = {}
        alive: list[int] = []
        for k, (node, count) in enumerate(runs):
            have = self.holders.get(node)
            if not have:
                break
            nxt: list[int] = []
            for e in have if k == 0 else alive:
                got = have.get(e, 0)
                if got:
                    matched[e] = matched.get(e, 0) + min(got, count)
                    if got >= count:
                        nxt.append(e)
            if not nxt:
                break
            alive = nxt
        return matched

    def insert(self, engine: int, runs: list[tuple[int, int]]) -> None:
        lru = self.lru[engine]
        for node, count in runs:
            old = lru.get(node)
            if old is None:
                lru[node] = count
                self.size[engine] += count
                self.holders.setdefault(node, {})[engine] = count
            else:
                if count > old:
                    lru[node] = count
                    self.size[engine] += count - old
                    self.holders[node][engine] = count
                lru.move_to_end(node)
        while self.size[engine] > self.capacity and lru:
            node, count = lru.popitem(last=False)
            self.size[engine] -= count
            del self.holders[node][engine]
            if not self.holders[node]:
                del self.holders[node]


def _lru_of(index: _ChunkIndex, engine: int) -> list[tuple[int, int]]:
    head = index.heads[engine]
    out: list[tuple[int, int]] = []
    h = head.next
    while h is not head:
        out.append((h.node, h.count))
        h = h.next
    return out


def _holders_of(index: _ChunkIndex) -> dict[int, dict[int, int]]:
    out: dict[int, dict[int, int]] = {}
    for node, first in index.holders.items():
        assert first.hprev is None
        h = first
        while h is not None:
            out.setdefault(node, {})[h.engine] = h.count
            h = h.hnext
    return out


@pytest.mark.parametrize("seed", range(6))
def test_chunk_index_matches_the_ordered_dict_model(seed: int) -> None:
    rng = random.Random(seed)
    engines, capacity = 5, rng.choice([12, 40, 200])
    fast, naive = _ChunkIndex(engines, capacity), _NaiveIndex(engines, capacity)
    for n in range(600):
        # Prompts that share prefixes at every depth, some cut short (partial chunks, max_chunks).
        depth = rng.randrange(1, 4)
        segments = tuple((f"s{d}.{rng.randrange(3)}", rng.choice([5, 16, 33, 64])) for d in range(depth))
        request = SimRequest(n, 0.0, segments, 1)
        max_chunks = rng.choice([0, 3, 256])
        runs = chunk_runs(request, 16, partial=True, max_chunks=max_chunks)
        total = fast.cut(request, 16, max_chunks)
        assert list(zip(fast.run_nodes, fast.run_counts, strict=True)) == runs
        assert total == sum(count for _, count in runs)
        count = fast.match()
        assert dict(zip(fast.m_engines[:count], fast.m_counts[:count], strict=True)) == naive.match(runs)
        engine = rng.randrange(engines)
        fast.insert(engine)
        naive.insert(engine, runs)
    for e in range(engines):
        assert _lru_of(fast, e) == list(naive.lru[e].items())
        assert fast.size[e] == naive.size[e]
    assert _holders_of(fast) == naive.holders


def test_arrivals_draw_what_random_draws() -> None:
    defaults = {"qps": 1.0, "duration": 60.0, "requests": 0.0, "seed": 0.0}
    params = _Params("t", {"qps": 37.0, "requests": 500.0, "seed": 9.0}, defaults)
    arrivals = _Arrivals(params)
    rng = random.Random(9)
    t = 0.0
    for n in range(500):
        assert arrivals.next()
        t += rng.expovariate(37.0)
        assert (arrivals.n, arrivals.t) == (n, t)
        bound = 1 + n % 70
        assert arrivals.below(bound) == rng.randrange(bound)
    assert not arrivals.next()


def test_the_free_queue_adds_up() -> None:
    config = EngineConfig.from_preset("h100-llama3-8b", kv_blocks=1200, max_num_seqs=32)
    engine = FastEngine(config)
    for r in build_workload("w4:qps=200,duration=4,groups=6"):
        engine.submit(r, r.arrival)
        engine.advance(r.arrival)
        # The queue holds ``free`` blocks: plain runs and the cached nodes nobody holds, each once.
        head = engine.head
        blocks = 0
        seen: set[int] = set()
        e = head.next
        while e is not head:
            assert e.next.prev is e
            assert e.n > 0
            blocks += e.n
            if not e.plain:
                assert e.ref == 0
                assert engine.nodes[e.key] is e
                seen.add(e.key)
            e = e.next
        assert blocks == engine.free
        assert seen == {key for key, st in engine.nodes.items() if st.ref == 0}
    engine.advance(float("inf"))
    assert engine.free == engine.num_blocks
    assert engine.preemptions > 0
