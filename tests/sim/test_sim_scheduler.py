"""The pure engine core on a hand-driven clock: every time below is computed by hand from the profile."""

from __future__ import annotations

import pytest

from igw_sim.config import EngineConfig
from igw_sim.kvevents import BlockRemoved, BlockStored
from igw_sim.profiles import LatencyProfile
from igw_sim.scheduler import (
    ContextLengthError,
    EngineCore,
    InvalidRequestError,
    QueueFullError,
    Request,
    RequestStatus,
    StepPlan,
    TokenOutput,
)

FLAT = LatencyProfile(name="flat", weights_ms=10.0, ms_per_token=0.0)
"""Every step takes 10 ms."""
ROOF = LatencyProfile(name="roof", weights_ms=10.0, ms_per_token=0.5)
"""max(10 ms, 0.5 ms per scheduled token)."""


def _core(**kwargs: object) -> EngineCore:
    base: dict[str, object] = {"latency": FLAT, "block_size": 16, "kv_blocks": 64, "max_num_seqs": 8}
    base.update(kwargs)
    return EngineCore(EngineConfig(**base))  # type: ignore[arg-type]


def _step(core: EngineCore, now: float) -> tuple[StepPlan, list[TokenOutput]]:
    plan = core.schedule(now)
    assert plan is not None
    return plan, core.complete(plan)


def _run(core: EngineCore, now: float = 0.0) -> tuple[float, list[tuple[float, TokenOutput]]]:
    """Step until idle; return the end time and every (time, token)."""
    tokens: list[tuple[float, TokenOutput]] = []
    while (plan := core.schedule(now)) is not None:
        now = plan.end
        tokens.extend((now, out) for out in core.complete(plan))
    return now, tokens


def _first_token_time(tokens: list[tuple[float, TokenOutput]], req: Request) -> float:
    return next(t for t, out in tokens if out.request is req and out.index == 0)


PROMPT64 = list(range(100, 164))


def test_ttft_is_the_prefill_of_uncached_tokens_only() -> None:
    core = _core(latency=ROOF)
    a = core.add_request(prompt_ids=PROMPT64, max_tokens=2, now=0.0)
    end, tokens = _run(core)
    # 64 prompt tokens: max(10, 32) = 32 ms, then one decode step of 10 ms.
    assert _first_token_time(tokens, a) == pytest.approx(0.032)
    assert end == pytest.approx(0.042)
    assert a.num_cached_tokens == 0

    b = core.add_request(prompt_ids=PROMPT64, max_tokens=1, now=end)
    _, tokens = _run(core, end)
    # 3 full blocks hit (the last prompt token is always recomputed): 16 new tokens, max(10, 8) = 10 ms.
    assert b.num_cached_tokens == 48
    assert _first_token_time(tokens, b) - end == pytest.approx(0.010)
    stats = core.stats
    assert (stats.prefix_cache_queries_total, stats.prefix_cache_hits_total) == (128, 48)
    assert stats.ttft.count == 2
    assert stats.ttft.total == pytest.approx(0.032 + 0.010)


def test_a_prompt_one_token_past_a_cached_prefix_hits_every_full_block() -> None:
    core = _core()
    core.add_request(prompt_ids=PROMPT64, max_tokens=1, now=0.0)
    end, _ = _run(core)
    longer = core.add_request(prompt_ids=[*PROMPT64, 7], max_tokens=1, now=end)
    other_lora_free = core.add_request(prompt_ids=[1, *PROMPT64[1:]], max_tokens=1, now=end)
    _run(core, end)
    assert longer.num_cached_tokens == 64
    assert other_lora_free.num_cached_tokens == 0  # the first block differs, so the whole chain does


def test_max_num_seqs_token_budget_and_chunked_prefill() -> None:
    core = _core(
        latency=LatencyProfile(name="t", weights_ms=10.0, ms_per_token=1.0), max_num_seqs=2, max_num_batched_tokens=32
    )
    a = core.add_request(prompt_ids=list(range(1000, 1040)), max_tokens=3, now=0.0)
    b = core.add_request(prompt_ids=list(range(2000, 2008)), max_tokens=1, now=0.0)
    c = core.add_request(prompt_ids=list(range(3000, 3008)), max_tokens=1, now=0.0)

    plan, out = _step(core, 0.0)  # a's first chunk uses the whole budget; b and c wait
    assert [(r, n) for r, n in plan.scheduled] == [(a, 32)]
    assert plan.duration == pytest.approx(0.032)
    assert out == []
    assert (len(core.running), len(core.waiting)) == (1, 2)

    plan, out = _step(core, 0.032)  # a's last 8 tokens + b; c waits for a running slot
    assert [(r, n) for r, n in plan.scheduled] == [(a, 8), (b, 8)]
    assert plan.duration == pytest.approx(0.016)
    assert [(o.request, o.index, o.finished) for o in out] == [(a, 0, False), (b, 0, True)]
    assert [r.request_id for r in core.waiting] == [c.request_id]

    plan, out = _step(core, 0.048)  # a decodes (1 token) while c prefills (8): max(10, 9) = 10 ms
    assert (plan.prefill_tokens, plan.decode_seqs) == (8, 1)
    assert plan.duration == pytest.approx(0.010)
    end, rest = _run(core, 0.058)
    assert end == pytest.approx(0.068)
    assert a.first_token_time == pytest.approx(0.048)
    assert c.first_token_time == pytest.approx(0.058)
    assert core.stats.queue_time.count == 3
    assert core.stats.queue_time.total == pytest.approx(0.0 + 0.032 + 0.048)
    assert core.stats.success_total == {"length": 3}
    assert [o.index for _, o in rest] == [2]


