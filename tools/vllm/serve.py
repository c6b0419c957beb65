"""Start, wait for and stop real vLLM CPU engines on loopback ports (stdlib only; any Python 3.11).

    # foreground: start, wait until every engine lists the model, serve until Ctrl-C / --duration, stop
    python tools/vllm/serve.py run --model-dir ~/.cache/igw-vllm/tiny-model --ports 18120,18121,18122 \\
        --kv-events-endpoint tcp://127.0.0.1:5557

    # background: start + wait, write <run-dir>/engines.json, exit 0; later stop them
    python tools/vllm/serve.py start --run-dir /tmp/igw-vllm-run --model-dir ... --ports 18120
    python tools/vllm/serve.py stop --run-dir /tmp/igw-vllm-run

Every engine runs ``vllm serve`` (through ``vllm_cli.py``) with the flags the gateway tests rely on:
``--block-size 32`` (the CPU attention backend needs a multiple of 32), ``--num-gpu-blocks-override N``
(a small cache, so prefix evictions and preemptions happen), ``--enable-prefix-caching``,
``--prefix-caching-hash-algo sha256_cbor`` and ``PYTHONHASHSEED`` (block hashes any process can
recompute), ``--enable-prompt-tokens-details`` (``cached_tokens`` in every usage), ``--enforce-eager`` (starts in ~30 s instead of ~80 s with torch.compile), and, when
``--kv-events-endpoint`` is given, KV-cache events over ZMQ. vLLM *connects* to a concrete endpoint such
as ``tcp://127.0.0.1:5557`` (the subscriber binds it; loopback only) and uses the topic
``kv@127.0.0.1:<port>@<served name>``.

Readiness is ``GET /v1/models`` listing the served name (``/health`` alone can be answered by some other
process that holds the port); a port that is already taken is refused before anything starts. Each
engine is started in its own session, so stopping sends SIGTERM to that process group (API server,
engine core and worker), waits, then SIGKILLs what is left. All waits are bounded.

The module API (``EngineSpec``, ``start_engines``, ``wait_ready``, ``stop_engines``) is what
``validate_sim.py`` and the e2e benchmarks use.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
VLLM_HOME = Path(os.environ.get("IGW_VLLM_HOME", Path.home() / ".cache" / "igw-vllm"))
DEFAULT_PYTHON = VLLM_HOME / "venv" / "bin" / "python"
DEFAULT_MODEL_DIR = VLLM_HOME / "tiny-model"
STATE_FILE = "engines.json"


@dataclass
class EngineSpec:
    """How to run one engine; everything an e2e test needs to know about it."""

    port: int
    model_dir: str
    served_name: str = "tiny"
    host: str = "127.0.0.1"
    block_size: int = 32
    num_blocks: int = 256
    max_model_len: int = 2048
    max_num_seqs: int = 16
    max_num_batched_tokens: int | None = None
    hash_seed: str = "0"
    kv_events_endpoint: str | None = None
    kv_events_topic: str | None = None
    lora_modules: list[str] = field(default_factory=list)  # "name=path"
    max_loras: int = 2
    max_lora_rank: int = 8
    extra_args: list[str] = field(default_factory=list)

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def topic(self) -> str:
        return self.kv_events_topic or f"kv@{self.host}:{self.port}@{self.served_name}"

    def argv(self, python: str) -> list[str]:
        args = [
            python, str(HERE / "vllm_cli.py"), "serve", self.model_dir,
            "--host", self.host, "--port", str(self.port),
            "--served-model-name", self.served_name,
            "--dtype", "bfloat16",
            "--max-model-len", str(self.max_model_len),
            "--max-num-seqs", str(self.max_num_seqs),
            "--block-size", str(self.block_size),
            "--num-gpu-blocks-override", str(self.num_blocks),
            "--enable-prefix-caching",
            "--prefix-caching-hash-algo", "sha256_cbor",
            "--enforce-eager",
            "--enable-prompt-tokens-details",
        ]  # fmt: skip
        if self.max_num_batched_tokens is not None:
            args += ["--max-num-batched-tokens", str(self.max_num_batched_tokens)]
        if self.kv_events_endpoint:
            events = {
                "enable_kv_cache_events": True,
                "publisher": "zmq",
                "endpoint": self.kv_events_endpoint,
                "topic": self.topic,
            }
            args += ["--kv-events-config", json.dumps(events, separators=(",", ":"))]
        if self.lora_modules:
            args += ["--enable-lora", "--max-loras", str(self.max_loras), "--max-lora-rank", str(self.max_lora_rank)]
            args += ["--lora-modules", *self.lora_modules]
        return args + list(self.extra_args)


@dataclass
class EngineProcess:
    spec: EngineSpec
    pid: int
    log_path: str
    popen: subprocess.Popen[bytes] | None = None

    def alive(self) -> bool:
        if self.popen is not None:
            return self.popen.poll() is None
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True


def engine_env(hash_seed: str, *, runtime_lora: bool = True) -> dict[str, str]:
    """The environment of an engine: offline, CPU, one OMP thread, unpinned, caches under IGW_VLLM_HOME."""
    env = dict(os.environ)
    env.update(
        {
            "VLLM_TARGET_DEVICE": "cpu",
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            "VLLM_NO_USAGE_STATS": "1",
            "DO_NOT_TRACK": "1",
            "VLLM_CPU_KVCACHE_SPACE": "1",
            "VLLM_CPU_OMP_THREADS_BIND": "nobind",
            "OMP_NUM_THREADS": "1",
            "VLLM_CACHE_ROOT": str(VLLM_HOME / "vllm-cache"),
            "HF_HOME": str(VLLM_HOME / "hf-home"),
            "PYTHONHASHSEED": hash_seed,
            "PYTHONUNBUFFERED": "1",
            # POST /reset_prefix_cache (a benchmark empties the caches between arms)
            "VLLM_SERVER_DEV_MODE": "1",
            # uvicorn closes idle keep-alive connections after 5 s by default; a proxy that reuses one
            # just then gets a reset (reference/peers.md, later findings)
            "VLLM_HTTP_TIMEOUT_KEEP_ALIVE": "300",
        }
    )
    if runtime_lora:
        env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] = "True"
    return env


def port_is_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def free_port(host: str = "127.0.0.1") -> int:
    """A port the kernel considers free right now (racy, but fine for tests on loopback)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def start_engines(specs: Sequence[EngineSpec], *, python: str, log_dir: Path) -> list[EngineProcess]:
    """Start every engine (in its own session); raises ``RuntimeError`` when a port is taken."""
    for spec in specs:
        if spec.host not in ("127.0.0.1", "localhost", "::1"):
            raise RuntimeError(f"refusing to listen on {spec.host}: loopback only")
        if not port_is_free(spec.host, spec.port):
            raise RuntimeError(f"port {spec.host}:{spec.port} is already in use")
    log_dir.mkdir(parents=True, exist_ok=True)
    procs: list[EngineProcess] = []
    try:
        for spec in specs:
            log_path = log_dir / f"vllm-{spec.port}.log"
            with open(log_path, "wb") as log:
                popen = subprocess.Popen(
                    spec.argv(python),
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env=engine_env(spec.hash_seed),
                    start_new_session=True,
                )
            procs.append(EngineProcess(spec=spec, pid=popen.pid, log_path=str(log_path), popen=popen))
    except BaseException:
        stop_engines(procs)
        raise
    return procs


