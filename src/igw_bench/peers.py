"""Peer routers (sglang-router, vllm-router) and the inference-perf load generator, each in its own
virtual environment, installed on first use with pinned versions.

The environments live under a cache root (``~/.cache/igw-bench``, or ``$IGW_BENCH_CACHE``), one
directory per tool: ``venv-sglang-router``, ``venv-vllm-router``, ``venv-inference-perf``.
:func:`ensure` installs the pinned top-level requirement constrained by the lock file the repository
ships (``tools/bench/constraints-<name>.txt``, a ``pip freeze`` of a working install), so every
machine gets the same transitive versions. A stamp file records what was installed; a file lock
(``fcntl``) keeps two processes from installing the same environment at once; pip runs under a
timeout. ``python -m igw_bench.peers lock NAME`` rewrites a lock file from the installed
environment (after a deliberate upgrade of the pin).

:class:`Peer` is one router arm (a kind and a policy): :meth:`Peer.argv` gives its command line,
bound to 127.0.0.1 for both the main port and the Prometheus port, and :func:`start_peer` runs it
in front of a list of workers and waits until it routes.

Nothing here imports ``igw``: the peers are child processes reached over loopback.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import fcntl
import glob
import hashlib
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, cast, get_args

import aiohttp

from igw_bench.procs import HOST, Child, free_ports

__all__ = [
    "CONSTRAINTS_DIR",
    "HEALTH_CHECK_INTERVAL_S",
    "INSTALL_TIMEOUT_S",
    "POLICIES",
    "SGLANG_POLICIES",
    "VENVS",
    "VLLM_POLICIES",
    "Peer",
    "PeerKind",
    "PeerProcess",
    "VenvSpec",
    "bin_dir",
    "cache_root",
    "constraints_path",
    "ensure",
    "find_python",
    "freeze",
    "installed",
    "lock",
    "start_peer",
    "start_peer_arm",
    "venv_dir",
    "workers_ready",
]

Log = Callable[[str], None]
PeerKind = Literal["sglang-router", "vllm-router"]

CONSTRAINTS_DIR = Path(__file__).resolve().parents[2] / "tools" / "bench"
"""Where the lock files (``constraints-<name>.txt``) and the helper scripts live."""

INSTALL_TIMEOUT_S = 900.0
_STAMP = ".igw-bench-stamp"


# --------------------------------------------------------------------------------------------
# Virtual environments


@dataclass(frozen=True, slots=True)
class VenvSpec:
    """One tool's environment: the pinned requirement and the Python it needs."""

    name: str
    requirement: str
    python: str
    """``major.minor`` of the interpreter the environment is created with."""
    site_files: tuple[str, ...] = ()
    """Modules under ``tools/bench`` copied into the environment's site-packages."""


VENVS: dict[str, VenvSpec] = {
    spec.name: spec
    for spec in (
        VenvSpec("sglang-router", "sglang-router==0.3.2", "3.11"),
        VenvSpec("vllm-router", "vllm-router==0.1.17", "3.11"),
        # Every inference-perf release requires Python >= 3.12.
        VenvSpec("inference-perf", "inference-perf==0.7.0", "3.12", site_files=("sitecustomize.py",)),
    )
}