def test_preemption_recomputes_and_events_follow_lru_eviction() -> None:
    """4 blocks of 4 tokens (and the null block); two 6-token prompts generating 6 tokens each cannot both
    grow to 3 blocks."""
    core = _core(block_size=4, kv_blocks=5, max_num_seqs=2)
    a = core.add_request(prompt_ids=[1, 2, 3, 4, 5, 6], max_tokens=6, now=0.0)
    b = core.add_request(prompt_ids=[11, 12, 13, 14, 15, 16], max_tokens=6, now=0.0)
    timeline: list[tuple[float, list[object]]] = []
    outputs: list[tuple[float, TokenOutput]] = []
    now = 0.0
    while (plan := core.schedule(now)) is not None:
        timeline.append((now, core.take_kv_events()))  # type: ignore[arg-type]
        now = plan.end
        outputs.extend((now, o) for o in core.complete(plan))
        if now == pytest.approx(0.040):
            assert b.status is RequestStatus.PREEMPTED
            assert core.kv.block_ids(a.request_id) == [1, 2, 4]
    assert now == pytest.approx(0.090)
    assert core.stats.preemptions_total == 1
    assert b.num_preemptions == 1
    # b streamed tokens 0-2 before being preempted at 0.030 and resumed (tokens 3-5) once a finished.
    assert [(round(t, 3), o.index) for t, o in outputs if o.request is b] == [
        (0.010, 0), (0.020, 1), (0.030, 2), (0.070, 3), (0.080, 4), (0.090, 5),
    ]  # fmt: skip
    assert [(round(t, 3), o.index) for t, o in outputs if o.request is a][-1] == (0.060, 5)
    # b's first block survived in the cache: it was reused on resume (4 of 9 tokens).
    assert core.stats.prefix_cache_hits_total == 0  # resumes are not counted as new queries, like vLLM

    def summary(events: list[object]) -> list[tuple[str, int, int | None]]:
        out: list[tuple[str, int, int | None]] = []
        for e in events:
            if isinstance(e, BlockStored):
                out.append(("stored", e.token_ids[0], None if e.parent_block_hash is None else e.token_ids[0] - 4))
            elif isinstance(e, BlockRemoved):
                out.append(("removed", len(e.block_hashes), None))
        return out

    by_time = {round(t, 3): summary(ev) for t, ev in timeline if ev}
    assert by_time == {
        0.0: [("stored", 1, None), ("stored", 11, None)],  # first blocks of a and b
        0.02: [("stored", 5, 1), ("stored", 15, 11)],  # second blocks (2 prompt + 2 generated tokens)
        0.03: [("removed", 1, None)],  # b preempted; a takes b's freed second block, evicting it
        0.06: [("removed", 1, None), ("stored", 15, 11)],  # b resumes: evicts a's second block, re-stores its own
    }


def test_lora_requests_share_slots_and_pay_the_load_cost() -> None:
    core = _core(max_loras=1, lora_load_ms=5.0, lora_modules=(("l1", "/p1"), ("l2", "/p2")))
    x = core.add_request(prompt_ids=[1, 2, 3, 4], max_tokens=2, now=0.0, lora_name="l1")
    y = core.add_request(prompt_ids=[1, 2, 3, 4], max_tokens=2, now=0.0, lora_name="l2")
    z = core.add_request(prompt_ids=[5, 6, 7, 8], max_tokens=2, now=0.0, lora_name="l1")

    plan, _ = _step(core, 0.0)  # y's adapter cannot join: one adapter per step; it is skipped, not blocking z
    assert [r for r, _ in plan.scheduled] == [x, z]
    assert plan.lora_loads == ("l1",)
    assert plan.duration == pytest.approx(0.015)
    assert core.lora_sets() == (["l1"], ["l2"])
    end, _ = _run(core, plan.end)
    assert y.first_token_time == pytest.approx(0.040)  # 15 + 10 (x, z decode) + 15 (load l2, prefill y)
    assert end == pytest.approx(0.050)
    assert list(core.resident_loras) == ["l2"]
    assert core.stats.lora_loads_total == 2
    assert (x.lora_id, y.lora_id) == (1, 2)


