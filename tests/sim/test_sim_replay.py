"""Replays end to end: requests as segments, workloads, policies, information lag, the CLI."""

from __future__ import annotations

import itertools
import json
import random
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import pytest

from igw_sim.cli import main as sim_main
from igw_sim.config import EngineConfig
from igw_sim.replay import EngineView, _compiled, build_workload, compiled, make_router, run_replay
from igw_sim.replay.requests import SimRequest, chunk_runs
from igw_sim.replay.routers import CacheAwareRouter, MissPricedOracleRouter, PrefixLoadRouter
from igw_sim.replay.workloads import load_jsonl, parse_spec, save_jsonl

H100 = EngineConfig.from_preset("h100-llama3-8b")


# -- requests and workloads -------------------------------------------------------------------------


def test_equal_segments_give_equal_nodes_and_anything_else_differs() -> None:
    a = SimRequest(0, 0.0, (("sys", 100), ("q", 20)), 5)
    b = SimRequest(1, 0.0, (("sys", 100), ("r", 20)), 5)
    c = SimRequest(2, 0.0, (("sys", 100), ("q", 20)), 5, lora="adapter-1")
    d = SimRequest(3, 0.0, (("sys", 99), ("q", 20)), 5)
    assert a.nodes[0] == b.nodes[0] != c.nodes[0]
    assert a.nodes[1] != b.nodes[1]
    assert d.nodes[0] != a.nodes[0]
    assert d.nodes[1] != a.nodes[1]
    assert (a.prompt_tokens, a.ends) == (120, (100, 120, 125))
    # A chat's next turn quotes the answer: same node as the earlier request's output.
    turn0 = SimRequest(4, 0.0, (("sys", 100), ("u0", 10)), 7, output_key="a0")
    turn1 = SimRequest(5, 1.0, (("sys", 100), ("u0", 10), ("a0", 7), ("u1", 10)), 7)
    assert turn1.nodes[2] == turn0.nodes[-1]


def test_chunk_runs_cut_the_prompt_like_the_approximate_prefix_index() -> None:
    r = SimRequest(0, 0.0, (("sys", 100), ("q", 20)), 5)
    # 16-token chunks: chunks 0-5 end inside sys, chunk 6 ends at token 112 (in q), chunk 7 is partial.
    assert chunk_runs(r, 16, partial=False) == [(r.nodes[0], 6), (r.nodes[1], 1)]
    assert chunk_runs(r, 16, partial=True) == [(r.nodes[0], 6), (r.nodes[1], 2)]
    assert chunk_runs(r, 16, partial=True, max_chunks=4) == [(r.nodes[0], 4)]


def test_generators_are_seeded_and_re_iterable() -> None:
    w = build_workload("w4:qps=50,duration=2,seed=3")
    first = [(r.arrival, r.segments) for r in w]
    assert first == [(r.arrival, r.segments) for r in w]
    assert first != [(r.arrival, r.segments) for r in build_workload("w4:qps=50,duration=2,seed=4")]
    assert 60 < len(first) < 140
    assert all(a[0] <= b[0] for a, b in itertools.pairwise(first))


def test_w1_sizes_its_groups_to_the_kv_fill() -> None:
    w = build_workload("w1:fill=0.5,qps=5,duration=1", cluster_kv_tokens=1_000_000)
    assert "42 groups" in w.description  # round(0.5 * 1e6 / (6000 + 5 * 1200))
    with pytest.raises(ValueError, match="cluster KV"):
        build_workload("w1:qps=5")


def test_w5_turns_quote_every_earlier_question_and_answer() -> None:
    reqs = list(build_workload("w5:users=2,rounds=3,qps=100,system=10,history=20,question=5,answer=4"))
    assert len(reqs) == 6
    third = reqs[4]  # user 0, turn 2
    assert [k for k, _ in third.segments] == ["w5/sys", "w5/h0", "w5/q0.0", "w5/a0.0", "w5/q0.1", "w5/a0.1", "w5/q0.2"]
    assert third.output_key == "w5/a0.2"
    assert reqs[0].nodes[-1] == third.nodes[3]


def test_w7_mixes_long_and_short_prompts() -> None:
    reqs = list(build_workload("w7:qps=200,duration=5,long_fraction=0.25"))
    longs = sum(r.prompt_tokens == 8192 for r in reqs)
    assert 0.15 < longs / len(reqs) < 0.35
    assert {r.output_tokens for r in reqs} == {64, 512}


