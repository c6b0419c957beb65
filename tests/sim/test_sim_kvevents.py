"""KV-cache events on the wire: a decoder written from vLLM's format spec, over loopback ZMQ."""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import msgpack
import pytest
import zmq
import zmq.asyncio

from igw_sim.config import EngineConfig
from igw_sim.fleet import SimFleet
from igw_sim.hashing import BlockHasher, to_int
from igw_sim.kvevents import AllBlocksCleared, BlockRemoved, BlockStored, encode_batch
from igw_sim.kvpublisher import KVEventsConfig, offset_endpoint, should_bind

# -- a consumer written from the spec (reference/scheduling-anchors.md §3.2, vllm-cpu.md §6) -------------

FIELDS = {
    "BlockStored": [
        "block_hashes", "parent_block_hash", "token_ids", "block_size", "lora_id", "medium", "lora_name",
        "extra_keys", "group_idx", "kv_cache_spec_kind", "kv_cache_spec_sliding_window",
    ],
    "BlockRemoved": ["block_hashes", "medium", "group_idx"],
    "AllBlocksCleared": [],
}  # fmt: skip


def decode_event(raw: Any) -> dict[str, Any]:
    """A map event is taken as is; an array event is read positionally (trailing fields may be absent)."""
    if isinstance(raw, dict):
        return dict(raw)
    tag, *values = raw
    return {"type": tag, **dict(zip(FIELDS[tag], values, strict=False))}


def decode_payload(payload: bytes) -> tuple[float, list[dict[str, Any]], int | None]:
    batch = msgpack.unpackb(payload, raw=False)
    ts, events = batch[0], batch[1]
    rank = batch[2] if len(batch) > 2 else None
    return ts, [decode_event(e) for e in events], rank


def decode_message(frames: list[bytes]) -> tuple[str, int, list[dict[str, Any]]]:
    topic, seq, payload = frames
    assert len(seq) == 8
    _, events, rank = decode_payload(payload)
    assert rank == 0
    return topic.decode(), int.from_bytes(seq, "big"), events


# -- encoding --------------------------------------------------------------------------------------------

STORED = BlockStored(
    block_hashes=(b"\x01" * 32, b"\x02" * 32),
    parent_block_hash=None,
    token_ids=tuple(range(8)),
    block_size=4,
    lora_id=None,
    lora_name=None,
    extra_keys=(None, None),
)


def test_map_encoding_tags_events_and_omits_defaults() -> None:
    ts, (stored, removed, cleared), rank = decode_payload(
        encode_batch(12.5, [STORED, BlockRemoved(block_hashes=(b"\x03" * 32,)), AllBlocksCleared()])
    )
    assert (ts, rank) == (12.5, 0)
    assert stored == {
        "type": "BlockStored",
        "block_hashes": [to_int(b"\x01" * 32), to_int(b"\x02" * 32)],
        "parent_block_hash": None,
        "token_ids": list(range(8)),
        "block_size": 4,
        "lora_id": None,
        "medium": "GPU",
        "lora_name": None,
        "extra_keys": [None, None],
        "group_idx": 0,
        "kv_cache_spec_kind": "full_attention",
    }
    assert removed == {"type": "BlockRemoved", "block_hashes": [to_int(b"\x03" * 32)], "medium": "GPU", "group_idx": 0}
    assert cleared == {"type": "AllBlocksCleared"}


def test_array_encoding_is_positional_and_bytes_hashes_are_raw() -> None:
    payload = encode_batch(1.0, [STORED, AllBlocksCleared()], fmt="array", int_hashes=False)
    raw = msgpack.unpackb(payload, raw=False)
    assert raw[1][0][:4] == ["BlockStored", [b"\x01" * 32, b"\x02" * 32], None, list(range(8))]
    assert raw[1][1] == ["AllBlocksCleared"]
    _, (stored, _), _ = decode_payload(payload)
    assert stored["block_size"] == 4
    assert stored["medium"] == "GPU"
    assert stored["kv_cache_spec_kind"] == "full_attention"


