"""inference-perf 0.7.0 (kubernetes-sigs) as the load generator: a client nobody here wrote.

Three steps, each usable alone:

* :func:`write_config` writes its YAML: ``shared_prefix`` or ``random`` data, ``poisson`` or
  ``constant`` stages of ``(rate, duration)``, streaming completions, a vLLM-type server, the
  lifecycle report (summary and per stage) into a given directory;
* :func:`run` runs it in its own Python 3.12 environment (:func:`igw_bench.peers.ensure`),
  offline, with its arrival timers seeded, bounded in time;
* :func:`parse_reports` turns its per-stage reports into plain :class:`StageResult` dicts.

inference-perf builds synthetic prompts by decoding random token ids from a Hugging Face
tokenizer and re-tokenizes every response to count output tokens (``token_count_mismatches``
when its count differs from the server's ``usage``). :func:`ensure_tokenizer` builds, once, a
tokenizer directory that counts exactly like the simulator's toy tokenizer
(:mod:`igw_sim.tokenizer`): one token per piece, a vocabulary of ``" word"`` pieces over
``GENERATION_WORDS``. The build runs inside the inference-perf environment
(``tools/bench/build_tokenizer.py``), so our own environment does not need ``tokenizers``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import math
import os
import re
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypedDict

import yaml

from igw_bench import peers
from igw_bench.procs import Child
from igw_sim import tokenizer as sim_tokenizer

__all__ = [
    "TOOL",
    "LoadType",
    "RandomData",
    "SharedPrefixData",
    "Stage",
    "StageResult",
    "ensure",
    "ensure_tokenizer",
    "parse_reports",
    "parse_stage",
    "run",
    "write_config",
]

Log = Callable[[str], None]
LoadType = Literal["poisson", "constant"]
Stage = tuple[float, int]
"""``(rate in requests/s, duration in whole seconds)``: inference-perf wants an integer duration."""

TOOL = "inference-perf"
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
SEED_ENV = "IGW_BENCH_SEED"
"""Read by ``tools/bench/sitecustomize.py`` in the environment: seeds the arrival timers."""

_BUILD_SCRIPT = peers.CONSTRAINTS_DIR / "build_tokenizer.py"
_MODEL_MAX_LEN = 131_072


def ensure(log: Log = print, *, timeout: float = peers.INSTALL_TIMEOUT_S) -> Path:
    """The ``bin`` directory of inference-perf's environment (installed on first use)."""
    return peers.ensure(TOOL, log, timeout=timeout)


# --------------------------------------------------------------------------------------------
# The tokenizer


def _tokenizer_spec() -> dict[str, Any]:
    return {
        "words": list(sim_tokenizer.GENERATION_WORDS),
        "pattern": sim_tokenizer._PIECE.pattern,  # the piece pattern is the contract to copy
        "model_max_length": _MODEL_MAX_LEN,
    }


def ensure_tokenizer(log: Log = print, *, timeout: float = 120.0) -> Path:
    """A Hugging Face tokenizer directory that counts like the simulator (built once, cached).

    The directory name carries a digest of the words, the piece pattern and the build script, so
    a change to any of them builds a new one.
    """
    spec = _tokenizer_spec()
    digest = hashlib.sha256(json.dumps(spec, sort_keys=True).encode() + _BUILD_SCRIPT.read_bytes()).hexdigest()
    out = peers.cache_root() / f"tokenizer-igw-sim-{digest[:12]}"
    if (out / "tokenizer.json").is_file():
        return out
    python = ensure(log) / "python"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out.name + ".", dir=out.parent))
    try:
        subprocess.run(
            [str(python), str(_BUILD_SCRIPT), str(tmp)],
            input=json.dumps(spec), text=True, capture_output=True, timeout=timeout, check=True,
            env={**os.environ, **OFFLINE_ENV},
        )  # fmt: skip
        with contextlib.suppress(OSError):  # a concurrent builder got there first: keep theirs
            tmp.rename(out)
    except subprocess.CalledProcessError as exc:
        raise RuntimeError(f"building the tokenizer failed:\n{exc.stdout}{exc.stderr}") from exc
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log(f"tokenizer: built {out}")
    return out


# --------------------------------------------------------------------------------------------
# The configuration


@dataclass(frozen=True, slots=True)
class SharedPrefixData:
    """``num_groups`` system prompts of ``system_prompt_len`` tokens, each followed by
    ``num_prompts_per_group`` different questions of ``question_len`` tokens."""

    num_groups: int
    num_prompts_per_group: int
    system_prompt_len: int
    question_len: int
    output_len: int

    def to_yaml(self, seed: int) -> dict[str, Any]:
        return {
            "type": "shared_prefix",
            "shared_prefix": {
                "num_groups": self.num_groups,
                "num_prompts_per_group": self.num_prompts_per_group,
                "system_prompt_len": self.system_prompt_len,
                "question_len": self.question_len,
                "output_len": self.output_len,
                "seed": seed,
            },
        }


