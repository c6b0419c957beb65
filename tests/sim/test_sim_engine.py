"""The simulated engine: FIFO admission up to max_num_seqs, TTFT = queueing + prefill, KV usage, aborts."""

from __future__ import annotations

import asyncio
import contextlib
import itertools

import pytest

from igw_sim.engine import ContextLengthError, Engine, EngineConfig, QueueFullError, Token
from igw_sim.stats import Histogram

FAST = EngineConfig(max_num_seqs=2, prefill_overhead_ms=5, prefill_ms_per_token=0, itl_ms=5)


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
        await asyncio.sleep(0)  # every task has submitted
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
    assert engine.requests_total == 5
    assert engine.generation_tokens_total == 20
    assert engine.prompt_tokens_total == 20
    assert engine.success_total == {"length": 5}
    assert engine.ttft.count == 5
    assert engine.itl.count == 15
    assert engine.e2e.count == 5


async def test_ttft_includes_queueing_behind_a_running_request() -> None:
    cfg = EngineConfig(max_num_seqs=1, prefill_overhead_ms=20, prefill_ms_per_token=1.0, itl_ms=10)
    engine = Engine(cfg)
    first, second = await asyncio.gather(
        _consume(engine, prompt_tokens=10, max_tokens=3), _consume(engine, prompt_tokens=10, max_tokens=3)
    )
    prefill = 0.020 + 10 * 0.001
    assert prefill - 0.002 <= first[0] <= prefill + 0.2
    # The second waits for the whole first request (prefill + 2 ITL), then does its own prefill.
    assert second[0] >= 2 * prefill + 2 * 0.010 - 0.003
    assert engine.queue_time.count == 2
    assert engine.queue_time.total >= prefill + 2 * 0.010 - 0.003


async def test_tokens_arrive_one_itl_apart() -> None:
    engine = Engine(EngineConfig(max_num_seqs=1, prefill_overhead_ms=0, prefill_ms_per_token=0, itl_ms=20))
    loop = asyncio.get_running_loop()
    async with engine.submit(prompt_tokens=1, max_tokens=4) as gen:
        stamps = [loop.time() async for _ in gen]
    # Tokens are due on a fixed grid (no drift), so only the span is tight; single gaps may jitter.
    assert all(b > a for a, b in itertools.pairwise(stamps))
    assert 3 * 0.020 - 0.002 <= stamps[-1] - stamps[0] <= 0.5


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
    assert engine.success_total == {"length": 1}


async def test_closing_a_queued_generation_leaves_the_queue() -> None:
    engine = Engine(EngineConfig(max_num_seqs=1))
    running = engine.submit(prompt_tokens=1, max_tokens=5)
    queued = engine.submit(prompt_tokens=1, max_tokens=5)
    assert engine.waiting == 1
    queued.close()
    queued.close()  # idempotent
    assert (engine.running, engine.waiting) == (1, 0)
    assert [t async for t in queued] == []
    running.close()
    assert engine.running == 0
    assert engine.aborted_total == 2


async def test_kv_usage_counts_blocks_of_running_sequences_and_caps_at_one() -> None:
    engine = Engine(EngineConfig(max_num_seqs=2, kv_blocks=10, block_size=16, prefill_overhead_ms=1, itl_ms=1))
    a = engine.submit(prompt_tokens=17, max_tokens=20)  # 2 blocks while prefilling
    assert engine.kv_usage == pytest.approx(0.2)
    await a.__anext__()  # 18 tokens: still 2 blocks
    assert engine.kv_usage == pytest.approx(0.2)
    b = engine.submit(prompt_tokens=1000, max_tokens=1)
    assert engine.kv_usage == 1.0
    a.close()
    b.close()
    assert engine.kv_usage == 0.0


async def test_waiting_queue_limit_and_context_length_are_enforced() -> None:
    engine = Engine(EngineConfig(max_num_seqs=1, max_waiting=1, max_model_len=100))
    gens = [engine.submit(prompt_tokens=1, max_tokens=1) for _ in range(2)]
    with pytest.raises(QueueFullError):
        engine.submit(prompt_tokens=1, max_tokens=1)
    with pytest.raises(ContextLengthError):
        engine.submit(prompt_tokens=90, max_tokens=11)
    with pytest.raises(ValueError, match="max_tokens"):
        engine.submit(prompt_tokens=1, max_tokens=0)
    for gen in gens:
        gen.close()
    assert engine.requests_total == 2


async def test_itl_factor_rises_linearly_to_the_full_batch_slowdown() -> None:
    engine = Engine(EngineConfig(max_num_seqs=5, itl_slowdown_at_full_batch=2.0))
    factors = [engine.itl_factor()]
    gens = []
    for _ in range(5):
        gens.append(engine.submit(prompt_tokens=1, max_tokens=1))
        factors.append(engine.itl_factor())
    assert factors == pytest.approx([1.0, 1.0, 1.25, 1.5, 1.75, 2.0])
    for gen in gens:
        gen.close()


@pytest.mark.parametrize(
    "kwargs",
    [{"max_num_seqs": 0}, {"itl_ms": -1}, {"itl_slowdown_at_full_batch": 0.5}, {"max_waiting": -1}],
    ids=["seqs", "itl", "slowdown", "waiting"],
)
def test_engine_config_rejects_bad_values(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        EngineConfig(**kwargs)  # type: ignore[arg-type]


def test_histogram_is_cumulative_with_inf_bucket() -> None:
    hist = Histogram((0.1, 1.0))
    for value in (0.05, 0.1, 0.5, 3.0):
        hist.observe(value)
    assert hist.cumulative() == [("0.1", 2), ("1.0", 3), ("+Inf", 4)]
    assert hist.total == pytest.approx(3.65)
