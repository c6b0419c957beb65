"""The fast virtual-time engine on hand-computed cases: timeline, prefix hits, eviction order, jumps."""

from __future__ import annotations

import pytest

from igw_sim.config import EngineConfig
from igw_sim.profiles import LatencyProfile
from igw_sim.replay import build_workload
from igw_sim.replay.fastengine import FastEngine, RejectedError
from igw_sim.replay.requests import SimRequest
from igw_sim.replay.results import Recorder, RequestOutcome

FLAT = LatencyProfile(name="flat", weights_ms=10.0, ms_per_token=0.0)
"""Every step takes 10 ms."""
ROOF = LatencyProfile(name="roof", weights_ms=10.0, ms_per_token=0.5)
"""max(10 ms, 0.5 ms per scheduled token)."""


def _engine(**kwargs: object) -> tuple[FastEngine, dict[int, RequestOutcome]]:
    base: dict[str, object] = {"latency": FLAT, "block_size": 16, "kv_blocks": 64, "max_num_seqs": 8}
    base.update(kwargs)
    rec = Recorder(1, keep_requests=True)
    engine = FastEngine(EngineConfig(**base), recorder=rec)  # type: ignore[arg-type]
    assert rec.requests is not None
    return engine, rec.requests


def _req(n: int, t: float, *segments: tuple[str, int], out: int = 1) -> SimRequest:
    return SimRequest(n, t, tuple(segments), out)


def test_ttft_is_the_prefill_step_and_each_token_a_decode_step() -> None:
    engine, done = _engine(latency=ROOF)
    engine.submit(_req(0, 0.0, ("a", 64), out=3), 0.0)
    engine.advance(float("inf"))
    # 64 prompt tokens: max(10, 32) = 32 ms, then two decode steps of 10 ms.
    assert done[0].ttft == pytest.approx(0.032)
    assert done[0].e2e == pytest.approx(0.052)
    assert (engine.steps, engine.generation_tokens) == (3, 3)


def test_a_seen_prompt_hits_every_full_block_but_the_last_token() -> None:
    engine, done = _engine()
    engine.submit(_req(0, 0.0, ("a", 64)), 0.0)
    engine.submit(_req(1, 1.0, ("a", 64)), 1.0)
    engine.submit(_req(2, 2.0, ("a", 64), ("b", 1)), 2.0)
    engine.submit(_req(3, 3.0, ("c", 64)), 3.0)
    engine.advance(float("inf"))
    assert [done[i].cached_tokens for i in range(4)] == [0, 48, 64, 0]
    assert engine.cached_prefix_tokens(_req(9, 0.0, ("a", 64), ("z", 100))) == 64


def test_requests_arriving_together_share_a_step_and_a_later_one_hits_blocks_scheduled_before_it() -> None:
    engine, done = _engine(latency=ROOF)
    engine.submit(_req(0, 0.0, ("sys", 32), ("q0", 16)), 0.0)
    engine.submit(_req(1, 0.0, ("sys", 32), ("q1", 16)), 0.0)
    engine.advance(float("inf"))
    # One step: 48 + 16 new tokens (the second hits the two system blocks the first just scheduled).
    assert (done[0].cached_tokens, done[1].cached_tokens) == (0, 32)
    assert done[0].ttft == done[1].ttft == pytest.approx(0.032)


def test_eviction_takes_never_used_blocks_first_then_the_tail_of_the_oldest_prefix() -> None:
    engine, done = _engine(kv_blocks=65)  # 64 usable, one is the null block
    engine.submit(_req(0, 0.0, ("a", 512)), 0.0)  # 32 blocks, then cached and free; its partial one first
    engine.submit(_req(1, 1.0, ("b", 800)), 1.0)  # 50 blocks: a's partial + 31 never used, 18 of a's tail
    engine.submit(_req(2, 2.0, ("a", 512)), 2.0)
    engine.advance(float("inf"))
    assert done[2].cached_tokens == (32 - 18) * 16
    assert engine.evicted_blocks >= 18


