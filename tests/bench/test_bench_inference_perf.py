"""inference-perf as a load generator: configuration, report parsing (a real 0.7.0 report), the
seeding module, and one live run when its environment exists."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from igw_bench import inference_perf as ip
from igw_bench import peers
from igw_bench.procs import HOST, Child, free_ports
from igw_sim import tokenizer as sim_tokenizer

FIXTURE = Path(__file__).parent / "data" / "inference-perf-0.7"
"""A real report: sglang-router cache_aware in front of 3 simulated servers, shared_prefix data
(4 groups x 8 prompts, 64 + 16 prompt tokens, 8 output tokens), poisson 4 then 8 req/s, 6 s each."""

TOOL_INSTALLED = peers.installed(ip.TOOL)
NOT_INSTALLED = "inference-perf is not installed (python -m igw_bench.peers install inference-perf)"


def _config(tmp_path: Path, **overrides: object) -> dict[str, object]:
    kwargs: dict[str, object] = {
        "base_url": "http://127.0.0.1:30000",
        "model_name": "sim-model",
        "tokenizer_dir": tmp_path / "tok",
        "data": ip.SharedPrefixData(4, 8, 64, 16, 8),
        "stages": [(4, 6), (8.5, 6)],
        "report_dir": tmp_path / "reports",
        **overrides,
    }
    path = ip.write_config(tmp_path / "config.yml", **kwargs)
    loaded: dict[str, object] = yaml.safe_load(path.read_text())
    return loaded


# --------------------------------------------------------------------------------------------
# Configuration


def test_config_shared_prefix_poisson(tmp_path: Path) -> None:
    config = _config(tmp_path, seed=5)
    assert config["api"] == {"type": "completion", "streaming": True}
    assert config["server"] == {
        "type": "vllm",
        "model_name": "sim-model",
        "base_url": "http://127.0.0.1:30000",
        "ignore_eos": True,
    }
    assert config["tokenizer"] == {"pretrained_model_name_or_path": str(tmp_path / "tok")}
    assert config["data"] == {
        "type": "shared_prefix",
        "shared_prefix": {
            "num_groups": 4,
            "num_prompts_per_group": 8,
            "system_prompt_len": 64,
            "question_len": 16,
            "output_len": 8,
            "seed": 5,
        },
    }
    load = config["load"]
    assert isinstance(load, dict)
    assert load["type"] == "poisson"
    assert load["stages"] == [{"rate": 4.0, "duration": 6}, {"rate": 8.5, "duration": 6}]
    assert load["base_seed"] == 5
    assert config["report"] == {"request_lifecycle": {"summary": True, "per_stage": True, "per_request": False}}
    assert config["storage"] == {"local_storage": {"path": str(tmp_path / "reports")}}
    assert "metrics" not in config  # that would query a Prometheus server


def test_config_random_constant(tmp_path: Path) -> None:
    config = _config(tmp_path, data=ip.RandomData(100, 10, input_std_dev=10), stages=[(5, 10)], load_type="constant")
    data = config["data"]
    assert isinstance(data, dict)
    assert data["type"] == "random"
    assert data["input_distribution"] == {"min": 70, "max": 130, "mean": 100, "std_dev": 10, "total_count": 200}
    assert data["output_distribution"] == {"min": 10, "max": 10, "mean": 10, "std_dev": 0.0, "total_count": 200}
    load = config["load"]
    assert isinstance(load, dict)
    assert load["type"] == "constant"


@pytest.mark.parametrize("stages", [[], [(0, 5)], [(5, 0)], [(5, 2.5)]])
def test_config_rejects_bad_stages(tmp_path: Path, stages: list[ip.Stage]) -> None:
    with pytest.raises(ValueError, match="stage"):
        _config(tmp_path, stages=stages)


def test_the_tokenizer_spec_is_the_simulators() -> None:
    spec = ip._tokenizer_spec()
    assert spec["words"] == list(sim_tokenizer.GENERATION_WORDS)
    text = "Hello, world!  the of\n"
    assert len(re.findall(spec["pattern"], text)) == sim_tokenizer.count(text)


# --------------------------------------------------------------------------------------------
# Reports


def test_parse_reports_of_a_real_run() -> None:
    first, second = ip.parse_reports(FIXTURE)
    assert first["stage"] == 0
    assert second["stage"] == 1
    assert (first["rate"], second["rate"]) == (4.0, 8.0)
    assert (first["requests"], second["requests"]) == (24, 48)
    assert first["failures"] == second["failures"] == 0
    assert first["token_count_mismatches"] == second["token_count_mismatches"] == 0
    # The simulator counted exactly the prompt inference-perf meant: 64 + 16 tokens each.
    assert first["prompt_tokens"] == 24 * 80
    assert second["prompt_tokens"] == 48 * 80
    # cache_aware kept every group on one server: all but the first request of a group hit.
    assert first["cached_prompt_tokens"] == (24 - 4) * 64
    assert first["ttft_p50"] == pytest.approx(0.0347, abs=1e-4)
    for stage in (first, second):
        ttft = [stage["ttft_p50"], stage["ttft_p90"], stage["ttft_p99"]]
        e2e = [stage["e2e_p50"], stage["e2e_p90"], stage["e2e_p99"]]
        assert all(isinstance(v, float) and 0 < v < 1 for v in [*ttft, *e2e])
        assert ttft == sorted(ttft)  # type: ignore[type-var]
        assert e2e == sorted(e2e)  # type: ignore[type-var]
        assert stage["itl_p50"] == pytest.approx(0.010, rel=0.2)  # the simulator's 10 ms ITL
        assert stage["output_tokens_per_s"] == pytest.approx(8 * stage["requests_per_s"])


def test_parse_reports_orders_stages_numerically(tmp_path: Path) -> None:
    report = json.loads((FIXTURE / "stage_0_lifecycle_metrics.json").read_text())
    for n in (10, 2):
        report["load_summary"]["requested_rate"] = float(n)
        (tmp_path / f"stage_{n}_lifecycle_metrics.json").write_text(json.dumps(report))
    (tmp_path / "summary_lifecycle_metrics.json").write_text("{}")
    assert [(s["stage"], s["rate"]) for s in ip.parse_reports(tmp_path)] == [(2, 2.0), (10, 10.0)]


def test_a_stage_without_successes_has_no_latencies() -> None:
    stage = ip.parse_stage(
        {"load_summary": {"requested_rate": 3.0}, "successes": {"count": 0, "latency": None}, "failures": {"count": 5}},
        4,
    )
    assert stage["requests"] == 5
    assert stage["failures"] == 5
    assert stage["ttft_p50"] is None
    assert stage["e2e_p99"] is None
    assert stage["prompt_tokens"] == 0.0


def test_parse_reports_needs_a_stage_report(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no stage_N"):
        ip.parse_reports(tmp_path)


# --------------------------------------------------------------------------------------------
# The seeding module (tools/bench/sitecustomize.py)

_DRAW = "import random, numpy as np; print(random.random(), np.random.default_rng().integers(1 << 40), np.random.default_rng().integers(1 << 40), np.random.default_rng(3).integers(1 << 40))"


def _draw(python: str, seed: str | None, extra_path: Path | None = None) -> list[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("IGW_BENCH_SEED", "PYTHONPATH")}
    if seed is not None:
        env["IGW_BENCH_SEED"] = seed
    if extra_path is not None:
        env["PYTHONPATH"] = str(extra_path)
    out = subprocess.run([python, "-c", _DRAW], env=env, capture_output=True, text=True, timeout=60, check=True)
    return out.stdout.split()


def test_sitecustomize_seeds_unseeded_generators() -> None:
    pytest.importorskip("numpy")
    tools = peers.CONSTRAINTS_DIR
    a, b, c = (_draw(sys.executable, seed, tools) for seed in ("7", "7", "8"))
    assert a == b
    assert a[0] != c[0]
    assert a[1] != c[1]
    assert a[1] != a[2]  # successive unseeded generators differ
    assert a[3] == c[3]  # an explicit seed is untouched
    unseeded = _draw(sys.executable, None, tools), _draw(sys.executable, None, tools)
    assert unseeded[0][1] != unseeded[1][1]


@pytest.mark.skipif(not TOOL_INSTALLED, reason=NOT_INSTALLED)
def test_the_installed_environment_carries_the_seeding_module() -> None:
    python = str(ip.ensure() / "python")
    assert _draw(python, "11") == _draw(python, "11")


# --------------------------------------------------------------------------------------------
# Live: a short run straight against two simulated servers


@pytest.mark.timeout(180)
@pytest.mark.skipif(not TOOL_INSTALLED, reason=NOT_INSTALLED)
async def test_live_run_counts_tokens_like_the_simulator(tmp_path: Path) -> None:
    tokenizer = ip.ensure_tokenizer()
    (port,) = free_ports(1)
    sim = Child(
        "sim", [sys.executable, "-m", "igw_sim", "--ports", str(port), "--duration", "150"], tmp_path / "sim.log"
    )
    try:
        await sim.start("igw-sim: ready", timeout=30)
        config = ip.write_config(
            tmp_path / "config.yml",
            base_url=f"http://{HOST}:{port}",
            model_name="sim-model",
            tokenizer_dir=tokenizer,
            data=ip.RandomData(input_len=24, output_len=5),
            stages=[(5, 3)],
            report_dir=tmp_path / "reports",
            seed=3,
        )
        report_dir = await ip.run(config, lambda _: None, timeout=150, seed=3)
    finally:
        await sim.stop()
    (stage,) = ip.parse_reports(report_dir)
    assert stage["requests"] > 0
    assert stage["failures"] == 0
    assert stage["token_count_mismatches"] == 0
    assert stage["prompt_tokens"] == 24 * stage["requests"]
    assert stage["itl_p50"] is not None
    assert stage["itl_p50"] > 0.002  # one token per chunk: no zero inter-token latencies
