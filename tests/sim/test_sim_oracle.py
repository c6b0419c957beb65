"""The oracle of ``igw_sim.replay.oracle``: its choices on hand-made views, and a seeded replay."""

from __future__ import annotations

from dataclasses import dataclass

from igw_sim.config import EngineConfig
from igw_sim.replay import build_workload, run_replay
from igw_sim.replay.oracle import OracleRouter
from igw_sim.replay.requests import SimRequest

H100 = EngineConfig.from_preset("h100-llama3-8b")


@dataclass
class View:
    """A live view with set numbers: ``cached`` prompt tokens of any request, a fixed TTFT prediction."""

    index: int
    ttft: float = 0.05
    cached: int = 0
    waiting: int = 0
    running: int = 0
    kv_usage: float = 0.0
    dispatched: int = 0
    block_size: int = 16
    num_gpu_blocks: int = 27_000
    max_num_seqs: int = 256
    prefill_s_per_token: float = 0.035e-3
    now: float = 0.0
    scraped_at: float = 0.0

    def cached_prefix_tokens(self, request: SimRequest) -> int | None:
        return min(self.cached, request.prompt_tokens - 1)

    def predicted_ttft(self, request: SimRequest) -> float | None:
        return self.ttft


def _request(i: int = 0, group: str = "sys") -> SimRequest:
    return SimRequest(i, 0.0, ((group, 6000), (f"q{i}", 1200)), 250)


def test_prefers_the_engine_that_holds_the_prefix_when_loads_are_equal() -> None:
    views = [View(0), View(1), View(2, cached=6000), View(3)]
    assert OracleRouter().route(_request(), views) == 2


def test_avoids_a_deeply_queued_engine_even_if_it_holds_the_prefix() -> None:
    # Recomputing 6000 tokens elsewhere costs 16 x 0.21 s = 3.4 s of cluster time; 20 s of queue is worse.
    views = [View(0, ttft=20.0, cached=6000, waiting=300), View(1), View(2)]
    assert OracleRouter().route(_request(), views) != 0
    # A short queue is not worth a miss.
    views[0].ttft = 0.5
    assert OracleRouter().route(_request(), views) == 0


def test_a_queued_prefix_counts_as_cached() -> None:
    # The first request of a group is still queued on engine 1 (nothing cached yet): the second follows it.
    router = OracleRouter()
    views = [View(0), View(1, ttft=0.049), View(2)]
    assert router.route(_request(0), views) == 1
    views[1].ttft = 0.3
    assert router.route(_request(1), views) == 1
    # Once it finished (and its cache is gone), the group is placed anew.
    router.on_complete(_request(0), 1)
    router.on_complete(_request(1), 1)
    assert router.route(_request(2), views) != 1


def test_ties_are_drawn_from_the_seed() -> None:
    def choices(seed: int) -> list[int]:
        router = OracleRouter(seed)
        views = [View(i) for i in range(8)]
        return [router.route(SimRequest(i, 0.0, ((f"u{i}", 100),), 10), views) for i in range(40)]

    assert choices(1) == choices(1)
    assert choices(1) != choices(2)
    assert len(set(choices(1))) > 1


def test_a_replay_is_deterministic_and_keeps_groups_together() -> None:
    workload = build_workload("w1:qps=20,duration=20,groups=12", cluster_kv_tokens=None)
    runs = [run_replay(workload, OracleRouter(7), engines=4, config=H100, keep_requests=True) for _ in range(2)]
    first, second = (r.recorder.requests for r in runs)
    assert first is not None
    assert first == second
    homes: dict[str, set[int]] = {}
    for request in workload:
        homes.setdefault(request.segments[0][0], set()).add(first[request.request_id].engine)
    assert all(len(engines) == 1 for engines in homes.values())
    assert runs[0].summary.prefix_hit_rate > 0.8