def test_jumping_over_decode_steps_gives_the_same_timeline_as_stepping() -> None:
    config = {"latency": EngineConfig.from_preset("h100-llama3-8b").profile, "kv_blocks": 250, "max_num_seqs": 32}
    workload = list(build_workload("w1:qps=40,duration=4,groups=6,system=600,question=120,output=80"))
    jumped, a = _engine(**config)
    stepped, b = _engine(**config)
    for r in workload:
        jumped.submit(r, r.arrival)
    jumped.advance(float("inf"))
    t = 0.0
    pending = list(workload)
    while pending or not stepped.idle:
        t += 0.0007  # cut every jump
        while pending and pending[0].arrival <= t:
            r = pending.pop(0)
            stepped.submit(r, r.arrival)
        stepped.advance(t)
    assert a.keys() == b.keys()
    assert len(a) == len(workload)
    for k in a:
        assert a[k].ttft == pytest.approx(b[k].ttft, abs=1e-9)
        assert a[k].e2e == pytest.approx(b[k].e2e, abs=1e-9)
    assert jumped.steps == stepped.steps
    assert jumped.preemptions > 0


def test_every_block_comes_back_after_preemptions_and_evictions() -> None:
    engine, done = _engine(kv_blocks=300, max_num_seqs=16, latency=ROOF)
    workload = list(build_workload("w5:qps=30,users=6,rounds=5,system=200,history=300,question=40,answer=60"))
    for r in workload:
        engine.submit(r, r.arrival)
    engine.advance(float("inf"))
    assert len(done) == len(workload)
    assert engine.preemptions > 0
    assert engine.free == engine.num_blocks
    assert all(st.ref == 0 for st in engine.nodes.values())
    assert engine.kv_usage == 0.0


def test_admission_errors() -> None:
    engine, _ = _engine(max_model_len=100, max_num_seqs=1, max_waiting=0)
    with pytest.raises(RejectedError) as exc:
        engine.submit(_req(0, 0.0, ("a", 90), out=20), 0.0)
    assert exc.value.status == 400
    engine.submit(_req(1, 0.0, ("a", 40), out=20), 0.0)
    engine.advance(0.001)
    with pytest.raises(RejectedError) as exc:
        engine.submit(_req(2, 0.001, ("b", 40)), 0.001)
    assert exc.value.status == 429
    small, _ = _engine(kv_blocks=4)
    with pytest.raises(RejectedError, match="KV"):
        small.submit(_req(0, 0.0, ("a", 70)), 0.0)


def test_fast_engine_refuses_a_budget_smaller_than_the_batch() -> None:
    with pytest.raises(ValueError, match="max_num_batched_tokens"):
        FastEngine(EngineConfig(max_num_seqs=64, max_num_batched_tokens=32))


def test_predicted_ttft_of_an_idle_engine_is_one_prefill_step_of_the_uncached_tokens() -> None:
    engine, _ = _engine(latency=ROOF)
    engine.submit(_req(0, 0.0, ("a", 96)), 0.0)
    engine.advance(1.0)
    assert engine.predicted_ttft(_req(1, 1.0, ("a", 96), ("b", 64)), 1.0) == pytest.approx(0.5 * 64 / 1000)
    assert engine.predicted_ttft(_req(1, 1.0, ("x", 96)), 1.0) == pytest.approx(0.5 * 96 / 1000)
    # While a step is in flight, its rest counts too.
    engine.submit(_req(2, 1.0, ("y", 100)), 1.0)
    engine.advance(1.01)
    assert engine.predicted_ttft(_req(3, 1.01, ("z", 40)), 1.01) == pytest.approx(0.040 + 0.020)


def test_next_wake_is_never_after_the_next_finish() -> None:
    engine, done = _engine(latency=ROOF)
    engine.submit(_req(0, 0.0, ("a", 64), out=5), 0.0)
    engine.submit(_req(1, 0.0, ("b", 64), out=9), 0.0)
    finishes = []
    t = 0.0
    while not engine.idle:
        t = engine.next_wake()
        engine.advance(t + 1e-12)
        finishes.append((t, len(done)))
    assert done[0].e2e == pytest.approx(0.064 + 4 * 0.010)
    assert (done[0].e2e, 1) in [(pytest.approx(w), n) for w, n in finishes]