def cache_root() -> Path:
    """``$IGW_BENCH_CACHE``, else ``~/.cache/igw-bench``."""
    env = os.environ.get("IGW_BENCH_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "igw-bench"


def venv_dir(name: str) -> Path:
    return cache_root() / f"venv-{_spec(name).name}"


def bin_dir(name: str) -> Path:
    """The environment's ``bin`` directory (whether or not it is installed yet)."""
    return venv_dir(name) / "bin"


def constraints_path(name: str) -> Path:
    return CONSTRAINTS_DIR / f"constraints-{_spec(name).name}.txt"


def installed(name: str) -> bool:
    """True when the environment is installed and matches the current pin and lock file."""
    stamp = venv_dir(name) / _STAMP
    with contextlib.suppress(OSError):
        return stamp.read_text() == _stamp_text(_spec(name))
    return False


def _spec(name: str) -> VenvSpec:
    try:
        return VENVS[name]
    except KeyError:
        raise ValueError(f"unknown tool {name!r} (known: {', '.join(VENVS)})") from None


def _stamp_text(spec: VenvSpec) -> str:
    path = constraints_path(spec.name)
    digest = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "none"
    return f"{spec.requirement}\npython {spec.python}\nconstraints {digest}\n"


def _python_version(python: str) -> str | None:
    """``major.minor`` of an interpreter, or None when it does not run (e.g. a pyenv shim for a
    version that is installed but not selected)."""
    try:
        out = subprocess.run(
            [python, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
            capture_output=True, text=True, timeout=20, check=False,
        )  # fmt: skip
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def _candidates(version: str) -> Iterator[str]:
    env = os.environ.get(f"IGW_BENCH_PYTHON{version.replace('.', '')}")
    if env:
        yield env
    if f"{sys.version_info[0]}.{sys.version_info[1]}" == version:
        # The base interpreter of our own venv (a venv made from a venv's python works too, but
        # its pyvenv.cfg would point at our venv).
        yield getattr(sys, "_base_executable", sys.executable)
    on_path = shutil.which(f"python{version}")
    if on_path:
        yield on_path
    roots = [os.environ.get("PYENV_ROOT", ""), str(Path.home() / ".pyenv")]
    for root in filter(None, roots):
        yield from sorted(glob.glob(f"{root}/versions/{version}.*/bin/python{version}"), reverse=True)


def find_python(version: str) -> str:
    """An interpreter of ``version`` (``"3.12"``): ``$IGW_BENCH_PYTHON312``, our own base
    interpreter, ``python3.12`` on PATH (if it runs), or a pyenv installation.

    Raises RuntimeError naming what was tried when there is none.
    """
    tried: list[str] = []
    for candidate in dict.fromkeys(_candidates(version)):
        if _python_version(candidate) == version:
            return candidate
        tried.append(candidate)
    env = f"IGW_BENCH_PYTHON{version.replace('.', '')}"
    raise RuntimeError(
        f"no Python {version} interpreter found (tried: {', '.join(tried) or 'nothing'}); "
        f"install one (e.g. `pyenv install {version}`) or point ${env} at it"
    )


@contextlib.contextmanager
def _file_lock(path: Path, timeout: float, log: Log) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as handle:
        deadline = time.monotonic() + timeout
        waiting = False
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if not waiting:
                    log(f"waiting for another installer to release {path}")
                    waiting = True
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{path} still locked after {timeout:.0f}s") from None
                time.sleep(0.5)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _run_logged(argv: Sequence[str], log_path: Path, deadline: float, what: str, log: Log) -> None:
    """Run ``argv`` with its output appended to ``log_path``; report progress every 15 s; kill it
    at ``deadline`` (monotonic). RuntimeError (with the log's tail) if it fails."""
    with log_path.open("ab") as out:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
    started = time.monotonic()
    next_report = started + 15
    try:
        while True:
            try:
                proc.wait(timeout=max(0.0, min(1.0, deadline - time.monotonic())))
                break
            except subprocess.TimeoutExpired:
                now = time.monotonic()
                if now >= deadline:
                    raise TimeoutError(f"{what}: not done in time (log: {log_path})") from None
                if now >= next_report:
                    collected = log_path.read_text(errors="replace").count("Collecting ")
                    log(f"{what}: {now - started:.0f}s, {collected} packages collected")
                    next_report = now + 15
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    if proc.returncode != 0:
        tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-20:])
        raise RuntimeError(f"{what} failed with status {proc.returncode} (log: {log_path}):\n{tail}")


def ensure(name: str, log: Log = print, *, timeout: float = INSTALL_TIMEOUT_S) -> Path:
    """The ``bin`` directory of tool ``name``'s environment, installing it first if needed.

    Idempotent (a stamp file holds the pin, the Python version and the lock file's digest; a
    mismatch reinstalls from scratch), safe against a concurrent installer (a file lock), and
    bounded by ``timeout`` seconds. Blocking: from async code call it through
    ``asyncio.to_thread``.
    """
    spec = _spec(name)
    venv = venv_dir(name)
    if not installed(name):
        deadline = time.monotonic() + timeout
        with _file_lock(cache_root() / f"venv-{spec.name}.lock", timeout, log):
            if not installed(name):
                _install(spec, venv, deadline, log)
    _copy_site_files(spec, venv)
    return venv / "bin"


def _copy_site_files(spec: VenvSpec, venv: Path) -> None:
    """Copy the spec's helper modules into site-packages (cheap, so done on every ensure: an
    edited helper takes effect without a reinstall)."""
    site = venv / "lib" / f"python{spec.python}" / "site-packages"
    for name in spec.site_files:
        text = (CONSTRAINTS_DIR / name).read_text()
        target = site / name
        if not target.is_file() or target.read_text() != text:
            target.write_text(text)