@dataclass(frozen=True, slots=True)
class RandomData:
    """Prompts of random tokens (no shared prefixes); lengths drawn from normal distributions
    clamped to ``[max(1, mean - 3 sd), mean + 3 sd]`` (fixed lengths with ``sd = 0``)."""

    input_len: int
    output_len: int
    input_std_dev: float = 0.0
    output_std_dev: float = 0.0

    def to_yaml(self, total_count: int) -> dict[str, Any]:
        def dist(mean: int, sd: float) -> dict[str, Any]:
            spread = math.ceil(3 * sd)
            return {
                "min": max(1, mean - spread),
                "max": mean + spread,
                "mean": mean,
                "std_dev": sd,
                "total_count": total_count,
            }

        return {
            "type": "random",
            "input_distribution": dist(self.input_len, self.input_std_dev),
            "output_distribution": dist(self.output_len, self.output_std_dev),
        }


def config_dict(
    *,
    base_url: str,
    model_name: str,
    tokenizer_dir: Path,
    data: SharedPrefixData | RandomData,
    stages: Sequence[Stage],
    report_dir: Path,
    load_type: LoadType = "poisson",
    seed: int = 0,
    num_workers: int = 2,
    worker_max_concurrency: int = 100,
    request_timeout: float | None = 60.0,
    stage_interval: float = 1.0,
    ignore_eos: bool = True,
    per_request: bool = False,
) -> dict[str, Any]:
    """The inference-perf configuration as a dict (see :func:`write_config`)."""
    if not stages:
        raise ValueError("at least one stage is needed")
    for rate, duration in stages:
        if rate <= 0 or duration <= 0 or int(duration) != duration:
            raise ValueError(f"a stage needs a positive rate and a positive whole duration, not {(rate, duration)}")
    if isinstance(data, RandomData):
        # One length per request; inference-perf stops at the end of the list.
        expected = sum(rate * duration for rate, duration in stages)
        data_yaml = data.to_yaml(total_count=int(expected * 2) + 100)
    else:
        data_yaml = data.to_yaml(seed)
    load: dict[str, Any] = {
        "type": load_type,
        "stages": [{"rate": float(rate), "duration": int(duration)} for rate, duration in stages],
        "interval": stage_interval,
        "num_workers": num_workers,
        "worker_max_concurrency": worker_max_concurrency,
        "base_seed": seed,
    }
    if request_timeout is not None:
        load["request_timeout"] = request_timeout
    return {
        "api": {"type": "completion", "streaming": True},
        "server": {"type": "vllm", "model_name": model_name, "base_url": base_url, "ignore_eos": ignore_eos},
        "tokenizer": {"pretrained_model_name_or_path": str(tokenizer_dir)},
        "data": data_yaml,
        "load": load,
        "report": {"request_lifecycle": {"summary": True, "per_stage": True, "per_request": per_request}},
        "storage": {"local_storage": {"path": str(report_dir)}},
    }


def write_config(path: Path, **kwargs: Any) -> Path:
    """Write the YAML of :func:`config_dict` ``(**kwargs)`` to ``path``; return ``path``."""
    config = config_dict(**kwargs)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


# --------------------------------------------------------------------------------------------
# A run


async def run(
    config_path: Path,
    log: Log = print,
    timeout: float = 300.0,
    *,
    seed: int = 0,
    log_path: Path | None = None,
) -> Path:
    """Run inference-perf on ``config_path``; return its report directory.

    The process (and its worker processes: it runs in its own process group) is killed after
    ``timeout`` seconds (TimeoutError). RuntimeError with the output's tail if it fails or
    writes no per-stage report. ``seed`` goes to ``$IGW_BENCH_SEED`` (the arrival timers); the
    data and the workers follow ``load.base_seed`` of the configuration.
    """
    config = yaml.safe_load(await asyncio.to_thread(config_path.read_text))
    report_dir = Path(config["storage"]["local_storage"]["path"])
    bin_dir = await asyncio.to_thread(ensure, log)
    env = [f"{k}={v}" for k, v in {**OFFLINE_ENV, SEED_ENV: str(seed)}.items()]
    # setsid: a process group of its own, so a stop reaches the worker processes too.
    argv = ["setsid", "env", *env, str(bin_dir / "inference-perf"), "-c", str(config_path)]
    child = Child(TOOL, argv, log_path or config_path.with_suffix(".log"))
    log(f"{TOOL}: running {config_path} (report: {report_dir})")
    child.spawn()
    proc = child.proc
    assert proc is not None

    async def exited() -> bool:
        return proc.poll() is not None

    try:
        await child.wait_until(exited, timeout=timeout, what="run to finish")
    finally:
        await _stop_group(child)
    if proc.returncode != 0:
        raise RuntimeError(f"{TOOL} exited with status {proc.returncode}:\n{child.tail()}")
    if not await asyncio.to_thread(_has_stage_reports, report_dir):
        raise RuntimeError(f"{TOOL} wrote no per-stage report into {report_dir}:\n{child.tail()}")
    return report_dir