@pytest.mark.parametrize(
    ("endpoint", "offset", "bind", "expected"),
    [
        ("tcp://127.0.0.1:5557", 2, False, "tcp://127.0.0.1:5557"),
        ("tcp://*:5557", 2, True, "tcp://*:5557"[:-4] + "5559"),
        ("tcp://127.0.0.1:*", 1, True, "tcp://127.0.0.1:*"),
        ("ipc:///tmp/kv", 1, True, "ipc:///tmp/kv_dp1"),
    ],
    ids=["connect", "bind", "wildcard-port", "ipc"],
)
def test_endpoint_rules(endpoint: str, offset: int, bind: bool, expected: str) -> None:
    assert should_bind(endpoint) is bind
    assert offset_endpoint(endpoint, offset) == expected


def test_replay_endpoints_are_always_bound_so_always_offset() -> None:
    assert offset_endpoint("tcp://127.0.0.1:5600", 3, bound=True) == "tcp://127.0.0.1:5603"


# -- over the wire ---------------------------------------------------------------------------------------

CONFIG = EngineConfig(
    max_num_seqs=4, prefill_overhead_ms=1, prefill_ms_per_token=0, itl_ms=1, hash_algo="sha256_cbor", hash_seed="0"
)


@pytest.fixture
async def sub() -> AsyncIterator[zmq.asyncio.Socket]:
    ctx = zmq.asyncio.Context.instance()
    sock = ctx.socket(zmq.SUB)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SUBSCRIBE, b"")
    sock.bind("tcp://127.0.0.1:*")
    try:
        yield sock
    finally:
        sock.close(linger=0)


def _last_endpoint(sock: zmq.asyncio.Socket) -> str:
    value = sock.getsockopt(zmq.LAST_ENDPOINT)
    assert isinstance(value, bytes)
    return value.decode()


async def _recv(sock: zmq.asyncio.Socket, timeout: float = 2.0) -> list[bytes]:
    frames = await asyncio.wait_for(sock.recv_multipart(), timeout)
    return list(frames)


async def _connected(sub: zmq.asyncio.Socket, session: aiohttp.ClientSession, base: str) -> int:
    """PUB/SUB drops messages until the subscription has reached the publisher: probe with cache resets
    (each publishes one AllBlocksCleared) until one arrives. Returns the next sequence number."""
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        async with session.post(base + "/reset_prefix_cache") as r:
            assert r.status == 200
        if await sub.poll(50):
            _, seq, events = decode_message(await _recv(sub))
            assert events == [{"type": "AllBlocksCleared"}]
            while await sub.poll(50):  # later probes
                _, seq, _ = decode_message(await _recv(sub))
            return seq + 1
    raise AssertionError("the subscriber never received a probe")


