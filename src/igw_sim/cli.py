"""``igw-sim``: serve simulated vLLM endpoints from the command line.

Prints ``igw-sim: serving <models> on http://host:port`` per endpoint, then ``igw-sim: ready`` (stdout,
flushed), and runs until SIGINT/SIGTERM or ``--duration`` seconds; then stops and exits 0. Exit status 2
means bad arguments, 1 that an endpoint could not be started (for example a port in use).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys
from collections.abc import Sequence

import uvloop

from igw_sim.engine import EngineConfig
from igw_sim.fleet import SimFleet

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (exposed for ``--help`` rendering and tests)."""
    defaults = EngineConfig()
    p = argparse.ArgumentParser(prog="igw-sim", description="Simulated vLLM (OpenAI API) endpoints.")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--ports", help="comma-separated ports, e.g. 8001,8002 (0 = any free port)")
    where.add_argument("--count", type=int, help="number of endpoints on consecutive ports from --base-port")
    p.add_argument("--base-port", type=int, default=8001, help="first port with --count (default 8001)")
    p.add_argument("--host", default="127.0.0.1", help="listen address (default 127.0.0.1)")
    p.add_argument("--model", action="append", help="served model name (repeatable; default sim-model)")
    p.add_argument("--max-num-seqs", type=int, default=defaults.max_num_seqs)
    p.add_argument("--max-waiting", type=int, default=defaults.max_waiting)
    p.add_argument("--itl-ms", type=float, default=defaults.itl_ms)
    p.add_argument("--itl-slowdown", type=float, default=defaults.itl_slowdown_at_full_batch)
    p.add_argument("--prefill-overhead-ms", type=float, default=defaults.prefill_overhead_ms)
    p.add_argument("--prefill-ms-per-token", type=float, default=defaults.prefill_ms_per_token)
    p.add_argument("--kv-blocks", type=int, default=defaults.kv_blocks)
    p.add_argument("--block-size", type=int, default=defaults.block_size)
    p.add_argument("--max-model-len", type=int, default=defaults.max_model_len)
    p.add_argument("--duration", type=float, help="exit after this many seconds")
    return p


def _ports(args: argparse.Namespace) -> list[int]:
    if args.ports:
        return [int(part) for part in str(args.ports).split(",") if part.strip()]
    count = args.count if args.count is not None else 1
    return [args.base_port + i for i in range(count)]


async def _serve(fleet: SimFleet, duration: float | None) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        async with fleet:
            for address in fleet.addresses:
                print(f"igw-sim: serving {', '.join(fleet.models)} on http://{address}", flush=True)
            print("igw-sim: ready", flush=True)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=duration)
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` (default ``sys.argv[1:]``), serve, and return the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        ports = _ports(args)
        config = EngineConfig(
            max_num_seqs=args.max_num_seqs,
            max_waiting=args.max_waiting,
            prefill_overhead_ms=args.prefill_overhead_ms,
            prefill_ms_per_token=args.prefill_ms_per_token,
            itl_ms=args.itl_ms,
            itl_slowdown_at_full_batch=args.itl_slowdown,
            kv_blocks=args.kv_blocks,
            block_size=args.block_size,
            max_model_len=args.max_model_len,
        )
        fleet = SimFleet(ports=ports, host=args.host, engine=config, models=args.model or ["sim-model"])
    except ValueError as exc:
        parser.error(str(exc))  # exits with status 2
    try:
        uvloop.run(_serve(fleet, args.duration))
    except OSError as exc:
        print(f"igw-sim: error: {exc}", file=sys.stderr, flush=True)
        return 1
    return 0
