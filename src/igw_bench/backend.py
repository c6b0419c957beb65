"""The fast fake model server behind every arm of ``igw bench overhead``.

``python -m igw_bench.backend [--count N] [--max-seconds S]`` serves ``N`` aiohttp servers on
free loopback ports in one process. It prints one ready line with the addresses and stops on
SIGTERM/SIGINT, when its parent goes away, or after ``S`` seconds. Each server answers:

* ``POST /v1/chat/completions``: a fixed non-streaming chat completion (the body is read, not parsed);
* ``GET /health``: 200 with an empty body (what vLLM answers; both peer routers wait for it);
* ``GET /v1/models``, ``GET /version``, ``GET /metrics`` (a tiny vLLM exposition: an idle server);
* for sglang-router, which asks at start-up: ``GET /server_info`` and ``/model_info`` (and their
  older ``/get_*`` names) with the served model name and no ``model_path``, so the router neither
  looks for a tokenizer on huggingface.co nor names the worker "unknown"; ``GET /get_load`` (idle);
* a known path with the wrong method: 405 with ``Allow``; anything else: an OpenAI-style 404.

sglang-router also probes each worker for gRPC at start-up (an HTTP/2 prior-knowledge
connection, in parallel with its HTTP health check). aiohttp refuses it with a 400, the router
settles on HTTP, and :class:`_QuietH2Probe` turns aiohttp's traceback for it into one line.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import socket
import sys

import orjson
from aiohttp import web
from aiohttp.http_exceptions import BadHttpMessage

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
_MODELS = orjson.dumps({"object": "list", "data": [{"id": MODEL, "object": "model", "owned_by": "igw-bench"}]})
_SERVER_INFO = orjson.dumps({"served_model_name": MODEL, "version": "igw-bench"})
_MODEL_INFO = orjson.dumps({"served_model_name": MODEL, "is_generation": True})
_LOAD = orjson.dumps([{"dp_rank": 0, "num_reqs": 0, "num_waiting_reqs": 0, "num_tokens": 0}])
_JSON = "application/json"

_GET: dict[str, tuple[bytes, str]] = {
    "/health": (b"", "text/plain"),
    "/v1/models": (_MODELS, _JSON),
    "/version": (b'{"version":"igw-bench"}', _JSON),
    "/metrics": (METRICS, "text/plain; version=0.0.4"),
    "/server_info": (_SERVER_INFO, _JSON),
    "/get_server_info": (_SERVER_INFO, _JSON),
    "/model_info": (_MODEL_INFO, _JSON),
    "/get_model_info": (_MODEL_INFO, _JSON),
    "/get_load": (_LOAD, _JSON),
}
"""``GET`` (and ``HEAD``) paths and their fixed answers: (body, content type)."""


def _error(status: int, message: str, kind: str, headers: dict[str, str] | None = None) -> web.Response:
    body = orjson.dumps({"error": {"message": message, "type": kind, "code": status}})
    return web.Response(status=status, body=body, content_type=_JSON, headers=headers)


async def _backend_handler(request: web.BaseRequest) -> web.StreamResponse:
    path, method = request.path, request.method
    if path == CHAT_PATH:
        if method != "POST":
            return _error(405, f"{method} {path}: use POST", "invalid_request_error", {"Allow": "POST"})
        await request.read()
        return web.Response(body=COMPLETION, content_type=_JSON)
    fixed = _GET.get(path)
    if fixed is None:
        return _error(404, f"{method} {path}: not found", "not_found_error")
    if method not in ("GET", "HEAD"):
        return _error(405, f"{method} {path}: use GET", "invalid_request_error", {"Allow": "GET, HEAD"})
    body, content_type = fixed
    return web.Response(body=body, headers={"Content-Type": content_type})


class _QuietH2Probe(logging.Filter):
    """One line instead of a traceback when a client opens an HTTP/2 prior-knowledge connection
    (sglang-router's gRPC probe): aiohttp answers 400 and logs it as an error."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, BadHttpMessage) and "PRI" in str(exc):
            record.msg, record.args = "refused an HTTP/2 prior-knowledge connection (a gRPC probe) with 400", ()
            record.levelno, record.levelname = logging.WARNING, "WARNING"
            record.exc_info = record.exc_text = None
        return True


async def serve_backend(count: int, max_seconds: float) -> None:
    """Serve ``count`` backends on free loopback ports; print one ready line; stop on SIGTERM/SIGINT,
    when the parent goes away, or after ``max_seconds``."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    logging.getLogger("aiohttp.server").addFilter(_QuietH2Probe())
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
