"""Peer routers: command lines, environments, readiness; one live run per kind when installed."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from igw_bench import peers
from igw_bench.procs import HOST, Child, free_ports

WORKERS = ["http://127.0.0.1:18001", "127.0.0.1:18002"]


def _after(argv: list[str], flag: str) -> str:
    return argv[argv.index(flag) + 1]


# --------------------------------------------------------------------------------------------
# Command lines


@pytest.mark.parametrize("kind", ["sglang-router", "vllm-router"])
def test_argv_binds_both_listeners_to_loopback(kind: peers.PeerKind) -> None:
    argv = peers.Peer(kind, "round_robin").argv(30000, 29000, WORKERS, None)
    assert _after(argv, "--host") == "127.0.0.1"
    assert _after(argv, "--port") == "30000"
    assert _after(argv, "--prometheus-host") == "127.0.0.1"
    assert _after(argv, "--prometheus-port") == "29000"
    assert _after(argv, "--policy") == "round_robin"
    assert not any("0.0.0.0" in arg for arg in argv)
    start = argv.index("--worker-urls") + 1
    assert argv[start : start + 2] == ["http://127.0.0.1:18001", "http://127.0.0.1:18002"]
    assert int(_after(argv, "--health-check-interval-secs")) <= 30


def test_sglang_argv_runs_its_module_with_a_local_tokenizer(tmp_path: Path) -> None:
    argv = peers.Peer("sglang-router", "cache_aware").argv(1, 2, WORKERS, tmp_path)
    assert argv[:3] == [str(peers.bin_dir("sglang-router") / "python"), "-m", "sglang_router.launch_router"]
    assert _after(argv, "--tokenizer-path") == str(tmp_path)
    assert _after(argv, "--log-level") == "warn"


def test_vllm_argv_quiets_its_logs_through_rust_log(tmp_path: Path) -> None:
    argv = peers.Peer("vllm-router", "consistent_hash").argv(1, 2, WORKERS, tmp_path)
    assert argv[:3] == ["env", "RUST_LOG=warn", str(peers.bin_dir("vllm-router") / "vllm-router")]
    assert "--tokenizer-path" not in argv  # vllm-router has no such flag
    assert _after(argv, "--log-level") == "warning"


def test_extra_args_come_last() -> None:
    argv = peers.Peer("vllm-router", "cache_aware", ("--balance-abs-threshold", "4")).argv(1, 2, WORKERS, None)
    assert argv[-2:] == ["--balance-abs-threshold", "4"]


@pytest.mark.parametrize(
    ("kind", "policy"),
    [("sglang-router", "consistent_hash"), ("vllm-router", "kv_aware"), ("nginx", "round_robin")],
)
def test_unknown_kinds_and_policies_are_rejected(kind: str, policy: str) -> None:
    with pytest.raises(ValueError, match="known"):
        peers.Peer(kind, policy)  # type: ignore[arg-type]


def test_power_of_two_needs_two_workers_and_every_router_one() -> None:
    with pytest.raises(ValueError, match="2 workers"):
        peers.Peer("sglang-router", "power_of_two").argv(1, 2, WORKERS[:1], None)
    with pytest.raises(ValueError, match="at least one worker"):
        peers.Peer("vllm-router", "random").argv(1, 2, [], None)


def test_policies_and_versions() -> None:
    assert set(peers.POLICIES) == {"sglang-router", "vllm-router"}
    assert "consistent_hash" in peers.POLICIES["vllm-router"]
    assert peers.Peer("sglang-router", "random").version == "0.3.2"
    assert peers.Peer("vllm-router", "random").version == "0.1.17"


# --------------------------------------------------------------------------------------------
# Environments


def test_cache_root_follows_the_environment_variable(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("IGW_BENCH_CACHE", str(tmp_path))
    assert peers.venv_dir("vllm-router") == tmp_path / "venv-vllm-router"
    assert peers.bin_dir("inference-perf") == tmp_path / "venv-inference-perf" / "bin"
    assert not peers.installed("vllm-router")
    monkeypatch.delenv("IGW_BENCH_CACHE")
    assert peers.cache_root() == Path.home() / ".cache" / "igw-bench"


def test_installed_compares_the_stamp_with_the_pin(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("IGW_BENCH_CACHE", str(tmp_path))
    venv = peers.venv_dir("sglang-router")
    venv.mkdir()
    (venv / ".igw-bench-stamp").write_text("sglang-router==0.3.1\n")
    assert not peers.installed("sglang-router")
    (venv / ".igw-bench-stamp").write_text(peers._stamp_text(peers.VENVS["sglang-router"]))
    assert peers.installed("sglang-router")


def test_unknown_tool_is_an_error() -> None:
    with pytest.raises(ValueError, match="unknown tool"):
        peers.venv_dir("guidellm")


@pytest.mark.parametrize("name", sorted(peers.VENVS))
def test_every_environment_has_a_lock_file_holding_its_pin(name: str) -> None:
    spec = peers.VENVS[name]
    lines = peers.constraints_path(name).read_text().splitlines()
    assert spec.requirement in lines
    assert not any(line.startswith(("pip==", "-e ")) for line in lines)


def test_site_files_exist() -> None:
    for spec in peers.VENVS.values():
        for name in spec.site_files:
            assert (peers.CONSTRAINTS_DIR / name).is_file()


def test_find_python_honours_the_override(monkeypatch: pytest.MonkeyPatch) -> None:
    version = f"{sys.version_info[0]}.{sys.version_info[1]}"
    monkeypatch.setenv(f"IGW_BENCH_PYTHON{version.replace('.', '')}", sys.executable)
    assert peers.find_python(version) == sys.executable


def test_find_python_explains_a_missing_interpreter(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PYENV_ROOT", str(tmp_path))
    monkeypatch.setenv("HOME", str(tmp_path))
    with pytest.raises(RuntimeError, match=r"no Python 2\.9 .*IGW_BENCH_PYTHON29"):
        peers.find_python("2.9")


def test_a_slow_install_step_is_killed_at_its_deadline(tmp_path: Path) -> None:
    log: list[str] = []
    started = time.monotonic()
    with pytest.raises(TimeoutError, match="not done in time"):
        peers._run_logged(
            [sys.executable, "-c", "import time; time.sleep(30)"],
            tmp_path / "x.log",
            time.monotonic() + 0.5,
            "x",
            log.append,
        )
    assert time.monotonic() - started < 5


def test_a_failed_install_step_shows_its_output(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="no such package"):
        peers._run_logged(
            [sys.executable, "-c", "import sys; print('no such package'); sys.exit(3)"],
            tmp_path / "x.log", time.monotonic() + 30, "x", lambda _: None,
        )  # fmt: skip


def test_the_file_lock_excludes_a_second_holder(tmp_path: Path) -> None:
    lock = tmp_path / "x.lock"
    holder = subprocess.Popen(
        [sys.executable, "-c", f"import fcntl,time; f=open({str(lock)!r},'a'); fcntl.flock(f, fcntl.LOCK_EX); print('held', flush=True); time.sleep(30)"],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline().strip() == "held"
        messages: list[str] = []
        with pytest.raises(TimeoutError, match="still locked"), peers._file_lock(lock, 0.6, messages.append):
            pass
        assert messages
        assert "waiting" in messages[0]
    finally:
        holder.kill()
        holder.wait()
        if holder.stdout is not None:
            holder.stdout.close()
    with peers._file_lock(lock, 1.0, lambda _: None):
        pass


# --------------------------------------------------------------------------------------------
# Readiness


async def _serve(body: object, status: int = 200) -> tuple[web.AppRunner, str]:
    async def workers(_: web.Request) -> web.Response:
        return web.Response(status=status, text=json.dumps(body), content_type="application/json")

    app = web.Application()
    app.router.add_get("/workers", workers)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    (port,) = free_ports(1)
    await web.TCPSite(runner, HOST, port).start()
    return runner, f"http://{HOST}:{port}"


@pytest.mark.parametrize(
    ("body", "status", "ready"),
    [
        ({"workers": [{"url": "a", "is_healthy": True}, {"url": "b", "is_healthy": True}], "total": 2}, 200, True),
        ({"workers": [{"url": "a", "is_healthy": True}], "total": 1}, 200, False),  # sglang registering
        ({"workers": [{"url": "a", "is_healthy": True}, {"url": "b", "is_healthy": False}]}, 200, False),
        ({"workers": []}, 503, False),
        (["not", "an", "object"], 200, False),
    ],
)
async def test_workers_ready(body: object, status: int, ready: bool) -> None:
    runner, url = await _serve(body, status)
    try:
        async with aiohttp.ClientSession() as http:
            assert await peers.workers_ready(http, url, 2) is ready
    finally:
        await runner.cleanup()


async def test_workers_ready_is_false_when_nothing_listens() -> None:
    (port,) = free_ports(1)
    async with aiohttp.ClientSession() as http:
        assert not await peers.workers_ready(http, f"http://{HOST}:{port}", 1)


# --------------------------------------------------------------------------------------------
# Live: each router in front of two simulated vLLM servers (only when its environment exists)


async def _completion(http: aiohttp.ClientSession, base_url: str, i: int) -> tuple[str, int]:
    body = {
        "model": "sim-model",
        "prompt": f"request {i} about the weather",
        "max_tokens": 3,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    async with http.post(f"{base_url}/v1/completions", json=body) as resp:
        text = await resp.text()
        assert resp.status == 200, text
        chunks = [json.loads(line[6:]) for line in text.splitlines() if line.startswith("data: {")]
        return resp.headers.get("x-igw-sim-endpoint", ""), chunks[-1]["usage"]["completion_tokens"]


@pytest.mark.timeout(90)
@pytest.mark.parametrize(
    "kind",
    [
        pytest.param(
            kind,
            marks=pytest.mark.skipif(
                not peers.installed(kind), reason=f"{kind} is not installed (python -m igw_bench.peers install {kind})"
            ),
        )
        for kind in ("sglang-router", "vllm-router")
    ],
)
async def test_live_router_spreads_streaming_completions(kind: peers.PeerKind, tmp_path: Path) -> None:
    ports = free_ports(2)
    sim = Child(
        "sim",
        [sys.executable, "-m", "igw_sim", "--ports", ",".join(map(str, ports)), "--duration", "80"],
        tmp_path / "sim.log",
    )
    try:
        await sim.start("igw-sim: ready", timeout=30)
        started = await peers.start_peer(
            peers.Peer(kind, "round_robin"), [f"{HOST}:{p}" for p in ports], tmp_path, None, log=lambda _: None
        )
        try:
            async with aiohttp.ClientSession() as http:
                results = [await _completion(http, started.base_url, i) for i in range(4)]
                async with http.get(started.metrics_url) as resp:
                    assert resp.status == 200
        finally:
            assert await started.stop() == 0
    finally:
        await sim.stop()
    # The routers pass the simulator's response headers through: round robin alternates.
    assert Counter(endpoint for endpoint, _ in results) == {f"{HOST}:{ports[0]}": 2, f"{HOST}:{ports[1]}": 2}
    assert all(tokens == 3 for _, tokens in results)
    assert started.base_url.startswith(f"http://{HOST}:")
    # Quiet at warn: no line per request (vllm-router needs RUST_LOG for that).
    assert len(started.child.tail(10_000).splitlines()) < 40


def test_cli_status_lists_every_tool(capsys: pytest.CaptureFixture[str]) -> None:
    assert peers.main(["status"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in peers.VENVS)
