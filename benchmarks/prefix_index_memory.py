"""Memory and speed of the approximate prefix cache (``approx-prefix-cache-producer``).

    .venv/bin/python benchmarks/prefix_index_memory.py

1. Memory: the index holding 1,000,000 (endpoint, block) entries spread over 8 and 64
   endpoints (capacity 1,000,000 / endpoints each, chains of 256 blocks), measured twice, each
   in a fresh subprocess: Python's allocations (tracemalloc, hash ints included) and the
   process's RSS growth.
2. Time per request, for 8 / 64 / 1,000 endpoints and 1 KB / 16 KiB / 200 KiB chat prompts:
   ``prepare`` (input bytes + hash chain + index match) and ``pre_request`` (index add), p50 and
   p99 in microseconds, for both hash schemes. The workload: every request shares a long
   system prompt whose blocks three endpoints already hold and ends with a unique user turn
   (about 10% of the prompt, at least one block), so matches are long and every add inserts
   new blocks; each endpoint also holds two unrelated 256-block chains. Picks rotate over the
   endpoints.

Runs in well under a minute; prints Markdown tables.
"""

from __future__ import annotations

import gc
import json
import random
import subprocess
import sys
import time
import tracemalloc
from typing import Any

from xxhash import xxh64_intdigest

from igw.api.types import Endpoint, EndpointMetrics, EndpointState, InferenceRequest
from igw.framework.scheduling import SchedulingResult
from igw.scheduling.plugins.prefix_index import PrefixIndex
from igw.scheduling.plugins.prefix_producer import ApproxPrefixCacheProducer

BLOCKS = 1_000_000
CHAIN = 256
REQUESTS = 400
WORDS = [
    "the",
    "of",
    "and",
    "to",
    "in",
    "is",
    "was",
    "for",
    "on",
    "that",
    "with",
    "as",
    "by",
    "at",
    "from",
    "it",
    "an",
    "be",
    "this",
    "which",
    "or",
    "are",
    "have",
]


def _chains(count: int, salt: int) -> list[list[int]]:
    out = []
    for c in range(count):
        prev = xxh64_intdigest(b"%d-%d" % (salt, c))
        chain = []
        for i in range(CHAIN):
            prev = xxh64_intdigest(i.to_bytes(4, "little"), prev)
            chain.append(prev)
        out.append(chain)
    return out


def _rss_kib() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4  # resident pages of 4 KiB


def memory_cell(endpoints: int, mode: str) -> dict[str, Any]:
    """One measurement (run in its own process): bytes for BLOCKS entries over ``endpoints``."""
    per_endpoint = BLOCKS // endpoints
    addresses = [f"10.0.{i // 250}.{i % 250 + 1}:8000" for i in range(endpoints)]
    gc.collect()
    rss0 = _rss_kib()
    if mode == "tracemalloc":
        tracemalloc.start()
    index = PrefixIndex(per_endpoint)
    for e, address in enumerate(addresses):
        # chains made here and dropped after the add: the index ends up owning its hash ints
        for chain in _chains(-(-per_endpoint // CHAIN), e):
            index.add(address, chain)
    assert index.size == per_endpoint * endpoints, index.size
    gc.collect()
    if mode == "tracemalloc":
        used = tracemalloc.get_traced_memory()[0]
        tracemalloc.stop()
    else:
        used = (_rss_kib() - rss0) * 1024
    return {"endpoints": endpoints, "mode": mode, "bytes": used, "entries": index.size, "heads": index.heads}


def _text(rng: random.Random, size: int) -> str:
    words: list[str] = []
    length = 0
    while length < size:
        word = rng.choice(WORDS)
        words.append(word)
        length += len(word) + 1
    return " ".join(words)[:size]


def _state(i: int) -> EndpointState:
    state = EndpointState(Endpoint(f"10.0.{i // 250}.{i % 250 + 1}:8000", f"10.0.{i // 250}.{i % 250 + 1}", 8000))
    state.metrics = EndpointMetrics(block_size=16, num_gpu_blocks=31_250, scraped_at=1.0)
    return state


def _request(i: int, system: str, user: str) -> InferenceRequest:
    body = {"model": "m", "messages": [{"role": "system", "content": system}, {"role": "user", "content": user}]}
    return InferenceRequest(request_id=str(i), model="m", path="/v1/chat/completions", body_size=0, body=body)


def _pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(len(values) * q))] * 1e6


