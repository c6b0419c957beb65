"""``igw bench overhead`` with the peer routers as extra arms: installing and starting them (or
leaving them out), and one end-to-end run with both when they are installed."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import orjson
import pytest

from igw_bench import overhead, peers
from igw_bench.overhead import PEER_KINDS, OverheadOptions, format_table, run_overhead


def _no_install(name: str, log: Callable[[str], None] = print, *, timeout: float = 0) -> Path:
    return peers.bin_dir(name)


def _failing_install(name: str, log: Callable[[str], None] = print, *, timeout: float = 0) -> Path:
    raise RuntimeError(f"{name}: pip install failed with status 1 (log: x)\nERROR: no network")


async def test_a_peer_that_cannot_install_is_left_out_with_a_warning(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(peers, "ensure", lambda name, log: _failing_install(name) if name == "vllm-router" else None)
    warnings: list[str] = []
    logged: list[str] = []

    ready = await overhead._install_peers(OverheadOptions(), warnings, logged.append)

    assert ready == ["sglang-router"]
    assert warnings == [
        "vllm-router: left out, it could not be installed: vllm-router: pip install failed with status 1 (log: x)"
    ]
    assert logged == [f"warning: {warnings[0]}"]


async def test_a_named_peer_that_cannot_install_fails_the_run(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(peers, "ensure", _failing_install)
    with pytest.raises(RuntimeError, match="sglang-router: cannot install"):
        await overhead._install_peers(OverheadOptions(peers=PEER_KINDS, peers_required=True), [], print)


def _start_fails(kind: str) -> Callable[..., Any]:
    real = peers.start_peer

    async def start(peer: peers.Peer, workers: Sequence[str], log_dir: Path, **kwargs: Any) -> peers.PeerProcess:
        assert peer.policy == "round_robin"
        if peer.kind == kind:
            raise TimeoutError(f"{peer.name}: http://127.0.0.1:1/workers not ready after 60s:\nlog tail")
        return await real(peer, workers, log_dir, **kwargs)

    return start


@pytest.mark.envoy
@pytest.mark.timeout(90)
async def test_a_peer_that_does_not_start_is_left_out_and_the_rest_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(peers, "ensure", _no_install)
    monkeypatch.setattr(peers, "start_peer", _start_fails("vllm-router"))
    opts = OverheadOptions(duration_s=0.2, warmup_s=0.1, concurrency_1k=2, concurrency_200k=1, peers=("vllm-router",))

    report = await run_overhead(opts, log=lambda _: None)

    assert report["arm_order"] == ["direct", "envoy", "igw"]
    assert report["warnings"][0] == (
        "vllm-router: left out, it did not start: vllm-router/round_robin: http://127.0.0.1:1/workers not ready after 60s:"
    )
    assert set(report["sizes"]["200k"]["by_concurrency"]) == {"1"}


@pytest.mark.envoy
@pytest.mark.timeout(90)
async def test_a_named_peer_that_does_not_start_fails_the_run(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(peers, "ensure", _no_install)
    monkeypatch.setattr(peers, "start_peer", _start_fails("sglang-router"))
    opts = OverheadOptions(duration_s=0.2, warmup_s=0.1, peers=("sglang-router",), peers_required=True)
    with pytest.raises(TimeoutError, match="sglang-router/round_robin"):
        await run_overhead(opts, log=lambda _: None)


@pytest.mark.envoy
@pytest.mark.timeout(120)
@pytest.mark.skipif(
    not all(peers.installed(kind) for kind in PEER_KINDS),
    reason="the peer routers are not installed (python -m igw_bench.peers install sglang-router vllm-router)",
)
def test_overhead_with_both_peers(tmp_path: Path) -> None:
    out = tmp_path / "results"
    proc = subprocess.run(
        [sys.executable, "-m", "igw", "bench", "overhead", "--duration", "0.4", "--warmup", "0.2", "--out", str(out),
         "--peers", "sglang-router,vllm-router"],
        capture_output=True, text=True, timeout=110, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    (path,) = out.glob("overhead-*.json")
    report = orjson.loads(path.read_bytes())
    assert report["arm_order"] == ["direct", "envoy", "igw", "sglang-router", "vllm-router"]
    assert report["arms"]["sglang-router"]["version"] == "sglang-router 0.3.2"
    assert report["arms"]["vllm-router"]["router_processes"] == ["router"]
    assert report["warnings"] == []
    for size in report["sizes"].values():
        for step in size["by_concurrency"].values():
            assert set(step["igw_added_ms"]) == {"direct", "envoy", "sglang-router", "vllm-router"}
            for kind in PEER_KINDS:
                arm = step["arms"][kind]
                assert arm["rps"] > 0
                assert arm["errors"] == 0
                assert arm["router_cpu_us_per_req"] > 0
    assert "| 1 KB (1,024 B) | 32 | vllm-router |" in proc.stdout
    assert "- sglang-router: sglang-router 0.3.2, --policy round_robin" in proc.stdout
    assert all(line in proc.stdout for line in format_table(report).splitlines() if line.startswith("|"))
