"""The fast fake model server behind both arms of ``igw bench overhead``.

``python -m igw_bench.backend [--count N] [--max-seconds S]`` serves ``N`` aiohttp servers on
free loopback ports in one process. Each answers a fixed non-streaming chat completion, a tiny
vLLM ``/metrics`` (an idle server) and ``/health``; it prints one ready line with the addresses
and stops on SIGTERM/SIGINT, when its parent goes away, or after ``S`` seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import socket
import sys

import orjson
from aiohttp import web

from igw_bench.procs import HOST, run_loop

CHAT_PATH = "/v1/chat/completions"
MODEL = "bench-model"
BACKEND_READY = "igw-bench backend ready"

COMPLETION = orjson.dumps(
    {
        "id": "chatcmpl-bench",
        "object": "chat.completion",
        "created": 1700000000,
        "model": MODEL,
        "choices": [
            {"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop", "logprobs": None}
        ],
        "usage": {"prompt_tokens": 10, "completion_tokens": 1, "total_tokens": 11},
    }
)
METRICS = (
    b"# TYPE vllm:num_requests_waiting gauge\n"
    b'vllm:num_requests_waiting{model_name="bench-model"} 0\n'
    b"# TYPE vllm:num_requests_running gauge\n"
    b'vllm:num_requests_running{model_name="bench-model"} 0\n'
    b"# TYPE vllm:kv_cache_usage_perc gauge\n"
    b'vllm:kv_cache_usage_perc{model_name="bench-model"} 0\n'
)


async def _backend_handler(request: web.BaseRequest) -> web.StreamResponse:
    if request.method == "POST" and request.path == CHAT_PATH:
        await request.read()
        return web.Response(body=COMPLETION, content_type="application/json")
    if request.path == "/metrics":
        return web.Response(body=METRICS, content_type="text/plain")
    if request.path in ("/health", "/v1/models"):
        return web.Response(body=b'{"object":"list","data":[{"id":"bench-model"}]}', content_type="application/json")
    return web.Response(status=404, text="not found")


async def serve_backend(count: int, max_seconds: float) -> None:
    """Serve ``count`` backends on free loopback ports; print one ready line; stop on SIGTERM/SIGINT,
    when the parent goes away, or after ``max_seconds``."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    runner = web.ServerRunner(web.Server(_backend_handler, access_log=None), handle_signals=False)
    await runner.setup()
    addresses: list[str] = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((HOST, 0))
            site = web.SockSite(runner, sock, backlog=1024)
            await site.start()
            addresses.append(f"{HOST}:{sock.getsockname()[1]}")
        print(f"{BACKEND_READY} {' '.join(addresses)}", flush=True)
        parent = os.getppid()
        deadline = loop.time() + max_seconds
        while not stop.is_set() and os.getppid() == parent and loop.time() < deadline:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 1.0)
    finally:
        await runner.cleanup()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m igw_bench.backend")
    parser.add_argument("--count", type=int, default=2)
    parser.add_argument("--max-seconds", type=float, default=3600.0)
    args = parser.parse_args(argv)
    run_loop(serve_backend(args.count, args.max_seconds))
    return 0


if __name__ == "__main__":
    sys.exit(main())