async def test_events_are_published_with_topic_sequence_and_recomputable_hashes(sub: zmq.asyncio.Socket) -> None:
    kv = KVEventsConfig(endpoint=_last_endpoint(sub), replay_endpoint="tcp://127.0.0.1:*")
    async with SimFleet(ports=[0], engine=CONFIG, kv_events=kv) as fleet, aiohttp.ClientSession() as session:
        base = f"http://{fleet.addresses[0]}"
        next_seq = await _connected(sub, session, base)
        prompt = " ".join(f"w{i}" for i in range(40))  # 40 tokens: 2 full blocks of 16
        async with session.post(base + "/tokenize", json={"prompt": prompt}) as r:
            ids = (await r.json())["tokens"]
        async with session.post(base + "/v1/completions", json={"prompt": prompt, "max_tokens": 1}) as r:
            assert (await r.json())["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
        topic, seq, events = decode_message(await _recv(sub))
        assert topic == f"kv@{fleet.addresses[0]}@sim-model"
        assert seq == next_seq
        hashes = [to_int(h) for h in BlockHasher(algo="sha256_cbor", seed="0", block_size=16).hash_prefix(ids)]
        assert events == [
            {
                "type": "BlockStored",
                "block_hashes": hashes,
                "parent_block_hash": None,
                "token_ids": ids[:32],
                "block_size": 16,
                "lora_id": None,
                "medium": "GPU",
                "lora_name": None,
                "extra_keys": [None, None],
                "group_idx": 0,
                "kv_cache_spec_kind": "full_attention",
            }
        ]
        # The same prompt again: a prefix hit, nothing new to store (the 8-token tail is partial).
        async with session.post(base + "/v1/completions", json={"prompt": prompt, "max_tokens": 1}) as r:
            assert (await r.json())["usage"]["prompt_tokens_details"]["cached_tokens"] == 32
        assert not await sub.poll(100)

        # Replay from the first real batch: the buffered payloads, then the end marker.
        publisher = fleet.servers[0].kv_publisher
        assert publisher is not None
        assert publisher.replay_bound_endpoint is not None
        dealer = zmq.asyncio.Context.instance().socket(zmq.DEALER)
        dealer.setsockopt(zmq.LINGER, 0)
        try:
            dealer.connect(publisher.replay_bound_endpoint)
            await dealer.send_multipart([b"", (next_seq - 1).to_bytes(8, "big")])
            replies = [await _recv(dealer) for _ in range(3)]
        finally:
            dealer.close(linger=0)
        assert [r[0] for r in replies] == [b""] * 3
        assert [int.from_bytes(r[1], "big", signed=True) for r in replies] == [next_seq - 1, next_seq, -1]
        assert decode_payload(replies[0][2])[1] == [{"type": "AllBlocksCleared"}]
        assert decode_payload(replies[1][2])[1] == events
        assert replies[2][2] == b""


async def test_eviction_and_lora_events_in_array_format(sub: zmq.asyncio.Socket) -> None:
    cfg = CONFIG.replace(kv_blocks=5, lora_modules=(("lora-a", "/adapters/a"),))  # 4 usable, one null block
    kv = KVEventsConfig(endpoint=_last_endpoint(sub), event_format="array")
    async with SimFleet(ports=[0], engine=cfg, kv_events=kv) as fleet, aiohttp.ClientSession() as session:
        base = f"http://{fleet.addresses[0]}"
        await _connected(sub, session, base)
        first = " ".join(f"a{i}" for i in range(33))  # 3 blocks while running, 2 of them full
        second = " ".join(f"b{i}" for i in range(48))  # 3 full blocks
        async with session.post(base + "/v1/completions", json={"prompt": first, "max_tokens": 1}) as r:
            assert r.status == 200
        _, _, (stored_a,) = decode_message(await _recv(sub))
        body = {"model": "lora-a", "prompt": second, "max_tokens": 1}
        async with session.post(base + "/v1/completions", json=body) as r:
            assert r.status == 200
        _, _, events = decode_message(await _recv(sub))
    # The first request's blocks were freed in reverse: its partial tail block (no hash) to the front,
    # its full ones behind the never-used 4th block. So the tail block goes first (no event), then the
    # never-used block, then its second full block, evicted.
    assert [e["type"] for e in events] == ["BlockRemoved", "BlockStored"]
    assert events[0]["block_hashes"] == [stored_a["block_hashes"][1]]
    lora_stored = events[1]
    assert lora_stored["lora_name"] == "lora-a"
    assert lora_stored["lora_id"] == 1
    assert lora_stored["extra_keys"] == [["lora-a"]] * 3
    assert len(lora_stored["token_ids"]) == 48


def test_hash_seed_changes_every_hash() -> None:
    a = BlockHasher(algo="sha256_cbor", seed="0").none_hash
    assert a == hashlib.sha256(b"\x610").digest()