def _lists_model(base_url: str, name: str) -> bool:
    try:
        with urllib.request.urlopen(f"{base_url}/v1/models", timeout=2) as resp:
            body = json.loads(resp.read())
    except (OSError, ValueError, urllib.error.URLError):
        return False
    return any(card.get("id") == name for card in body.get("data", []))


def wait_ready(procs: Sequence[EngineProcess], *, timeout: float = 300.0) -> None:
    """Block until every engine lists its model; ``RuntimeError`` (with the log tail) on death or timeout."""
    deadline = time.monotonic() + timeout
    pending = list(procs)
    while pending:
        for proc in list(pending):
            if not proc.alive():
                raise RuntimeError(f"vLLM on port {proc.spec.port} exited during start-up:\n{log_tail(proc)}")
            if _lists_model(proc.spec.base_url, proc.spec.served_name):
                pending.remove(proc)
        if not pending:
            return
        if time.monotonic() > deadline:
            ports = ", ".join(str(p.spec.port) for p in pending)
            raise RuntimeError(f"vLLM not ready after {timeout:.0f} s on port(s) {ports}:\n{log_tail(pending[0])}")
        time.sleep(1.0)


def log_tail(proc: EngineProcess, lines: int = 30) -> str:
    try:
        text = Path(proc.log_path).read_text(errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:])


def _signal_group(pid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)  # each engine leads its own session: this reaches its children too