def _install(spec: VenvSpec, venv: Path, deadline: float, log: Log) -> None:
    python = find_python(spec.python)
    started = time.monotonic()
    if venv.exists():
        log(f"{spec.name}: removing the stale environment {venv}")
        shutil.rmtree(venv)
    log_path = cache_root() / f"install-{spec.name}.log"
    log_path.write_text("")
    log(f"{spec.name}: installing {spec.requirement} with {python} into {venv} (pip log: {log_path})")
    _run_logged([python, "-m", "venv", str(venv)], log_path, deadline, f"{spec.name}: venv", log)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "--disable-pip-version-check", "install", "--no-input"]
    constraints = constraints_path(spec.name)
    if constraints.is_file():
        pip += ["-c", str(constraints)]
    else:
        log(f"{spec.name}: no lock file at {constraints}; transitive versions float")
    _run_logged([*pip, spec.requirement], log_path, deadline, f"{spec.name}: pip install", log)
    (venv / _STAMP).write_text(_stamp_text(spec))
    log(f"{spec.name}: installed in {time.monotonic() - started:.0f}s")


def freeze(name: str) -> str:
    """``pip freeze`` of an installed environment."""
    out = subprocess.run(
        [str(bin_dir(name) / "python"), "-m", "pip", "--disable-pip-version-check", "freeze", "--all"],
        capture_output=True, text=True, timeout=120, check=True,
    )  # fmt: skip
    keep = [line for line in out.stdout.splitlines() if line and not line.startswith(("pip==", "setuptools=="))]
    return "\n".join(keep) + "\n"


def lock(name: str) -> Path:
    """Write the lock file of ``name`` from its installed environment; restamp the environment."""
    spec = _spec(name)
    if not (venv_dir(name) / _STAMP).is_file():
        raise RuntimeError(f"{name} is not installed (run ensure first)")
    path = constraints_path(name)
    header = f"# pip freeze of a working {spec.requirement} install (Python {spec.python}); used with -c.\n"
    path.write_text(header + freeze(name))
    (venv_dir(name) / _STAMP).write_text(_stamp_text(spec))
    return path


# --------------------------------------------------------------------------------------------
# Router arms

SGLANG_POLICIES = ("cache_aware", "round_robin", "power_of_two", "random")
VLLM_POLICIES = ("cache_aware", "consistent_hash", "round_robin", "power_of_two", "random")
POLICIES: dict[str, tuple[str, ...]] = {"sglang-router": SGLANG_POLICIES, "vllm-router": VLLM_POLICIES}
"""The routing policies each peer kind offers here."""

HEALTH_CHECK_INTERVAL_S = 10
"""Workers are health-checked this often (the routers' default, 60 s, is slow to notice a death)."""


@dataclass(frozen=True, slots=True)
class Peer:
    """One router arm: ``kind`` with a routing ``policy`` (plus any ``extra_args``)."""

    kind: PeerKind
    policy: str
    extra_args: tuple[str, ...] = field(default=())

    def __post_init__(self) -> None:
        if self.kind not in POLICIES:
            raise ValueError(f"unknown peer kind {self.kind!r} (known: {', '.join(get_args(PeerKind))})")
        if self.policy not in POLICIES[self.kind]:
            raise ValueError(f"{self.kind} has no policy {self.policy!r} (known: {', '.join(POLICIES[self.kind])})")

    @property
    def name(self) -> str:
        return f"{self.kind}/{self.policy}"

    @property
    def version(self) -> str:
        """The pinned version of the peer."""
        return VENVS[self.kind].requirement.partition("==")[2]

    def argv(self, port: int, prometheus_port: int, workers: Sequence[str], tokenizer_dir: Path | None) -> list[str]:
        """The command line: both listeners on 127.0.0.1; workers as base URLs or ``host:port``."""
        if not workers:
            raise ValueError("a router needs at least one worker")
        if self.policy == "power_of_two" and len(workers) < 2:
            raise ValueError("power_of_two needs at least 2 workers")
        bindir = bin_dir(self.kind)
        if self.kind == "sglang-router":
            head = [str(bindir / "python"), "-m", "sglang_router.launch_router"]
        else:
            # vllm-router 0.1.17 hands --log-level to Rust's EnvFilter, which does not know the
            # "warning" its argparse insists on, and falls back to INFO: one line per routing
            # decision. RUST_LOG takes precedence.
            head = ["env", "RUST_LOG=warn", str(bindir / "vllm-router")]
        argv = [
            *head,
            "--host", HOST, "--port", str(port),
            "--prometheus-host", HOST, "--prometheus-port", str(prometheus_port),
            "--worker-urls", *(w if "://" in w else f"http://{w}" for w in workers),
            "--policy", self.policy,
            "--health-check-interval-secs", str(HEALTH_CHECK_INTERVAL_S),
            "--worker-startup-timeout-secs", "60",
            "--log-level", "warn" if self.kind == "sglang-router" else "warning",
        ]  # fmt: skip
        if tokenizer_dir is not None and self.kind == "sglang-router":
            # Without a local tokenizer sglang-router tries huggingface.co for the worker's model.
            argv += ["--tokenizer-path", str(tokenizer_dir)]
        return [*argv, *self.extra_args]


