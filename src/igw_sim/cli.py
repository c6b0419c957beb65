"""``igw-sim``: serve simulated vLLM endpoints from the command line.

Prints ``igw-sim: serving <models> on http://host:port`` per endpoint, then ``igw-sim: ready`` (stdout,
flushed), and runs until SIGINT/SIGTERM or ``--duration`` seconds; then stops and exits 0. Exit status 2
means bad arguments (a ``--tokenizer`` directory that cannot be loaded prints one ``igw-sim: error:``
line), 1 that an endpoint could not be started (for example a port in use).

``--tokenizer DIR`` makes every endpoint tokenize like the real model of a Hugging Face tokenizer
directory (see :mod:`igw_sim.hf_tokenizer`); without it the toy tokenizer is used.

``igw-sim replay ...`` runs a virtual-time replay instead (see :mod:`igw_sim.replay.cli`).

Engine knobs start from ``--profile`` (a preset of :data:`igw_sim.profiles.PRESETS`) or from the
built-in defaults, and every flag given on the command line overrides them. The block-hash seed defaults
to ``$PYTHONHASHSEED`` like vLLM's, or ``vllm-none-hash`` when unset.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import sys
from collections.abc import Sequence
from typing import Any

import uvloop
import zmq

from igw_sim.engine import EngineConfig
from igw_sim.faults import ERROR_KINDS, Faults
from igw_sim.fleet import SimFleet
from igw_sim.hashing import DEFAULT_SEED
from igw_sim.hf_tokenizer import HFTokenizer, TokenizerLoadError
from igw_sim.kvpublisher import KVEventsConfig
from igw_sim.profiles import PRESETS

__all__ = ["build_parser", "main"]

# flag destination -> EngineConfig field, for the knobs that override a profile only when given
_ENGINE_FLAGS = {
    "max_num_seqs": "max_num_seqs",
    "max_num_batched_tokens": "max_num_batched_tokens",
    "max_waiting": "max_waiting",
    "itl_ms": "itl_ms",
    "itl_slowdown": "itl_slowdown_at_full_batch",
    "prefill_overhead_ms": "prefill_overhead_ms",
    "prefill_ms_per_token": "prefill_ms_per_token",
    "kv_blocks": "kv_blocks",
    "block_size": "block_size",
    "max_model_len": "max_model_len",
    "time_dilation": "time_dilation",
    "hash_algo": "hash_algo",
    "max_loras": "max_loras",
    "lora_load_ms": "lora_load_ms",
}
_SIMPLE_LATENCY = ("itl_ms", "itl_slowdown", "prefill_overhead_ms", "prefill_ms_per_token")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (exposed for ``--help`` rendering and tests)."""
    d = EngineConfig()
    p = argparse.ArgumentParser(
        prog="igw-sim",
        description="Simulated vLLM (OpenAI API) endpoints. 'igw-sim replay --help': virtual-time policy replays.",
    )
    where = p.add_mutually_exclusive_group()
    where.add_argument("--ports", help="comma-separated ports, e.g. 8001,8002 (0 = any free port)")
    where.add_argument("--count", type=int, help="number of endpoints on consecutive ports from --base-port")
    p.add_argument("--base-port", type=int, default=8001, help="first port with --count (default 8001)")
    p.add_argument("--host", default="127.0.0.1", help="listen address (default 127.0.0.1)")
    p.add_argument("--model", action="append", help="served model name (repeatable; default sim-model)")
    p.add_argument("--duration", type=float, help="exit after this many seconds")

    eng = p.add_argument_group("engine (each flag overrides --profile)")
    eng.add_argument("--profile", choices=sorted(PRESETS), help="latency and capacity preset (docs/simulator.md)")
    eng.add_argument("--max-num-seqs", type=int, help=f"running sequences (default {d.max_num_seqs})")
    eng.add_argument(
        "--max-num-batched-tokens", type=int, help=f"token budget per step (default {d.max_num_batched_tokens})"
    )
    eng.add_argument("--max-waiting", type=int, help=f"queue limit before 429 (default {d.max_waiting})")
    eng.add_argument("--max-model-len", type=int, help=f"(default {d.max_model_len})")
    eng.add_argument("--kv-blocks", type=int, help=f"KV cache blocks (default {d.kv_blocks})")
    eng.add_argument("--block-size", type=int, help=f"tokens per block (default {d.block_size})")
    eng.add_argument("--no-prefix-caching", action="store_true", help="disable prefix caching")
    eng.add_argument("--hash-algo", choices=["fast", "sha256_cbor", "xxhash_cbor"], help="block hash (default fast)")
    eng.add_argument("--hash-seed", help="NONE_HASH seed string (default $PYTHONHASHSEED or vllm-none-hash)")
    eng.add_argument("--time-dilation", type=float, help="real seconds per simulated second (default 1)")
    eng.add_argument("--itl-ms", type=float, help=f"simple latency: ITL of one sequence (default {d.itl_ms})")
    eng.add_argument(
        "--itl-slowdown",
        type=float,
        help=f"simple latency: ITL factor at full batch (default {d.itl_slowdown_at_full_batch})",
    )
    eng.add_argument("--prefill-overhead-ms", type=float, help=f"simple latency (default {d.prefill_overhead_ms})")
    eng.add_argument("--prefill-ms-per-token", type=float, help=f"simple latency (default {d.prefill_ms_per_token})")

    lora = p.add_argument_group("LoRA")
    lora.add_argument("--enable-lora", action="store_true", help="report LoRA metrics even without adapters")
    lora.add_argument("--lora-modules", nargs="+", default=[], metavar="NAME=PATH", help="adapters known at start")
    lora.add_argument("--max-loras", type=int, help=f"resident adapter slots (default {d.max_loras})")
    lora.add_argument("--lora-load-ms", type=float, help=f"time to load an adapter (default {d.lora_load_ms})")

    obs = p.add_argument_group("metrics and KV events")
    obs.add_argument("--metrics-style", choices=["vllm", "sglang"], default="vllm", help="metric names")
    obs.add_argument(
        "--tokenizer",
        metavar="DIR",
        help="Hugging Face tokenizer directory (tokenizer.json, tokenizer_config.json, chat_template.jinja): "
        "tokenize prompts and generate tokens exactly like that model (default: the toy tokenizer)",
    )
    obs.add_argument(
        "--tokenizer-path", help="model_path/tokenizer_path reported by /server_info (default: --tokenizer)"
    )
    obs.add_argument(
        "--kv-events-endpoint", help="ZMQ PUB endpoint (tcp://127.0.0.1:5557 connects, tcp://*:5557 binds)"
    )
    obs.add_argument("--kv-events-replay-endpoint", help="ZMQ ROUTER replay endpoint (bound)")
    obs.add_argument("--kv-events-topic", help="topic ({endpoint} and {model} expand; default kv@{endpoint}@{model})")
    obs.add_argument("--kv-events-format", choices=["map", "array"], default="map", help="event encoding")
    obs.add_argument("--kv-events-bytes-hashes", action="store_true", help="raw hash bytes instead of ints")

    faults = p.add_argument_group("failure injection")
    faults.add_argument("--error-rate", type=float, default=0.0, help="fraction of requests failed (0-1)")
    faults.add_argument(
        "--error-kinds", default="server_error", help=f"comma-separated, from: {', '.join(ERROR_KINDS)}"
    )
    faults.add_argument("--crash-after", type=float, help="crash every endpoint after this many seconds")
    faults.add_argument("--seed", type=int, default=0, help="seed of the failure draws")
    return p