def test_lora_blocks_are_keyed_by_adapter_name() -> None:
    core = _core(lora_modules=(("l1", "/p1"),))
    core.add_request(prompt_ids=PROMPT64, max_tokens=1, now=0.0)
    end, _ = _run(core)
    with_lora = core.add_request(prompt_ids=PROMPT64, max_tokens=1, now=end, lora_name="l1")
    _run(core, end)
    assert with_lora.num_cached_tokens == 0
    stored = [e for e in core.take_kv_events() if isinstance(e, BlockStored)]
    assert stored[-1].lora_name == "l1"
    assert stored[-1].lora_id == 1
    assert stored[-1].extra_keys == (("l1",),) * 4


def test_abort_frees_blocks_and_skips_the_in_flight_step() -> None:
    core = _core()
    a = core.add_request(prompt_ids=PROMPT64, max_tokens=5, now=0.0)
    plan = core.schedule(0.0)
    assert plan is not None
    assert core.kv.usage == pytest.approx(4 / 63)  # one of the 64 is the null block
    core.abort(a)
    core.abort(a)  # idempotent
    assert core.complete(plan) == []
    assert core.kv.usage == 0.0
    assert (core.stats.aborted_total, a.status) == (1, RequestStatus.ABORTED)
    assert core.schedule(plan.end) is None


def test_admission_checks() -> None:
    core = _core(max_num_seqs=1, max_waiting=1, max_model_len=100, kv_blocks=4)
    core.add_request(prompt_ids=[1], max_tokens=1, now=0.0)
    core.schedule(0.0)
    core.add_request(prompt_ids=[2], max_tokens=1, now=0.0)
    with pytest.raises(QueueFullError):
        core.add_request(prompt_ids=[3], max_tokens=1, now=0.0)
    with pytest.raises(ContextLengthError, match="maximum context length is 100"):
        core.add_request(prompt_ids=[1] * 90, max_tokens=11, now=0.0)
    with pytest.raises(ContextLengthError, match="KV cache"):
        core.add_request(prompt_ids=[1] * 60, max_tokens=5, now=0.0)  # 65 tokens > 4 blocks of 16
    with pytest.raises(InvalidRequestError, match="empty"):
        core.add_request(prompt_ids=[], max_tokens=1, now=0.0)
    with pytest.raises(InvalidRequestError, match="not loaded"):
        core.add_request(prompt_ids=[1], max_tokens=1, now=0.0, lora_name="nope")
    assert core.stats.requests_total == 2


def test_cache_salt_isolates_the_prefix() -> None:
    core = _core()
    core.add_request(prompt_ids=PROMPT64, max_tokens=1, now=0.0, cache_salt="tenant-a")
    end, _ = _run(core)
    same = core.add_request(prompt_ids=PROMPT64, max_tokens=1, now=end, cache_salt="tenant-a")
    other = core.add_request(prompt_ids=PROMPT64, max_tokens=1, now=end, cache_salt="tenant-b")
    _run(core, end)
    assert (same.num_cached_tokens, other.num_cached_tokens) == (48, 0)


def test_a_request_is_never_scheduled_before_it_arrives() -> None:
    core = _core()
    a = core.add_request(prompt_ids=[1, 2], max_tokens=1, now=0.0)
    late = core.add_request(prompt_ids=[3, 4], max_tokens=1, now=0.005)
    plan, _ = _step(core, 0.0)
    assert [r for r, _ in plan.scheduled] == [a]
    plan, _ = _step(core, plan.end)
    assert [r for r, _ in plan.scheduled] == [late]
    assert core.stats.queue_time.total == pytest.approx(0.010 - 0.005)


def test_waiting_requests_are_admitted_only_when_no_one_was_preempted() -> None:
    core = _core(block_size=4, kv_blocks=4, max_num_seqs=4)  # 3 usable
    a = core.add_request(prompt_ids=[1, 2, 3], max_tokens=8, now=0.0)  # grows to 3 blocks
    b = core.add_request(prompt_ids=[5, 6, 7], max_tokens=4, now=0.0)
    _step(core, 0.0)
    _step(core, 0.01)
    assert [r.status for r in (a, b)] == [RequestStatus.RUNNING] * 2
    core.add_request(prompt_ids=[9], max_tokens=1, now=0.01)
    now = 0.02
    while not b.num_preemptions:
        plan, _ = _step(core, now)
        now = plan.end
    assert [r for r, _ in plan.scheduled] == [a]  # the newcomer waited even though a block was free
