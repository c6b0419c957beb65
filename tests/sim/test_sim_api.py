"""The simulator's newer HTTP surface over loopback: cached tokens, LoRA, peer routes, faults, CLI flags."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from igw_sim import tokenizer
from igw_sim.cli import main
from igw_sim.engine import EngineConfig
from igw_sim.faults import Faults
from igw_sim.fleet import SimFleet

CONFIG = EngineConfig(max_num_seqs=4, prefill_overhead_ms=1, prefill_ms_per_token=0, itl_ms=2)
PROMPT = " ".join(f"w{i}" for i in range(40))  # 40 tokens: 2 full blocks of 16


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as client:
        yield client


async def _post(session: aiohttp.ClientSession, url: str, body: dict[str, Any]) -> tuple[int, Any]:
    async with session.post(url, json=body) as r:
        ctype = r.headers.get("Content-Type", "")
        return r.status, await (r.json() if ctype.startswith("application/json") else r.text())


async def _get(session: aiohttp.ClientSession, url: str) -> tuple[int, Any]:
    async with session.get(url) as r:
        ctype = r.headers.get("Content-Type", "")
        return r.status, await (r.json() if ctype.startswith("application/json") else r.text())


async def _eventually(predicate: Any, timeout: float = 2.0) -> None:
    deadline = time.monotonic() + timeout
    while not await predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)


async def test_repeated_prompts_report_cached_tokens(session: aiohttp.ClientSession) -> None:
    async with SimFleet(ports=[0], engine=CONFIG) as fleet:
        url = f"http://{fleet.addresses[0]}/v1/completions"
        _, cold = await _post(session, url, {"prompt": PROMPT, "max_tokens": 2})
        assert cold["usage"]["prompt_tokens_details"] == {"cached_tokens": 0}
        body = {
            "prompt": PROMPT,
            "max_tokens": 3,
            "stream": True,
            "stream_options": {"include_usage": True, "continuous_usage_stats": True},
        }
        async with session.post(url, json=body) as r:
            lines = [line async for line in r.content if line.startswith(b"data: {")]
        chunks = [orjson.loads(line[6:]) for line in lines]
        assert [c["usage"]["completion_tokens"] for c in chunks] == [1, 2, 3, 3]
        assert all(c["usage"]["prompt_tokens_details"] == {"cached_tokens": 32} for c in chunks)
        assert chunks[-1]["choices"] == []
        chat = {"messages": [{"role": "user", "content": PROMPT}], "max_tokens": 1}
        chat_url = f"http://{fleet.addresses[0]}/v1/chat/completions"
        await _post(session, chat_url, chat)
        _, warm_chat = await _post(session, chat_url, chat)
        n = tokenizer.count(tokenizer.render_chat(chat["messages"]))  # type: ignore[arg-type]
        assert warm_chat["usage"]["prompt_tokens"] == n
        assert warm_chat["usage"]["prompt_tokens_details"]["cached_tokens"] == (n - 1) // 16 * 16


async def test_lora_adapters_load_list_serve_and_unload(session: aiohttp.ClientSession) -> None:
    cfg = CONFIG.replace(lora_modules=(("static", "/adapters/static"),), max_loras=2)
    async with SimFleet(ports=[0], engine=cfg, models=["base"]) as fleet:
        base = f"http://{fleet.addresses[0]}"
        status, text = await _post(session, base + "/v1/load_lora_adapter", {"lora_name": "dyn", "lora_path": "/d"})
        assert (status, text) == (200, "Success: LoRA adapter 'dyn' added successfully.")
        status, err = await _post(session, base + "/v1/load_lora_adapter", {"lora_name": "dyn", "lora_path": "/d"})
        assert status == 400
        assert "already been loaded" in err["error"]["message"]
        _, models = await _get(session, base + "/v1/models")
        assert [(m["id"], m["root"], m["parent"]) for m in models["data"]] == [
            ("base", "base", None),
            ("static", "/adapters/static", "base"),
            ("dyn", "/d", "base"),
        ]
        status, done = await _post(session, base + "/v1/completions", {"model": "dyn", "prompt": "hi", "max_tokens": 2})
        assert (status, done["model"]) == (200, "dyn")
        _, text = await _get(session, base + "/metrics")
        families = {f.name: f for f in text_string_to_metric_families(text)}
        assert {s.labels["max_lora"] for s in families["vllm:lora_requests_info"].samples} == {"2"}
        _, state = await _get(session, base + "/sim/engine")
        assert state["resident_loras"] == ["dyn"]
        status, _ = await _post(session, base + "/v1/unload_lora_adapter", {"lora_name": "dyn"})
        assert status == 200
        status, err = await _post(session, base + "/v1/unload_lora_adapter", {"lora_name": "dyn"})
        assert status == 404
        status, _ = await _post(session, base + "/v1/completions", {"model": "dyn", "prompt": "hi"})
        assert status == 404


async def test_routes_that_peer_routers_call(session: aiohttp.ClientSession) -> None:
    async with SimFleet(ports=[0], engine=CONFIG, tokenizer_path="/tok") as fleet:
        base = f"http://{fleet.addresses[0]}"
        for path in ("/server_info", "/get_server_info"):
            _, info = await _get(session, base + path)
            assert (info["model_path"], info["tokenizer_path"]) == ("/tok", "/tok")
            assert info["max_total_num_tokens"] == CONFIG.kv_blocks * CONFIG.block_size
        for path in ("/model_info", "/get_model_info"):
            _, info = await _get(session, base + path)
            assert info["is_generation"] is True
            assert info["tokenizer_path"] == "/tok"
        _, load = await _get(session, base + "/get_load")
        assert load == [{"dp_rank": 0, "num_reqs": 0, "num_waiting_reqs": 0, "num_tokens": 0}]
        _, rendered = await _post(session, base + "/v1/completions/render", {"prompt": "a b c", "max_tokens": 3})
        assert rendered[0]["token_ids"] == tokenizer.encode("a b c")
        assert rendered[0]["request_id"].startswith("cmpl-")
        messages = [{"role": "user", "content": "a b c"}]
        _, rendered_chat = await _post(session, base + "/v1/chat/completions/render", {"messages": messages})
        assert rendered_chat["token_ids"] == tokenizer.encode(tokenizer.render_chat(messages))
        _, tokenized = await _post(session, base + "/tokenize", {"messages": messages})
        assert tokenized["tokens"] == rendered_chat["token_ids"]


async def test_sglang_metrics_style(session: aiohttp.ClientSession) -> None:
    async with SimFleet(ports=[0], engine=CONFIG, metrics_style="sglang") as fleet:
        _, text = await _get(session, f"http://{fleet.addresses[0]}/metrics")
    names = {f.name for f in text_string_to_metric_families(text)}
    assert {"sglang:num_running_reqs", "sglang:num_queue_reqs", "sglang:token_usage"} <= names
    assert "sglang:cache_config_info" in names
    assert not any(name.startswith("vllm:") for name in names)


async def test_injected_errors_are_reproducible_and_changeable(session: aiohttp.ClientSession) -> None:
    faults = Faults(error_rate=0.5, error_kinds=("rate_limit", "server_error"), seed=7)
    async with SimFleet(ports=[0], engine=CONFIG, faults=faults) as fleet:
        base = f"http://{fleet.addresses[0]}"
        statuses = [
            (await _post(session, base + "/v1/completions", {"prompt": "x", "max_tokens": 1}))[0] for _ in range(20)
        ]
        assert set(statuses) == {200, 429, 500}
        expected = Faults(error_rate=0.5, error_kinds=("rate_limit", "server_error"), seed=7)
        assert statuses == [(e[0] if (e := expected.draw_error()) else 200) for _ in range(20)]
        status, body = await _post(session, base + "/sim/faults", {"error_rate": 0, "unhealthy": True})
        assert (status, body["error_rate"], body["unhealthy"]) == (200, 0.0, True)
        assert (await _get(session, base + "/health"))[0] == 503
        assert (await _post(session, base + "/v1/completions", {"prompt": "x", "max_tokens": 1}))[0] == 200
        status, err = await _post(session, base + "/sim/faults", {"error_kinds": ["nope"]})
        assert status == 400
        assert "unknown error kinds" in err["error"]["message"]


async def test_stall_then_crash(session: aiohttp.ClientSession) -> None:
    async with SimFleet(ports=[0, 0], engine=CONFIG) as fleet:
        base = f"http://{fleet.addresses[0]}"
        await _post(session, base + "/sim/faults", {"stall_s": 0.15})
        start = time.monotonic()
        status, _ = await _post(session, base + "/v1/completions", {"prompt": "x", "max_tokens": 1})
        assert status == 200
        assert time.monotonic() - start >= 0.14

        stream = await session.post(
            base + "/v1/completions", json={"prompt": "x", "max_tokens": 10_000, "stream": True}
        )
        await stream.content.readline()
        status, body = await _post(session, base + "/sim/faults", {"crash": True})
        assert (status, body["crashed"]) == (200, True)
        with pytest.raises(aiohttp.ClientPayloadError):
            async for _ in stream.content:
                pass
        stream.release()

        async def refused() -> bool:
            try:
                async with session.get(base + "/health"):
                    return False
            except aiohttp.ClientConnectionError:
                return True

        await _eventually(refused)
        assert fleet.engines[0].running == 0
        other = f"http://{fleet.addresses[1]}/health"
        assert (await _get(session, other))[0] == 200  # the other endpoint is unaffected


def test_cli_accepts_profiles_lora_kv_events_and_faults(capsys: pytest.CaptureFixture[str]) -> None:
    argv = [
        "--ports", "0", "--duration", "0.1", "--profile", "h100-llama3-8b", "--kv-blocks", "256",
        "--time-dilation", "2", "--lora-modules", "a=/a", "b=/b", "--max-loras", "2",
        "--kv-events-endpoint", "tcp://127.0.0.1:*", "--kv-events-replay-endpoint", "tcp://127.0.0.1:*",
        "--kv-events-format", "array", "--metrics-style", "vllm", "--error-rate", "0.1",
        "--error-kinds", "rate_limit,server_error", "--hash-algo", "sha256_cbor", "--hash-seed", "0",
    ]  # fmt: skip
    assert main(argv) == 0
    assert capsys.readouterr().out.splitlines()[-1] == "igw-sim: ready"


@pytest.mark.parametrize(
    "argv",
    [
        ["--profile", "h100-llama3-8b", "--itl-ms", "5"],
        ["--profile", "nope"],
        ["--lora-modules", "no-path"],
        ["--error-kinds", "bogus"],
        ["--kv-events-replay-endpoint", "tcp://127.0.0.1:1"],
    ],
    ids=["profile-and-simple-knobs", "unknown-profile", "lora-syntax", "error-kind", "replay-alone"],
)
def test_cli_rejects_bad_combinations(argv: list[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--ports", "0", "--duration", "0", *argv])
    assert exc.value.code == 2