def _ports(args: argparse.Namespace) -> list[int]:
    if args.ports:
        return [int(part) for part in str(args.ports).split(",") if part.strip()]
    count = args.count if args.count is not None else 1
    return [args.base_port + i for i in range(count)]


def _engine_config(args: argparse.Namespace, tokenizer: HFTokenizer | None = None) -> EngineConfig:
    overrides: dict[str, Any] = {
        field: getattr(args, dest) for dest, field in _ENGINE_FLAGS.items() if getattr(args, dest) is not None
    }
    if tokenizer is not None:
        overrides["tokenizer"] = tokenizer
    if args.no_prefix_caching:
        overrides["enable_prefix_caching"] = False
    overrides["hash_seed"] = args.hash_seed or os.environ.get("PYTHONHASHSEED") or DEFAULT_SEED
    modules: list[tuple[str, str]] = []
    for item in args.lora_modules:
        name, sep, path = str(item).partition("=")
        if not sep or not name or not path:
            raise ValueError(f"--lora-modules expects NAME=PATH, got {item!r}")
        modules.append((name, path))
    overrides["lora_modules"] = tuple(modules)
    overrides["enable_lora"] = bool(args.enable_lora)
    if args.profile is None:
        return EngineConfig(**overrides)
    if any(getattr(args, dest) is not None for dest in _SIMPLE_LATENCY):
        raise ValueError("--itl-ms, --itl-slowdown and --prefill-* cannot be combined with --profile")
    return EngineConfig.from_preset(args.profile, **overrides)


