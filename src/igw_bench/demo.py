"""``igw demo``: a simulated vLLM fleet, the gateway in front of it, and a short mixed workload.

Everything runs as it would for a user: the simulator and ``igw run`` are child processes,
and the workload goes through Envoy over HTTP. The run is bounded by a request count and a
deadline, then prints what each server got and how to send a request yourself.
"""

from __future__ import annotations

import asyncio
import random
import sys
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from igw_bench.client import RequestSpec, Result, percentile, run_closed_loop
from igw_bench.procs import Child, free_ports

MODEL = "sim-model"
_WORDS = ("gateway", "token", "cache", "prefix", "queue", "model", "server", "latency", "batch", "route")


@dataclass(frozen=True, slots=True)
class DemoOptions:
    requests: int = 200
    concurrency: int = 16
    duration_s: float = 60.0
    servers: int = 4
    keep_running: bool = False
    gateway_port: int = 8081
    seed: int = 7


def workload(n: int, seed: int) -> list[RequestSpec]:
    """A mix: chat (streamed or not) under one of a few long shared system prompts, as assistants
    and agents send it, and plain completions; short and long prompts."""
    rng = random.Random(seed)
    systems = [f"You are assistant {k}. " + " ".join(rng.choice(_WORDS) for _ in range(300)) for k in range(6)]
    specs: list[RequestSpec] = []
    for i in range(n):
        words = " ".join(rng.choice(_WORDS) for _ in range(rng.choice((20, 60, 400))))
        max_tokens = rng.choice((8, 16, 32, 64))
        kind = rng.random()
        messages = [{"role": "system", "content": rng.choice(systems)}, {"role": "user", "content": f"#{i} {words}"}]
        if kind < 0.5:
            body = {"model": MODEL, "messages": messages, "max_tokens": max_tokens, "stream": True,
                    "stream_options": {"include_usage": True}}  # fmt: skip
            specs.append(RequestSpec("/v1/chat/completions", body))
        elif kind < 0.75:
            body = {"model": MODEL, "messages": messages, "max_tokens": max_tokens}
            specs.append(RequestSpec("/v1/chat/completions", body))
        else:
            specs.append(RequestSpec("/v1/completions", {"model": MODEL, "prompt": words, "max_tokens": max_tokens}))
    return specs


def summary_table(results: list[Result]) -> Table:
    table = Table(title="Per endpoint", show_lines=False)
    table.add_column("endpoint", no_wrap=True)
    for col in ("requests", "share", "TTFT p50 ms*", "TTFT p90 ms*", "prompt cached", "errors"):
        table.add_column(col, justify="right")
    by_ep: dict[str, list[Result]] = {}
    for r in results:
        by_ep.setdefault(r.endpoint or "(none)", []).append(r)
    total = len(results) or 1
    for ep in sorted(by_ep):
        rs = by_ep[ep]
        ttfts = [r.ttft_s * 1000 for r in rs if r.ok and r.ttft_s is not None]
        table.add_row(
            ep, str(len(rs)), f"{100 * len(rs) / total:.0f}%", f"{percentile(ttfts, 50):.1f}",
            f"{percentile(ttfts, 90):.1f}", f"{cached_share(rs):.0f}%", str(sum(1 for r in rs if not r.ok)),
        )  # fmt: skip
    return table


def cached_share(results: list[Result]) -> float:
    """Percent of the prompt tokens the servers found in their prefix caches."""
    prompt = sum(r.prompt_tokens for r in results if r.ok)
    return 100 * sum(r.cached_tokens for r in results if r.ok) / prompt if prompt else 0.0


async def _demo(opts: DemoOptions, console: Console, logs: Path) -> int:
    *sim_ports, admin_port, grpc_port, grpc_health_port, metrics_port = free_ports(opts.servers + 4)
    sim = Child("simulator", [sys.executable, "-m", "igw_sim", "--ports", ",".join(map(str, sim_ports)),
                              "--model", MODEL, "--max-num-seqs", "4", "--itl-ms", "8"], logs / "sim.log")  # fmt: skip
    gw_argv = [sys.executable, "-m", "igw", "run", "--listen", f"127.0.0.1:{opts.gateway_port}",
               "--admin-port", str(admin_port), "--grpc-port", str(grpc_port),
               "--grpc-health-port", str(grpc_health_port), "--metrics-port", str(metrics_port),
               "--model", MODEL]  # fmt: skip
    for port in sim_ports:
        gw_argv += ["--endpoint", f"127.0.0.1:{port}"]
    gateway = Child("gateway", gw_argv, logs / "gateway.log")
    url = f"http://127.0.0.1:{opts.gateway_port}"
    try:
        with console.status(f"starting {opts.servers} simulated vLLM servers..."):
            await sim.start("igw-sim: ready", timeout=60)
        with console.status("starting the endpoint picker and Envoy..."):
            await gateway.start("igw: gateway ready", timeout=90)
        console.print(
            f"[bold green]gateway up[/] at {url} -> {opts.servers} servers on ports {sim_ports}", soft_wrap=True
        )
        specs = workload(opts.requests, opts.seed)
        results: list[Result]
        with Progress(
            TextColumn("sending a mixed workload"), BarColumn(), MofNCompleteColumn(),
            TextColumn("errors: {task.fields[errors]}"), TimeElapsedColumn(), console=console,
        ) as progress:  # fmt: skip
            task = progress.add_task("load", total=len(specs), errors=0)
            errors = 0

            def tick(r: Result) -> None:
                nonlocal errors
                errors += 0 if r.ok else 1
                progress.update(task, advance=1, errors=errors)

            results = await run_closed_loop(
                url, specs, concurrency=opts.concurrency, deadline_s=opts.duration_s, on_result=tick
            )
        console.print(summary_table(results))
        console.print("* time to first token, over the streamed requests", style="dim")
        console.print(
            f"{cached_share(results):.0f}% of the prompt tokens were already in the chosen server's prefix cache "
            "(requests that share a system prompt go where it is cached)"
        )
        ok = [r for r in results if r.ok]
        e2e = [r.e2e_s * 1000 for r in ok]
        statuses = Counter(r.status for r in results if not r.ok)
        console.print(
            f"{len(ok)}/{len(results)} requests succeeded; end-to-end p50 {percentile(e2e, 50):.0f} ms, "
            f"p90 {percentile(e2e, 90):.0f} ms" + (f"; failures by status: {dict(statuses)}" if statuses else "")
        )
        console.print("\nSend your own request through the gateway:")
        console.print(
            f"  curl -s {url}/v1/chat/completions -H 'content-type: application/json' \\\n"
            f"    -d '{{\"model\": \"{MODEL}\", \"messages\": [{{\"role\": \"user\", \"content\": \"hello\"}}]}}'",
            markup=False, highlight=False, soft_wrap=True,
        )  # fmt: skip
        if opts.keep_running:
            console.print("\n[bold]--keep-running[/]: the gateway stays up; Ctrl-C to stop.")
            await asyncio.Event().wait()
        served = {r.endpoint for r in ok if r.endpoint}
        return 0 if ok and len(ok) == len(results) and len(served) > 1 else 1
    finally:
        await gateway.stop()
        await sim.stop()


def run_demo(opts: DemoOptions) -> int:
    console = Console()
    try:
        with tempfile.TemporaryDirectory(prefix="igw-demo-") as logs:
            return asyncio.run(_demo(opts, console, Path(logs)))
    except KeyboardInterrupt:
        return 130
    except (RuntimeError, TimeoutError) as exc:
        console.print(f"[bold red]demo failed:[/] {exc}")
        return 1
