"""One step of ``igw bench compare`` driven by inference-perf instead of the built-in client.

inference-perf generates its own prompts, so only the workloads it can express are accepted: W1 and
W4 become its ``shared_prefix`` data (the group count, prompts per group and lengths read off the
workload generator itself, so both clients see the same shape; W4's unique questions become a large
number of prompts per group). Its arrivals are Poisson at the step's rate divided by the time dilation
for ``step_s x dilation`` real seconds, and its percentiles are converted back to simulated time.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from igw_bench import inference_perf as ip
from igw_sim.replay.workloads import build_workload, parse_spec

__all__ = ["IP_WORKLOADS", "run_ip_step", "shared_prefix_shape"]

IP_WORKLOADS = ("w1", "w4")
W4_PROMPTS_PER_GROUP = 4096
"""W4's questions are unique per request; this many per group makes repeats rare in a bounded step."""


def shared_prefix_shape(workload: str, kv_tokens: int | None) -> ip.SharedPrefixData:
    """The ``shared_prefix`` data equivalent to ``workload`` (a W1 or W4 spec without rate)."""
    name, params = parse_spec(workload)
    if name not in IP_WORKLOADS:
        raise ValueError(f"the inference-perf load supports {', '.join(IP_WORKLOADS)}, not {name}")
    sample = build_workload(f"{workload},qps=1000,duration=20,seed=0" if params else f"{name}:qps=1000,duration=20",
                            cluster_kv_tokens=kv_tokens)  # fmt: skip
    systems: set[str] = set()
    questions: set[str] = set()
    system_len = question_len = output_len = 0
    for request in sample:
        (system_key, system_len), (question_key, question_len) = request.segments[:2]
        systems.add(system_key)
        questions.add(question_key)
        output_len = request.output_tokens
    per_group = W4_PROMPTS_PER_GROUP if name == "w4" else max(1, math.ceil(len(questions) / max(len(systems), 1)))
    return ip.SharedPrefixData(len(systems), per_group, system_len, question_len, output_len)


async def run_ip_step(
    *, base_url: str, model: str, data: ip.SharedPrefixData, qps: float, step_s: float, dilation: float,
    seed: int, workdir: Path, log: Callable[[str], None],
) -> dict[str, Any]:  # fmt: skip
    """Run one stage; the client-side figures of :func:`igw_bench.compare.step_stats` (simulated time)."""
    tokenizer = await asyncio.to_thread(ip.ensure_tokenizer, log)
    duration = max(1, round(step_s * dilation))
    config = ip.write_config(
        workdir / "config.yaml", base_url=base_url, model_name=model, tokenizer_dir=tokenizer, data=data,
        stages=[(qps / dilation, duration)], report_dir=workdir / "report", seed=seed,
        request_timeout=max(60.0, step_s * dilation * 4),
    )  # fmt: skip
    report = await ip.run(config, log, timeout=duration * 4 + 120, seed=seed, log_path=workdir / "inference-perf.log")
    (stage,) = ip.parse_reports(report)[:1]

    def sim(value: float | None) -> float:
        return value / dilation if value is not None else float("nan")

    ok = stage["requests"] - stage["failures"]
    return {
        "requests": stage["requests"],
        "ok": ok,
        "failed": stage["failures"],
        "errors": {"inference-perf failures": stage["failures"]} if stage["failures"] else {},
        "span_s": ok / stage["requests_per_s"] / dilation if stage["requests_per_s"] else float("nan"),
        "output_tokens_per_s": stage["output_tokens_per_s"] * dilation,
        "requests_per_s": stage["requests_per_s"] * dilation,
        "ttft_s": {"p50": sim(stage["ttft_p50"]), "p90": sim(stage["ttft_p90"]), "p99": sim(stage["ttft_p99"])},
        "itl_s": {"p50": sim(stage["itl_p50"]), "p90": sim(stage["itl_p90"])},
        "e2e_s": {"p50": sim(stage["e2e_p50"]), "p90": sim(stage["e2e_p90"]), "p99": sim(stage["e2e_p99"])},
        "hit_rate_usage": stage["cached_prompt_tokens"] / stage["prompt_tokens"] if stage["prompt_tokens"] else 0.0,
        "token_count_mismatches": stage["token_count_mismatches"],
        "achieved_qps": stage["achieved_rate"] * dilation,
    }