def _group_alive(pid: int) -> bool:
    try:
        os.killpg(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def stop_engines(procs: Sequence[EngineProcess], *, grace: float = 20.0) -> None:
    """SIGTERM every engine's process group, wait up to ``grace`` seconds, then SIGKILL the rest."""
    for proc in procs:
        _signal_group(proc.pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    for proc in procs:
        while time.monotonic() < deadline and _group_alive(proc.pid):
            if proc.popen is not None:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.popen.wait(timeout=0.2)
            else:
                time.sleep(0.2)
            if proc.popen is not None and proc.popen.poll() is not None and not _group_alive(proc.pid):
                break
    for proc in procs:
        if _group_alive(proc.pid):
            _signal_group(proc.pid, signal.SIGKILL)
        if proc.popen is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.popen.wait(timeout=5)


# -- command line -----------------------------------------------------------------------------------


def _specs(args: argparse.Namespace) -> list[EngineSpec]:
    ports = [int(p) for p in str(args.ports).split(",") if p.strip()]
    if not ports:
        raise SystemExit("serve.py: --ports is empty")
    return [
        EngineSpec(
            port=port,
            model_dir=str(args.model_dir),
            served_name=args.served_name,
            num_blocks=args.num_blocks,
            block_size=args.block_size,
            max_model_len=args.max_model_len,
            max_num_seqs=args.max_num_seqs,
            max_num_batched_tokens=args.max_num_batched_tokens,
            hash_seed=args.hash_seed,
            kv_events_endpoint=args.kv_events_endpoint,
            lora_modules=list(args.lora_modules),
            max_loras=args.max_loras,
        )
        for port in ports
    ]


def _add_engine_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ports", required=True, help="comma-separated loopback ports, one engine each")
    p.add_argument("--model-dir", type=Path, default=DEFAULT_MODEL_DIR)
    p.add_argument("--served-name", default="tiny")
    p.add_argument("--python", default=str(DEFAULT_PYTHON), help="the vLLM venv's interpreter")
    p.add_argument("--num-blocks", type=int, default=256, help="--num-gpu-blocks-override (default 256)")
    p.add_argument("--block-size", type=int, default=32)
    p.add_argument("--max-model-len", type=int, default=2048)
    p.add_argument("--max-num-seqs", type=int, default=16)
    p.add_argument("--max-num-batched-tokens", type=int)
    p.add_argument("--hash-seed", default="0", help="PYTHONHASHSEED of the engines (the NONE_HASH seed)")
    p.add_argument("--kv-events-endpoint", help="ZMQ endpoint the engines connect to, e.g. tcp://127.0.0.1:5557")
    p.add_argument("--lora-modules", nargs="*", default=[], metavar="NAME=PATH")
    p.add_argument("--max-loras", type=int, default=2)
    p.add_argument("--ready-timeout", type=float, default=300.0)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run real vLLM CPU engines for e2e tests.")
    sub = parser.add_subparsers(dest="cmd", required=True)
    run = sub.add_parser("run", help="start, wait, serve in the foreground, stop on SIGINT/SIGTERM")
    _add_engine_args(run)
    run.add_argument("--run-dir", type=Path, default=VLLM_HOME / "run")
    run.add_argument("--duration", type=float, help="stop after this many seconds")
    start = sub.add_parser("start", help="start and wait, record PIDs in --run-dir, return")
    _add_engine_args(start)
    start.add_argument("--run-dir", type=Path, required=True)
    stop = sub.add_parser("stop", help="stop the engines recorded in --run-dir")
    stop.add_argument("--run-dir", type=Path, required=True)
    args = parser.parse_args(argv)

    if args.cmd == "stop":
        state_path = args.run_dir / STATE_FILE
        if not state_path.is_file():
            print(f"serve.py: nothing to stop ({state_path} missing)", file=sys.stderr)
            return 0
        state = json.loads(state_path.read_text())
        procs = [
            EngineProcess(spec=EngineSpec(**item["spec"]), pid=item["pid"], log_path=item["log_path"])
            for item in state["engines"]
        ]
        stop_engines(procs)
        state_path.unlink()
        print(f"serve.py: stopped {len(procs)} engine(s)")
        return 0

    specs = _specs(args)
    t0 = time.monotonic()
    try:
        procs = start_engines(specs, python=args.python, log_dir=args.run_dir)
        try:
            wait_ready(procs, timeout=args.ready_timeout)
        except BaseException:
            stop_engines(procs)
            raise
    except RuntimeError as exc:
        print(f"serve.py: {exc}", file=sys.stderr)
        return 2
    for proc in procs:
        print(f"serve.py: {proc.spec.served_name} ready on {proc.spec.base_url} (pid {proc.pid}, log {proc.log_path})")
    print(f"serve.py: {len(procs)} engine(s) ready in {time.monotonic() - t0:.0f} s", flush=True)
    if args.cmd == "start":
        state = {"engines": [{"spec": asdict(p.spec), "pid": p.pid, "log_path": p.log_path} for p in procs]}
        (args.run_dir / STATE_FILE).write_text(json.dumps(state, indent=1) + "\n")
        return 0

    stopping = False

    def _stop(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, _stop)
    signal.signal(signal.SIGTERM, _stop)
    deadline = None if args.duration is None else time.monotonic() + args.duration
    try:
        while not stopping and (deadline is None or time.monotonic() < deadline):
            if not all(p.alive() for p in procs):
                print("serve.py: an engine exited; stopping the others", file=sys.stderr)
                return 1
            time.sleep(0.5)
    finally:
        stop_engines(procs)
        print("serve.py: stopped", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