def test_jsonl_round_trip_and_short_forms(tmp_path: Path) -> None:
    path = tmp_path / "w.jsonl"
    w = build_workload("w5:users=2,rounds=2,qps=10")
    assert save_jsonl(w, path) == 4
    again = list(load_jsonl(path))
    assert [(r.arrival, r.segments, r.output_key, r.nodes) for r in again] == [
        (r.arrival, r.segments, r.output_key, r.nodes) for r in w
    ]
    short = tmp_path / "s.jsonl"
    short.write_text(
        '{"t": 0, "prefix_group": "g", "prefix_tokens": 64, "prompt_tokens": 8, "output_tokens": 2}\n'
        '{"t": 0.5, "prompt_tokens": 30, "max_tokens": 3, "lora": "x"}\n'
    )
    a, b = load_jsonl(short)
    assert (a.prompt_tokens, a.segments[0], a.output_tokens) == (72, ("g/g", 64), 2)
    assert (b.prompt_tokens, b.output_tokens, b.lora) == (30, 3, "x")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"t": 0}\n')
    with pytest.raises(ValueError, match="line 1"):
        list(load_jsonl(bad))


def test_spec_errors() -> None:
    assert parse_spec("w1:qps=20, fill=0.7") == ("w1", {"qps": 20.0, "fill": 0.7})
    with pytest.raises(ValueError, match="unknown w4 parameter"):
        build_workload("w4:colour=3")
    with pytest.raises(ValueError, match="unknown workload"):
        build_workload("w9")


# -- policies ---------------------------------------------------------------------------------------


class _View:
    def __init__(self, index: int, *, waiting: int = 0, running: int = 0, kv: float = 0.0) -> None:
        self.index = index
        self.waiting = waiting
        self.running = running
        self.kv_usage = kv
        self.dispatched = 0
        self.block_size = 16
        self.num_gpu_blocks = 1000
        self.max_num_seqs = 8
        self.now = 0.0
        self.scraped_at = 0.0

    def cached_prefix_tokens(self, request: SimRequest) -> int | None:
        return None

    def predicted_ttft(self, request: SimRequest) -> float | None:
        return None


def _views(n: int) -> list[_View]:
    return [_View(i) for i in range(n)]


def test_simple_policies() -> None:
    req = SimRequest(0, 0.0, (("p", 10),), 1)
    rr = make_router("round-robin")
    assert [rr.route(req, _views(3)) for _ in range(4)] == [0, 1, 2, 0]
    views = _views(3)
    views[0].waiting, views[1].running, views[2].dispatched = 2, 1, 3
    assert make_router("least-queue").route(req, views) == 1
    assert {make_router("random", s).route(req, _views(4)) for s in range(20)} == {0, 1, 2, 3}
    with pytest.raises(ValueError, match="unknown policy"):
        make_router("best")


def test_prefix_load_follows_the_prefix_until_the_queue_outweighs_it() -> None:
    router = PrefixLoadRouter(seed=1)
    views: Sequence[EngineView] = _views(4)
    first = router.route(SimRequest(0, 0.0, (("sys", 1024), ("q0", 64)), 1), views)
    again = router.route(SimRequest(1, 0.0, (("sys", 1024), ("q1", 64)), 1), views)
    assert again == first  # 3 x 64/68 of the prefix beats nothing
    busy = _views(4)
    for v in busy:
        v.scraped_at = 1.0  # a new scrape: the policy re-reads kv_usage
    busy[first].waiting = 10  # queue score 0 there, 1 elsewhere
    busy[first].kv_usage = 0.5  # 2 x 0 + 2 x 0.5 + 3 x 64/68 < 2 x 1 + 2 x 1
    assert router.route(SimRequest(2, 0.0, (("sys", 1024), ("q2", 64)), 1), busy) != first


@pytest.mark.parametrize("policy", ["least-queue", "prefix-load"])
def test_policies_that_keep_scores_between_scrapes_decide_as_if_recomputing_them(policy: str) -> None:
    """Between scrapes these policies update only the engine they chose last (read back from its view);
    a policy handed a fresh list of views every time recomputes everything: the decisions are the same."""
    rng = random.Random(7)
    cached, fresh = make_router(policy, 3), make_router(policy, 3)
    views = _views(8)
    for n in range(400):
        if n % 25 == 0:  # a scrape
            for v in views:
                v.waiting, v.running, v.kv_usage = rng.randrange(3), rng.randrange(4), rng.random()
                v.dispatched = 0
                v.scraped_at = n
        req = SimRequest(n, 0.0, ((f"s{rng.randrange(5)}", 64), (f"q{n}", 16)), 1)
        choice = cached.route(req, views)
        assert fresh.route(req, list(views)) == choice, n
        if rng.random() < 0.9:  # else the engine rejected it: nothing was dispatched
            views[choice].dispatched += 1


