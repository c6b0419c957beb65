"""The real-time engine: admission up to max_num_seqs, TTFT = queueing + prefill, aborts, dilation, stalls."""

from __future__ import annotations

import asyncio
import contextlib
import itertools

import pytest

from igw_sim.engine import ContextLengthError, Engine, EngineConfig, QueueFullError, Token
from igw_sim.kvevents import BlockStored, KVEvent
from igw_sim.stats import Histogram

FAST = EngineConfig(max_num_seqs=2, prefill_overhead_ms=5, prefill_ms_per_token=0, itl_ms=5)


async def _settle() -> None:
    """Let the driver plan its next step (requests submitted together join the same first step)."""
    for _ in range(3):
        await asyncio.sleep(0)


async def _consume(engine: Engine, *, prompt_tokens: int = 4, max_tokens: int = 4) -> tuple[float, list[Token]]:
    """Run one request to the end; return (time of first token since submit, tokens)."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    first = -1.0
    tokens: list[Token] = []
    async with engine.submit(prompt_tokens=prompt_tokens, max_tokens=max_tokens) as gen:
        async for token in gen:
            if not tokens:
                first = loop.time() - start
            tokens.append(token)
    return first, tokens


async def test_never_more_than_max_num_seqs_running_and_rest_wait() -> None:
    engine = Engine(FAST)
    samples: list[tuple[int, int]] = []

    async def monitor() -> None:
        while True:
            samples.append((engine.running, engine.waiting))
            await asyncio.sleep(0.002)

    watcher = asyncio.create_task(monitor())
    try:
        tasks = [asyncio.create_task(_consume(engine)) for _ in range(5)]
        await _settle()
        assert (engine.running, engine.waiting) == (2, 3)
        results = await asyncio.gather(*tasks)
    finally:
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher
    assert max(r for r, _ in samples) == 2
    assert all(r + w <= 5 for r, w in samples)
    assert (engine.running, engine.waiting) == (0, 0)
    assert all(len(tokens) == 4 and tokens[-1].last for _, tokens in results)
    stats = engine.stats
    assert stats.requests_total == 5
    assert stats.generation_tokens_total == 20
    assert stats.prompt_tokens_total == 20
    assert stats.success_total == {"length": 5}
    assert stats.ttft.count == 5
    assert stats.itl.count == 15
    assert stats.e2e.count == 5


async def test_ttft_includes_queueing_behind_a_running_request() -> None:
    cfg = EngineConfig(max_num_seqs=1, prefill_overhead_ms=20, prefill_ms_per_token=1.0, itl_ms=10)
    engine = Engine(cfg)
    first, second = await asyncio.gather(
        _consume(engine, prompt_tokens=10, max_tokens=3), _consume(engine, prompt_tokens=10, max_tokens=3)
    )
    prefill = 0.020 + max(0.010, 10 * 0.001)
    assert prefill - 0.002 <= first[0] <= prefill + 0.2
    # The second waits for the whole first request (prefill + 2 ITL), then does its own prefill.
    assert second[0] >= 2 * prefill + 2 * 0.010 - 0.003
    queue = engine.stats.queue_time
    assert queue.count == 2
    # Simulated time runs on a fixed grid while the engine is busy: the wait is exact, give or take the
    # moment the first step started after the submissions.
    assert queue.total == pytest.approx(prefill + 2 * 0.010, abs=0.01)
    assert engine.stats.ttft.total == pytest.approx(prefill + (2 * prefill + 2 * 0.010), abs=0.01)


async def test_tokens_arrive_one_itl_apart() -> None:
    engine = Engine(EngineConfig(max_num_seqs=1, prefill_overhead_ms=0, prefill_ms_per_token=0, itl_ms=20))
    loop = asyncio.get_running_loop()
    async with engine.submit(prompt_tokens=1, max_tokens=4) as gen:
        stamps = [loop.time() async for _ in gen]
    # Tokens are due on a fixed grid (no drift): a late first token shortens the span by its delay,
    # never lengthens it, so the span is bounded by the grid within the loop's wake-up jitter.
    assert all(b > a for a, b in itertools.pairwise(stamps))
    assert 3 * 0.020 - 0.015 <= stamps[-1] - stamps[0] <= 0.5
    assert engine.stats.itl.total == pytest.approx(3 * 0.020)


async def test_cancelled_consumer_frees_its_slot_for_the_next_request() -> None:
    engine = Engine(EngineConfig(max_num_seqs=1, prefill_overhead_ms=1, itl_ms=5))
    long = asyncio.create_task(_consume(engine, max_tokens=10_000))
    short = asyncio.create_task(_consume(engine, max_tokens=2))
    await asyncio.sleep(0.03)
    assert (engine.running, engine.waiting) == (1, 1)
    long.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await long
    _, tokens = await asyncio.wait_for(short, timeout=2)
    assert len(tokens) == 2
    assert (engine.running, engine.waiting) == (0, 0)
    assert engine.aborted_total == 1
    assert engine.stats.success_total == {"length": 1}


async def test_closing_a_queued_generation_leaves_the_queue() -> None:
    engine = Engine(EngineConfig(max_num_seqs=1))
    running = engine.submit(prompt_tokens=1, max_tokens=5)
    queued = engine.submit(prompt_tokens=1, max_tokens=5)
    await _settle()
    assert (engine.running, engine.waiting) == (1, 1)
    queued.close()
    queued.close()  # idempotent
    assert (engine.running, engine.waiting) == (1, 0)
    assert [t async for t in queued] == []
    running.close()
    assert engine.running == 0
    assert engine.aborted_total == 2
    await engine.aclose()


async def test_kv_usage_counts_blocks_held_by_running_sequences() -> None:
    # 11 blocks: 10 usable, one is vLLM's null block
    engine = Engine(EngineConfig(max_num_seqs=2, kv_blocks=11, block_size=16, prefill_overhead_ms=1, itl_ms=1))
    a = engine.submit(prompt_tokens=17, max_tokens=10)
    await a.__anext__()  # prefilled: 17 prompt tokens in 2 blocks
    assert engine.kv_usage == pytest.approx(0.2)
    b = engine.submit(prompt_tokens=100, max_tokens=2)
    await b.__anext__()
    assert len(engine.core.kv.block_ids(b.request.request_id)) == 7
    assert len(engine.core.kv.block_ids(a.request.request_id)) == 2  # at most 27 tokens
    assert engine.kv_usage == pytest.approx(0.9)
    assert [t.index async for t in b] == [1]
    assert engine.kv_usage == pytest.approx(0.2)  # b finished; its cached blocks count as free
    a.close()
    assert engine.kv_usage == 0.0
    assert engine.core.kv.num_cached_blocks == 7  # full blocks of both stay cached until evicted


async def test_prefix_hits_shorten_ttft_and_are_reported_per_generation() -> None:
    cfg = EngineConfig(max_num_seqs=4, prefill_overhead_ms=0, prefill_ms_per_token=1.0, itl_ms=5)
    engine = Engine(cfg)
    prompt = list(range(1000, 1064))
    async with engine.submit(prompt_ids=prompt, max_tokens=1) as cold:
        assert len([t async for t in cold]) == 1
    async with engine.submit(prompt_ids=prompt, max_tokens=1) as warm:
        assert len([t async for t in warm]) == 1
    assert (cold.cached_tokens, warm.cached_tokens) == (0, 48)
    ttft = engine.stats.ttft
    assert ttft.total == pytest.approx(0.064 + 0.016, abs=0.006)  # max(5 ms, 1 ms per uncached token)


async def test_time_dilation_stretches_real_time_but_not_simulated_time() -> None:
    engine = Engine(EngineConfig(max_num_seqs=1, prefill_overhead_ms=0, itl_ms=10, time_dilation=4.0))
    first, tokens = await _consume(engine, prompt_tokens=1, max_tokens=3)
    assert first >= 0.040 - 0.002  # a 10 ms simulated prefill step takes 40 ms
    assert engine.stats.ttft.total == pytest.approx(0.010, abs=0.004)
    assert engine.stats.itl.total == pytest.approx(0.020)
    assert len(tokens) == 3


async def test_a_stalled_engine_queues_and_resumes() -> None:
    engine = Engine(EngineConfig(max_num_seqs=4, prefill_overhead_ms=0, itl_ms=2))
    engine.stall(0.1)
    task = asyncio.create_task(_consume(engine, max_tokens=2))
    await asyncio.sleep(0.05)
    assert (engine.running, engine.waiting) == (0, 1)
    first, _ = await task
    assert first >= 0.1 - 0.01


async def test_kv_events_reach_listeners_step_by_step() -> None:
    engine = Engine(EngineConfig(prefill_overhead_ms=0, itl_ms=1, block_size=4))
    batches: list[list[KVEvent]] = []
    engine.kv_event_listeners.append(batches.append)
    async with engine.submit(prompt_ids=[1, 2, 3, 4, 5, 6, 7, 8, 9], max_tokens=1) as gen:
        [_ async for _ in gen]
    assert len(batches) == 1
    (stored,) = batches[0]
    assert isinstance(stored, BlockStored)
    assert stored.token_ids == (1, 2, 3, 4, 5, 6, 7, 8)
    assert engine.reset_prefix_cache()
    assert len(batches) == 2


async def test_waiting_queue_limit_and_context_length_are_enforced() -> None:
    engine = Engine(EngineConfig(max_num_seqs=1, max_waiting=1, max_model_len=100))
    gens = [engine.submit(prompt_tokens=1, max_tokens=1)]
    await _settle()
    gens.append(engine.submit(prompt_tokens=1, max_tokens=1))
    with pytest.raises(QueueFullError):
        engine.submit(prompt_tokens=1, max_tokens=1)
    with pytest.raises(ContextLengthError):
        engine.submit(prompt_tokens=90, max_tokens=11)
    with pytest.raises(ValueError, match="max_tokens"):
        engine.submit(prompt_tokens=1, max_tokens=0)
    for gen in gens:
        gen.close()
    assert engine.requests_total == 2
    await engine.aclose()


async def test_aclose_aborts_everything() -> None:
    engine = Engine(EngineConfig(max_num_seqs=1, itl_ms=5))
    gens = [engine.submit(prompt_tokens=1, max_tokens=100) for _ in range(3)]
    await _settle()
    await engine.aclose()
    assert (engine.running, engine.waiting, engine.aborted_total) == (0, 0, 3)
    assert [[t async for t in g] for g in gens] == [[], [], []]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"max_num_seqs": 0},
        {"itl_ms": -1},
        {"itl_slowdown_at_full_batch": 0.5},
        {"max_waiting": -1},
        {"time_dilation": 0},
        {"max_num_batched_tokens": 0},
        {"lora_modules": (("a", "x"), ("a", "y"))},
    ],
    ids=["seqs", "itl", "slowdown", "waiting", "dilation", "budget", "lora-names"],
)
def test_engine_config_rejects_bad_values(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        EngineConfig(**kwargs)  # type: ignore[arg-type]


def test_histogram_is_cumulative_with_inf_bucket() -> None:
    hist = Histogram((0.1, 1.0))
    for value in (0.05, 0.1, 0.5, 3.0):
        hist.observe(value)
    assert hist.cumulative() == [("0.1", 2), ("1.0", 3), ("+Inf", 4)]
    assert hist.total == pytest.approx(3.65)