def timing_cell(endpoints: int, prompt_bytes: int, scheme: str) -> tuple[float, float, float, float, int]:
    rng = random.Random(endpoints * 7 + prompt_bytes)
    states = [_state(i) for i in range(endpoints)]
    producer = ApproxPrefixCacheProducer(hash_scheme=scheme)  # type: ignore[arg-type]
    for e, state in enumerate(states):  # background: two unrelated chains per endpoint
        for chain in _chains(2, 10_000 + e):
            producer.index.add(state.address, chain)
    user_bytes = max(80, prompt_bytes // 10)
    system = _text(rng, prompt_bytes - user_bytes)
    warm = _request(-1, system, _text(rng, user_bytes))
    producer.prepare(warm, states)
    for holder in states[:3]:
        producer.pre_request(warm, SchedulingResult(profile="p", endpoints=[holder]))
    requests = [_request(i, system, _text(rng, user_bytes)) for i in range(REQUESTS)]
    prepare: list[float] = []
    record: list[float] = []
    blocks = 0
    for i, req in enumerate(requests):
        t0 = time.perf_counter()
        producer.prepare(req, states)
        t1 = time.perf_counter()
        producer.pre_request(req, SchedulingResult(profile="p", endpoints=[states[i % endpoints]]))
        t2 = time.perf_counter()
        prepare.append(t1 - t0)
        record.append(t2 - t1)
        blocks = req.data["PrefixCacheMatchInfo"].total_blocks
    return _pct(prepare, 0.5), _pct(prepare, 0.99), _pct(record, 0.5), _pct(record, 0.99), blocks


def main() -> None:
    started = time.perf_counter()
    print(f"## Index memory: {BLOCKS:,} entries (chains of {CHAIN} blocks)\n")
    print("| endpoints | capacity each | tracemalloc MiB | bytes/entry | RSS growth MiB | bytes/entry (RSS) |")
    print("|---|---|---|---|---|---|")
    for endpoints in (8, 64):
        cells = {}
        for mode in ("tracemalloc", "rss"):
            out = subprocess.run(
                [sys.executable, __file__, "--memory-cell", str(endpoints), mode],
                check=True,
                capture_output=True,
                text=True,
            ).stdout
            cells[mode] = json.loads(out)
        traced, rss = cells["tracemalloc"]["bytes"], cells["rss"]["bytes"]
        print(
            f"| {endpoints} | {BLOCKS // endpoints:,} | {traced / 2**20:.1f} | {traced / BLOCKS:.0f} "
            f"| {rss / 2**20:.1f} | {rss / BLOCKS:.0f} |",
            flush=True,
        )
    print(f"\n## Time per request, µs ({REQUESTS} chat requests per cell; pre_request = index add)\n")
    print("| endpoints | prompt | scheme | blocks | prepare p50 | prepare p99 | pre_request p50 | pre_request p99 |")
    print("|---|---|---|---|---|---|---|---|")
    for endpoints in (8, 64, 1000):
        for label, size in (("1 KB", 1000), ("16 KiB", 16 * 1024), ("200 KiB", 200 * 1024)):
            for scheme in ("rendered", "reference"):
                p50, p99, r50, r99, blocks = timing_cell(endpoints, size, scheme)
                print(
                    f"| {endpoints} | {label} | {scheme} | {blocks} | {p50:.0f} | {p99:.0f} | {r50:.0f} | {r99:.0f} |",
                    flush=True,
                )
    print(f"\n(total {time.perf_counter() - started:.1f} s)")


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--memory-cell":
        print(json.dumps(memory_cell(int(sys.argv[2]), sys.argv[3])))
    else:
        main()