def _kv_events(args: argparse.Namespace) -> KVEventsConfig | None:
    if args.kv_events_endpoint is None:
        if args.kv_events_replay_endpoint is not None:
            raise ValueError("--kv-events-replay-endpoint needs --kv-events-endpoint")
        return None
    return KVEventsConfig(
        endpoint=args.kv_events_endpoint,
        replay_endpoint=args.kv_events_replay_endpoint,
        topic=args.kv_events_topic,
        event_format=args.kv_events_format,
        int_hashes=not args.kv_events_bytes_hashes,
    )


async def _serve(fleet: SimFleet, duration: float | None, crash_after: float | None) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        async with fleet:
            for address in fleet.addresses:
                print(f"igw-sim: serving {', '.join(fleet.models)} on http://{address}", flush=True)
            if crash_after is not None:
                for server in fleet.servers:
                    loop.call_later(crash_after, server.crash)
            print("igw-sim: ready", flush=True)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=duration)
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` (default ``sys.argv[1:]``), serve, and return the exit status."""
    args_list = list(sys.argv[1:] if argv is None else argv)
    if args_list and args_list[0] == "replay":
        from igw_sim.replay.cli import main as replay_main

        return replay_main(args_list[1:])
    parser = build_parser()
    args = parser.parse_args(args_list)
    tokenizer = None
    if args.tokenizer is not None:
        try:
            tokenizer = HFTokenizer.load(args.tokenizer)
        except TokenizerLoadError as exc:
            print(f"igw-sim: error: --tokenizer: {exc}", file=sys.stderr, flush=True)
            return 2
    try:
        ports = _ports(args)
        config = _engine_config(args, tokenizer)
        faults = Faults(
            error_rate=args.error_rate,
            error_kinds=tuple(k.strip() for k in str(args.error_kinds).split(",") if k.strip()),
            seed=args.seed,
        )
        fleet = SimFleet(
            ports=ports,
            host=args.host,
            engine=config,
            models=args.model or ["sim-model"],
            metrics_style=args.metrics_style,
            kv_events=_kv_events(args),
            faults=faults,
            tokenizer_path=args.tokenizer_path,
        )
    except ValueError as exc:
        parser.error(str(exc))  # exits with status 2
    try:
        uvloop.run(_serve(fleet, args.duration, args.crash_after))
    except (OSError, zmq.ZMQError) as exc:
        print(f"igw-sim: error: {exc}", file=sys.stderr, flush=True)
        return 1
    return 0