def _has_stage_reports(report_dir: Path) -> bool:
    return any(report_dir.glob("stage_*_lifecycle_metrics.json"))


async def _stop_group(child: Child, grace: float = 10.0) -> None:
    """SIGTERM the child's process group, SIGKILL what is left after ``grace`` seconds."""
    proc = child.proc
    if proc is None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        await asyncio.to_thread(proc.wait, grace)
    except subprocess.TimeoutExpired:
        pass
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    await child.stop()


# --------------------------------------------------------------------------------------------
# Reports


class StageResult(TypedDict):
    """One stage of a run. Latencies are in seconds, None when the stage has no sample of them;
    token counts are the server's (``usage``), summed over the stage's successful requests."""

    stage: int
    rate: float
    """The requested rate (requests/s)."""
    achieved_rate: float
    """Requests sent per second of the stage's send window."""
    requests: int
    """Successes plus failures."""
    failures: int
    output_tokens_per_s: float
    requests_per_s: float
    """Successful requests per second."""
    ttft_p50: float | None
    ttft_p90: float | None
    ttft_p99: float | None
    itl_p50: float | None
    itl_p90: float | None
    e2e_p50: float | None
    e2e_p90: float | None
    e2e_p99: float | None
    cached_prompt_tokens: float
    prompt_tokens: float
    token_count_mismatches: int
    """Responses whose re-tokenized text did not count as many tokens as ``usage`` said."""


_STAGE_FILE = re.compile(r"stage_(\d+)_lifecycle_metrics\.json")


def parse_reports(report_dir: Path) -> list[StageResult]:
    """The per-stage lifecycle reports of a run (``stage_N_lifecycle_metrics.json``), in stage
    order. ValueError if there is none."""
    found = sorted((int(m.group(1)), path) for path in report_dir.iterdir() if (m := _STAGE_FILE.fullmatch(path.name)))
    if not found:
        raise ValueError(f"no stage_N_lifecycle_metrics.json in {report_dir}")
    return [parse_stage(json.loads(path.read_text()), stage) for stage, path in found]


def parse_stage(report: dict[str, Any], stage: int) -> StageResult:
    """One ``stage_N_lifecycle_metrics.json`` (already decoded) as a :class:`StageResult`."""
    load = _dict(report, "load_summary")
    ok = _dict(report, "successes")
    failed = _dict(report, "failures")
    latency = _dict(ok, "latency")
    throughput = _dict(ok, "throughput")
    prompt = _dict(ok, "prompt_tokens")

    def pct(metric: str, key: str) -> float | None:
        value = _dict(latency, metric).get(key)
        return float(value) if isinstance(value, int | float) else None

    successes = int(ok.get("count") or 0)
    failures = int(failed.get("count") or 0)
    return StageResult(
        stage=stage,
        rate=float(load.get("requested_rate") or 0.0),
        achieved_rate=float(load.get("achieved_rate") or 0.0),
        requests=successes + failures,
        failures=failures,
        output_tokens_per_s=float(throughput.get("output_tokens_per_sec") or 0.0),
        requests_per_s=float(throughput.get("requests_per_sec") or 0.0),
        ttft_p50=pct("time_to_first_token", "median"),
        ttft_p90=pct("time_to_first_token", "p90"),
        ttft_p99=pct("time_to_first_token", "p99"),
        itl_p50=pct("inter_token_latency", "median"),
        itl_p90=pct("inter_token_latency", "p90"),
        e2e_p50=pct("request_latency", "median"),
        e2e_p90=pct("request_latency", "p90"),
        e2e_p99=pct("request_latency", "p99"),
        cached_prompt_tokens=float(prompt.get("cached") or 0.0),
        prompt_tokens=float(prompt.get("total") or 0.0),
        token_count_mismatches=int(ok.get("token_count_mismatches") or 0),
    )


def _dict(parent: dict[str, Any], key: str) -> dict[str, Any]:
    """``parent[key]`` when it is an object, else ``{}`` (a stage without successes has nulls)."""
    value = parent.get(key)
    return value if isinstance(value, dict) else {}