def test_tie_breaks_draw_exactly_what_random_choice_draws() -> None:
    """Policies pick the k-th tied engine with ``_below`` (no list of ties, no Python frames): the same
    draws, from the same stream, as ``rng.choice`` of the tied indices."""
    router, rng = make_router("least-queue", 11), random.Random(11)
    for n in itertools.islice(itertools.cycle([1, 2, 3, 5, 7, 8, 9, 63, 64, 65, 1000]), 2000):
        assert router._below(n) == rng.choice(range(n)), n  # type: ignore[attr-defined]


def test_cache_aware_follows_matches_above_the_threshold_and_balances_when_imbalanced() -> None:
    router = CacheAwareRouter(seed=0, balance_abs_threshold=2, balance_rel_threshold=1.5)
    views = _views(3)
    a = router.route(SimRequest(0, 0.0, (("sys", 100), ("q0", 10)), 1), views)
    assert a == 0  # all trees empty: the smallest (first)
    b = router.route(SimRequest(1, 0.0, (("other", 100),), 1), views)
    assert b == 1  # no match: the smallest tree
    assert router.route(SimRequest(2, 0.0, (("sys", 100), ("q2", 10)), 1), views) == 0  # 100/110 matched
    assert router.route(SimRequest(3, 0.0, (("sys", 100), ("q3", 10)), 1), views) == 0
    # Loads 3, 1, 0: imbalanced (3 - 0 > 2 and 3 > 1.5 x 0): the least loaded.
    assert router.route(SimRequest(4, 0.0, (("sys", 100), ("q4", 10)), 1), views) == 2
    for i in range(3):
        router.on_complete(SimRequest(i, 0.0, (("x", 1),), 1), 0)
    assert router.load == [0, 1, 1]


# -- the replay loop --------------------------------------------------------------------------------


def test_replays_are_deterministic_and_count_every_request() -> None:
    w = build_workload("w4:qps=200,duration=3,groups=8")
    runs = [run_replay(w, make_router("prefix-load", 7), engines=4, config=H100).summary for _ in range(2)]
    assert runs[0].to_json() | {"wall_s": 0, "requests_per_wall_s": 0} == runs[1].to_json() | {
        "wall_s": 0,
        "requests_per_wall_s": 0,
    }
    s = runs[0]
    assert s.completed == s.requests == len(list(w))
    assert sum(s.shares) == pytest.approx(1.0)
    assert s.ttft_p50 <= s.ttft_p90 <= s.ttft_p99


def test_scraped_views_lag_and_count_what_the_policy_sent_since() -> None:
    seen: list[tuple[int, int, int]] = []

    class Spy:
        name = "spy"
        true_state = False
        needs_completions = False

        def route(self, request: SimRequest, engines: Sequence[EngineView]) -> int:
            v = engines[0]
            seen.append((v.waiting + v.running, v.dispatched, round(v.now * 1000)))
            return 0

        def on_complete(self, request: SimRequest, engine: int) -> None:
            return None

    reqs = [SimRequest(i, 0.001 * i, ((f"p{i}", 100),), 500) for i in range(120)]
    run_replay(reqs, Spy(), engines=1, config=H100, scrape_interval=0.05)
    # At 40 ms nothing was scraped since t=0 but 40 requests were sent; at 60 ms the scrape of 50 ms shows them.
    assert seen[40] == (0, 40, 40)
    assert seen[60][0] == 50
    assert seen[60][1] == 10


def test_completions_reach_the_policy_before_later_decisions() -> None:
    router = CacheAwareRouter(seed=0)
    w = build_workload("w4:qps=100,duration=3,output=20")
    run = run_replay(w, router, engines=4, config=H100)
    assert router.load == [0, 0, 0, 0]
    assert run.summary.completed == len(list(w))


def test_the_oracle_sees_true_state_and_takes_the_cached_engine() -> None:
    reqs = [SimRequest(0, 0.0, (("sys", 4000), ("q0", 50)), 2)]
    reqs += [SimRequest(i, 1.0 + i * 0.001, (("sys", 4000), (f"q{i}", 50)), 2) for i in range(1, 6)]
    run = run_replay(reqs, make_router("oracle"), engines=4, config=H100, keep_requests=True)
    done = run.recorder.requests
    assert done is not None
    assert {done[i].engine for i in range(6)} == {done[0].engine}
    assert all(done[i].cached_tokens == 4000 for i in range(1, 6))


def test_the_oracle_keeps_a_group_where_it_is_cached_where_the_greedy_oracle_spreads_it() -> None:
    # Saturated W1 on 2 engines: pricing misses keeps the hit rate and the throughput up.
    w = build_workload("w1:groups=6,prompts=3,qps=40,duration=20,system=3000,question=600,output=100")
    config = H100.replace(kv_blocks=1400)
    greedy = run_replay(w, MissPricedOracleRouter(miss_weight=0.0), engines=2, config=config, warmup=5).summary
    sticky = run_replay(w, make_router("oracle"), engines=2, config=config, warmup=5).summary
    assert sticky.prefix_hit_rate > greedy.prefix_hit_rate
    assert sticky.output_tokens_per_s >= greedy.output_tokens_per_s