@dataclass(slots=True)
class PeerProcess:
    """A running peer: its child process and where it listens."""

    peer: Peer
    child: Child
    base_url: str
    metrics_url: str

    async def stop(self) -> int | None:
        return await self.child.stop()


async def start_peer(
    peer: Peer,
    workers: Sequence[str],
    log_dir: Path,
    tokenizer_dir: Path | None = None,
    *,
    log: Log = print,
    timeout: float = 60.0,
    install_timeout: float = INSTALL_TIMEOUT_S,
) -> PeerProcess:
    """Install the peer if needed, start it on free loopback ports in front of ``workers`` and
    wait until it routes (see :func:`workers_ready`). The caller stops the returned process; if
    starting fails, the process is stopped here."""
    await asyncio.to_thread(ensure, peer.kind, log, timeout=install_timeout)
    port, prometheus_port = free_ports(2)
    await asyncio.to_thread(log_dir.mkdir, parents=True, exist_ok=True)
    argv = peer.argv(port, prometheus_port, workers, tokenizer_dir)
    child = Child(peer.name, argv, log_dir / f"{peer.kind}-{peer.policy}.log")
    base_url = f"http://{HOST}:{port}"
    child.spawn()
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as http:

            async def ready() -> bool:
                return await workers_ready(http, base_url, len(workers))

            await child.wait_until(ready, timeout=timeout, what=f"{base_url}/workers")
    except BaseException:
        await child.stop()
        raise
    log(f"{peer.name}: ready at {base_url} (pid {child.pid})")
    return PeerProcess(peer, child, base_url, f"http://{HOST}:{prometheus_port}/metrics")


async def workers_ready(http: aiohttp.ClientSession, base_url: str, n_workers: int) -> bool:
    """True once the router lists ``n_workers`` healthy workers at ``GET /workers``.

    Both routers serve ``/workers`` as ``{"workers": [{"url", "is_healthy", ...}], "total": n}``.
    ``/health`` is not enough: sglang-router answers "OK" before it has registered its workers
    (it registers them one by one after fetching ``/server_info``), and vllm-router only starts
    listening once every worker is healthy. ``/v1/models`` is answered by sglang-router itself.
    """
    try:
        async with http.get(f"{base_url}/workers") as resp:
            if resp.status != 200:
                return False
            body = await resp.json(content_type=None)
    except (aiohttp.ClientError, TimeoutError, ValueError):
        return False
    listed = body.get("workers") if isinstance(body, dict) else None
    if not isinstance(listed, list):
        return False
    healthy = [w for w in listed if isinstance(w, dict) and w.get("is_healthy") is True]
    return len(healthy) >= n_workers


async def start_peer_arm(
    kind: str,
    policy: str,
    endpoints: Sequence[str],
    workdir: Path,
    timeout: float,
    *,
    tokenizer_dir: Path | None = None,
) -> tuple[list[Child], str, dict[str, int], str]:
    """:func:`start_peer` for ``igw bench compare``: ``(children, base URL, pids, version)``."""
    if kind not in POLICIES:
        raise ValueError(f"unknown peer kind {kind!r} (known: {', '.join(POLICIES)})")
    peer = Peer(cast(PeerKind, kind), policy)
    started = await start_peer(peer, endpoints, workdir, tokenizer_dir, timeout=timeout)
    return [started.child], started.base_url, {"router": started.child.pid}, f"{kind} {peer.version}"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m igw_bench.peers", description=__doc__.split("\n\n")[0])
    parser.add_argument("action", choices=["install", "lock", "status"])
    parser.add_argument("names", nargs="*", default=list(VENVS), metavar="NAME")
    args = parser.parse_args(argv)
    for name in args.names:
        if args.action == "install":
            started = time.monotonic()
            print(f"{name}: {ensure(name)} ({time.monotonic() - started:.0f}s)")
        elif args.action == "lock":
            print(f"{name}: wrote {lock(name)}")
        else:
            print(f"{name}: {'installed' if installed(name) else 'not installed'} at {venv_dir(name)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
