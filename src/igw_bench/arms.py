"""The arms of a comparison: what stands between the load client and the model servers.

An arm is named by a spec string:

``igw`` / ``igw:FILE``
    ``igw run`` (Envoy + the Endpoint Picker over ext_proc) with its default EndpointPickerConfig, or
    the one in ``FILE`` (the arm is then called ``igw:<file stem>``).
``envoy-rr``, ``envoy-lr``, ``random``
    Envoy alone with its own ROUND_ROBIN, LEAST_REQUEST or RANDOM balancing.
``sglang-router:POLICY``, ``vllm-router:POLICY``
    The peer routers (:mod:`igw_bench.peers`), each in its own virtual environment.

:func:`start_arm` starts one in front of a fleet and returns a :class:`RunningArm`: its base URL, the
processes whose CPU and memory count as the gateway's, and a way to stop them.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

from igw_bench.envoy_alone import envoy_alone_bootstrap, envoy_path
from igw_bench.procs import HOST, Child, free_ports
from igw_bench.sysstats import child_pids

__all__ = ["ENVOY_ARMS", "PEER_KINDS", "ArmSpec", "RunningArm", "parse_arm", "start_arm"]

GATEWAY_READY = "igw: gateway ready"
ENVOY_ARMS = {"envoy-rr": "ROUND_ROBIN", "envoy-lr": "LEAST_REQUEST", "random": "RANDOM"}
PEER_KINDS = ("sglang-router", "vllm-router")
SCRAPE_INTERVAL_S = 0.05
"""igw's metrics refresh interval in simulated seconds (the reference's 50 ms), scaled by the dilation."""


@dataclass(frozen=True, slots=True)
class ArmSpec:
    name: str
    kind: str
    """``igw``, ``envoy`` or a peer kind."""
    option: str = ""
    """The Envoy policy, the peer's policy, or igw's configuration file ('' = default)."""

    def describe(self) -> str:
        if self.kind == "igw":
            return f"igw run, EndpointPickerConfig {self.option or 'default (queue 2, kv-cache 2, prefix 3)'}"
        if self.kind == "envoy":
            return f"Envoy alone, lb_policy {self.option}"
        return f"{self.kind} --policy {self.option}"


def parse_arm(spec: str) -> ArmSpec:
    """Parse an arm spec; ``ValueError`` with the accepted forms when it is not one."""
    spec = spec.strip()
    if spec == "igw":
        return ArmSpec("igw", "igw")
    if spec.startswith("igw:"):
        path = Path(spec[4:])
        if not path.is_file():
            raise ValueError(f"arm {spec!r}: no configuration file {path}")
        return ArmSpec(f"igw:{path.stem}", "igw", str(path))
    if spec in ENVOY_ARMS:
        return ArmSpec(spec, "envoy", ENVOY_ARMS[spec])
    kind, _, policy = spec.partition(":")
    if kind in PEER_KINDS:
        from igw_bench.peers import POLICIES

        allowed = POLICIES[kind]
        if policy not in allowed:
            raise ValueError(f"arm {spec!r}: {kind} policies are {', '.join(allowed)}")
        return ArmSpec(spec, kind, policy)
    raise ValueError(
        f"unknown arm {spec!r}: use igw, igw:FILE, {', '.join(ENVOY_ARMS)}, "
        + ", ".join(f"{k}:POLICY" for k in PEER_KINDS)
    )


@dataclass(slots=True)
class RunningArm:
    spec: ArmSpec
    base_url: str
    children: list[Child]
    pids: dict[str, int] = field(default_factory=dict)
    """The gateway's processes (CPU and RSS are summed over them)."""
    version: str = ""

    async def stop(self) -> None:
        for child in reversed(self.children):
            await child.stop()


async def start_arm(
    spec: ArmSpec, endpoints: list[str], workdir: Path, *, dilation: float, model: str, timeout: float = 120.0
) -> RunningArm:
    """Start ``spec`` in front of ``endpoints`` (logs go to the existing ``workdir``); the caller stops it."""
    if spec.kind == "igw":
        return await _start_igw(spec, endpoints, workdir, dilation=dilation, model=model, timeout=timeout)
    if spec.kind == "envoy":
        return await _start_envoy(spec, endpoints, workdir, timeout=timeout)
    from igw_bench.peers import start_peer_arm

    children, base_url, pids, version = await start_peer_arm(spec.kind, spec.option, endpoints, workdir, timeout)
    return RunningArm(spec, base_url, children, pids, version)


async def _start_igw(
    spec: ArmSpec, endpoints: list[str], workdir: Path, *, dilation: float, model: str, timeout: float
) -> RunningArm:
    listen, admin, grpc, health, metrics = free_ports(5)
    argv = [
        sys.executable, "-m", "igw", "run",
        *(arg for e in endpoints for arg in ("--endpoint", e)), "--model", model,
        "--listen", f"{HOST}:{listen}", "--admin-port", str(admin), "--grpc-port", str(grpc),
        "--grpc-health-port", str(health), "--metrics-port", str(metrics),
        "--refresh-metrics-interval", f"{SCRAPE_INTERVAL_S * dilation:g}",
    ]  # fmt: skip
    if spec.option:
        argv += ["--config-file", spec.option]
    child = Child(f"arm {spec.name}", argv, workdir / f"{_slug(spec.name)}.log")
    try:
        await child.start(GATEWAY_READY, timeout=timeout)
    except BaseException:
        await child.stop()
        raise
    pids = {"epp": child.pid}
    envoys = child_pids(child.pid, "envoy")
    if envoys:
        pids["envoy"] = envoys[0]
    return RunningArm(spec, f"http://{HOST}:{listen}", [child], pids)


async def _start_envoy(spec: ArmSpec, endpoints: list[str], workdir: Path, *, timeout: float) -> RunningArm:
    listen, admin = free_ports(2)
    config = workdir / f"{_slug(spec.name)}-envoy.json"
    config.write_text(json.dumps(envoy_alone_bootstrap(listen, admin, endpoints, lb_policy=spec.option), indent=2))
    argv = [envoy_path(), "-c", str(config), "--disable-hot-restart", "--concurrency", "1", "-l", "warning"]
    child = Child(f"arm {spec.name}", argv, workdir / f"{_slug(spec.name)}.log")
    child.spawn()
    try:
        await child.wait_http_ok(f"http://{HOST}:{admin}/ready", timeout=timeout)
    except BaseException:
        await child.stop()
        raise
    return RunningArm(spec, f"http://{HOST}:{listen}", [child], {"envoy": child.pid})


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "-" for c in name)