def test_w6_names_adapters_with_zipf_popularity() -> None:
    reqs = list(build_workload("w6:qps=50,duration=20,adapters=8"))
    counts = Counter(r.lora for r in reqs)
    assert set(counts) <= {f"lora-{k}" for k in range(8)}
    assert counts["lora-0"] > counts["lora-7"] * 3
    same = [r for r in reqs if r.lora == "lora-0"][:2]
    other = next(r for r in reqs if r.lora == "lora-1")
    assert same[0].nodes[0] == same[1].nodes[0] != other.nodes[0]


def test_warmup_requests_fill_caches_but_are_not_measured() -> None:
    w = build_workload("w1:groups=4,qps=20,duration=10,system=2000,question=100,output=20")
    cold = run_replay(w, make_router("prefix-load"), engines=2, config=H100).summary
    warm = run_replay(w, make_router("prefix-load"), engines=2, config=H100, warmup=5.0).summary
    assert warm.completed < cold.completed
    assert warm.prefix_hit_rate > cold.prefix_hit_rate


def test_out_of_order_arrivals_are_refused() -> None:
    reqs = [SimRequest(0, 1.0, (("a", 10),), 1), SimRequest(1, 0.5, (("b", 10),), 1)]
    with pytest.raises(ValueError, match="before the previous one"):
        run_replay(reqs, make_router("random"), engines=1, config=H100)


# -- command line -----------------------------------------------------------------------------------


def test_cli_prints_a_table_per_policy_and_writes_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "r.json"
    code = sim_main(
        ["replay", "--engines", "4", "--workload", "w1:groups=8,qps=10,duration=5,output=20", "--json", str(out)]
    )
    assert code == 0
    table = capsys.readouterr().out
    for name in ("random", "round-robin", "least-queue", "prefix-load", "cache-aware", "oracle"):
        assert f"| {name} |" in table
    doc = json.loads(out.read_text())
    assert [r["policy"] for r in doc["results"]][-1] == "oracle"
    assert len(doc["results"][0]["shares"]) == 4


def test_cli_saves_a_workload_and_replays_it(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "w.jsonl"
    assert sim_main(["replay", "--workload", "w7:qps=5,duration=2", "--save-workload", str(path)]) == 0
    assert sim_main(["replay", "--workload", str(path), "--policies", "least-queue", "--engine-model", "exact"]) == 0
    assert "| least-queue |" in capsys.readouterr().out


def test_cli_rejects_bad_arguments(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        sim_main(["replay", "--workload", "w1:qps=1,fill=0.5", "--policies", "nope"])
    assert exc.value.code == 2
    assert "unknown policy" in capsys.readouterr().err


def test_a_compiled_build_is_used_only_while_it_matches_the_sources(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(_compiled, "build_root", lambda: tmp_path)
    monkeypatch.delenv("IGW_SIM_PURE", raising=False)
    assert _compiled.ext_dir() is None  # no build
    (tmp_path / "stamp.json").write_text('{"digest": "stale"}')
    assert _compiled.ext_dir() is None
    (tmp_path / "stamp.json").write_text(f'{{"digest": "{_compiled.source_digest()}"}}')
    assert _compiled.ext_dir() == tmp_path / "igw_sim" / "replay"
    monkeypatch.setenv("IGW_SIM_PURE", "1")
    assert _compiled.ext_dir() is None
    assert isinstance(compiled(), bool)  # which variant this test run loaded: either is supported


def test_the_two_replay_loops_stay_identical_but_for_the_engine_type() -> None:
    """``_loop_fast`` exists only so the compiled build calls FastEngine natively: same body as ``_loop``."""
    from pathlib import Path

    import igw_sim

    source = (Path(igw_sim.__file__).parent / "replay" / "driver.py").read_text()  # the compiled build has none

    def body(name: str) -> list[str]:
        lines = source[source.index(f"\ndef {name}(") :].splitlines()[1:]
        lines = lines[lines.index(") -> None:") + 1 :]
        end = next((i for i, line in enumerate(lines) if line and not line.startswith((" ", ")"))), len(lines))
        return [line for line in lines[:end] if not line.strip().startswith('"""')] if end else []

    def trimmed(name: str) -> list[str]:
        lines = body(name)
        while lines and not lines[-1].strip():
            lines.pop()
        return lines

    assert trimmed("_loop_fast") == trimmed("_loop")
    assert len(trimmed("_loop")) > 50
