"""Decoding vLLM KV-event messages: real vLLM 0.32 payloads, both event encodings, malformed input."""

from __future__ import annotations

import base64
import hashlib
import json
from pathlib import Path
from typing import Any

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from igw.datalayer.kvevents import wire
from igw.datalayer.kvevents.wire import (
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    KVEventDecodeError,
    decode_event,
    decode_message,
    decode_payload,
    hash_to_int,
    parse_topic,
)
from igw_sim import kvevents as sim
from igw_sim.hashing import to_int

DATA = Path(__file__).parents[1] / "sim" / "data" / "vllm-0.32-cpu"


def _fixture() -> dict[str, Any]:
    doc: dict[str, Any] = json.loads((DATA / "steps.json").read_text())
    return doc


def _payload(i: int) -> tuple[str, int, bytes]:
    p = _fixture()["payloads"][i]
    return p["topic"], p["seq"], base64.b64decode(p["payload_b64"])


def _h(i: int) -> bytes:
    return hashlib.sha256(str(i).encode()).digest()


# -- real vLLM payloads -------------------------------------------------------------------------------


def test_real_block_stored_payload() -> None:
    topic, seq, payload = _payload(0)
    msg = decode_message([topic.encode(), seq.to_bytes(8, "big"), payload])
    assert (msg.topic, msg.seq, msg.batch.data_parallel_rank, msg.batch.skipped) == (topic, seq, 0, 0)
    (event,) = msg.batch.events
    want = _fixture()["steps"][0]["events"][0]  # decoded by tools/vllm/validate_sim.py from the same message
    assert isinstance(event, BlockStored)
    assert event.block_hashes == tuple(want["block_hashes"])
    assert event.parent is None
    assert event.token_ids == tuple(want["token_ids"])
    assert (event.block_size, event.medium, event.lora_name, event.lora_id, event.group_idx) == (
        32,
        "GPU",
        None,
        None,
        0,
    )
    assert event.extra_keys == (None,) * 11
    assert len(event.token_ids) == event.block_size * len(event.block_hashes)
    assert max(event.block_hashes) >= 2**63  # uint64, not int64


def test_real_lora_payload() -> None:
    _, _, payload = _payload(1)
    (event,) = decode_payload(payload).events
    assert isinstance(event, BlockStored)
    assert (event.lora_name, event.lora_id) == ("lora-a", 1)
    assert event.extra_keys == (("lora-a",),) * len(event.block_hashes)


def test_real_removal_payload() -> None:
    _, _, payload = _payload(2)
    events = decode_payload(payload).events
    removed = [e for e in events if isinstance(e, BlockRemoved)]
    assert len(removed) == 11
    assert all(len(e.block_hashes) == 1 and e.medium == "GPU" for e in removed)
    assert isinstance(events[-1], BlockStored)


def test_every_captured_event_decodes_like_the_reference_decoder() -> None:
    """steps.json holds every event of the run as vLLM sent it (map-encoded); re-packed, they decode back."""
    n = 0
    for step in _fixture()["steps"]:
        for raw in step["events"]:
            event = decode_event(msgpack.unpackb(msgpack.packb(raw)))
            if raw["type"] == "BlockStored":
                assert isinstance(event, BlockStored)
                assert event.block_hashes == tuple(raw["block_hashes"])
                assert event.parent == raw["parent_block_hash"]
            else:
                assert isinstance(event, BlockRemoved)
                assert event.block_hashes == tuple(raw["block_hashes"])
            n += 1
    assert n > 50


def test_real_topic() -> None:
    topic, _, _ = _payload(0)
    assert parse_topic(topic) == ("127.0.0.1:58363", "tiny")


# -- both encodings, as the simulator's publisher writes them ------------------------------------------

SIM_EVENTS: list[sim.KVEvent] = [
    sim.BlockStored(
        block_hashes=(_h(1), _h(2)),
        parent_block_hash=_h(0),
        token_ids=tuple(range(8)),
        block_size=4,
        lora_id=3,
        lora_name="ad",
        extra_keys=(("ad",), ("ad",)),
        medium="CPU",
    ),
    sim.BlockStored(
        block_hashes=(_h(3),),
        parent_block_hash=None,
        token_ids=(1, 2, 3, 4),
        block_size=4,
        lora_id=None,
        lora_name=None,
        extra_keys=(None,),
    ),
    sim.BlockRemoved(block_hashes=(_h(1), _h(3))),
    sim.AllBlocksCleared(),
]


@pytest.mark.parametrize("fmt", ["map", "array"])
@pytest.mark.parametrize("int_hashes", [True, False], ids=["int-hashes", "byte-hashes"])
def test_sim_encodings(fmt: sim.EventFormat, int_hashes: bool) -> None:
    batch = decode_payload(sim.encode_batch(12.5, SIM_EVENTS, fmt=fmt, int_hashes=int_hashes, data_parallel_rank=2))
    assert (batch.ts, batch.data_parallel_rank) == (12.5, 2)
    assert batch.events == (
        BlockStored(
            block_hashes=(to_int(_h(1)), to_int(_h(2))),
            parent=to_int(_h(0)),
            token_ids=tuple(range(8)),
            block_size=4,
            lora_name="ad",
            medium="CPU",
            lora_id=3,
            extra_keys=(("ad",), ("ad",)),
        ),
        BlockStored(
            block_hashes=(to_int(_h(3)),), parent=None, token_ids=(1, 2, 3, 4), block_size=4, extra_keys=(None,)
        ),
        BlockRemoved(block_hashes=(to_int(_h(1)), to_int(_h(3))), medium="GPU"),
        AllBlocksCleared(),
    )


def test_array_length_guards_and_newer_fields() -> None:
    """Old engines omit trailing fields; newer ones add fields this decoder does not know."""
    short = ["BlockStored", [1, 2], None, [5, 6, 7, 8], 2]
    longer = ["BlockStored", [1], 9, [5, 6], 2, None, "cpu", "x", [["x"]], 0, "full_attention", None, "future"]
    assert decode_event(short) == BlockStored(block_hashes=(1, 2), parent=None, token_ids=(5, 6, 7, 8), block_size=2)
    assert decode_event(longer) == BlockStored(
        block_hashes=(1,), parent=9, token_ids=(5, 6), block_size=2, lora_name="x", medium="cpu", extra_keys=(("x",),)
    )
    assert decode_event(["BlockRemoved", [7]]) == BlockRemoved(block_hashes=(7,))
    assert decode_event(["BlockRemoved", [7], None, 1]) == BlockRemoved(block_hashes=(7,), group_idx=1)
    assert decode_event({"type": "BlockRemoved", "block_hashes": [7], "locality": "x"}) == BlockRemoved((7,))
    assert decode_event(["AllBlocksCleared", "future"]) == AllBlocksCleared()


def test_unknown_event_type_is_skipped_and_counted() -> None:
    payload = msgpack.packb([1.0, [{"type": "BlockUpdated", "x": 1}, ["Future"], ["AllBlocksCleared"]]])
    batch = decode_payload(payload)
    assert batch.events == (AllBlocksCleared(),)
    assert batch.skipped == 2
    assert batch.data_parallel_rank is None  # absent in older engines


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (5, 5),
        (2**64 - 1, 2**64 - 1),
        (-1, 2**64 - 1),
        (bytes(range(32)), int.from_bytes(bytes(range(24, 32)), "big")),
        (b"\x01\x02", 0x0102),
    ],
    ids=["int", "max-u64", "negative-masked", "sha256-bytes", "short-bytes"],
)
def test_hash_to_int(value: object, expected: int) -> None:
    assert hash_to_int(value) == expected


def test_hash_to_int_matches_the_simulators_int_form() -> None:
    assert hash_to_int(_h(7)) == to_int(_h(7))


# -- topics --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("topic", "expected"),
    [
        ("kv@10.0.0.5:8000@meta-llama/Llama-3.1-8B", ("10.0.0.5:8000", "meta-llama/Llama-3.1-8B")),
        ("kv@[::1]:8000@tiny", ("[::1]:8000", "tiny")),
        ("kv@pod-a.ns.svc:8000@m@v2", ("pod-a.ns.svc:8000", "m@v2")),
        ("kv@127.0.0.1:1@", ("127.0.0.1:1", "")),
    ],
    ids=["ipv4", "ipv6", "at-in-model", "empty-model"],
)
def test_parse_topic(topic: str, expected: tuple[str, str]) -> None:
    assert parse_topic(topic) == expected


@pytest.mark.parametrize(
    "topic",
    ["", "vllm", "kv@127.0.0.1:8000", "kv@127.0.0.1@m", "kv@127.0.0.1:99999@m", "kv@::1:8000@m", "kv@[::1:8000@m"],
    ids=["empty", "vllm-default", "no-model", "no-port", "port-range", "bare-ipv6", "unbalanced"],
)
def test_parse_topic_rejects(topic: str) -> None:
    with pytest.raises(KVEventDecodeError):
        parse_topic(topic)


# -- malformed input -----------------------------------------------------------------------------------

GOOD_STORED = {
    "type": "BlockStored",
    "block_hashes": [1],
    "parent_block_hash": None,
    "token_ids": [1, 2],
    "block_size": 2,
}


def _batch(*events: object) -> bytes:
    packed: bytes = msgpack.packb([1.0, list(events), 0])
    return packed


@pytest.mark.parametrize(
    "payload",
    [
        b"\xc1",
        msgpack.packb({"ts": 1}),
        msgpack.packb([1.0]),
        msgpack.packb(["now", []]),
        msgpack.packb([1.0, {}]),
        msgpack.packb([1.0, [], "rank"]),
        _batch(7),
        _batch([]),
        _batch([3, [1]]),
        _batch({"block_hashes": [1]}),
        _batch({**GOOD_STORED, "token_ids": None}),
        _batch({k: v for k, v in GOOD_STORED.items() if k != "token_ids"}),
        _batch({**GOOD_STORED, "token_ids": [1, "2"]}),
        _batch({**GOOD_STORED, "token_ids": [1, True]}),
        _batch({**GOOD_STORED, "block_size": 0}),
        _batch({**GOOD_STORED, "block_size": 2.0}),
        _batch({**GOOD_STORED, "block_hashes": ["ab"]}),
        _batch({**GOOD_STORED, "block_hashes": [b""]}),
        _batch({**GOOD_STORED, "block_hashes": 5}),
        _batch({**GOOD_STORED, "parent_block_hash": 1.5}),
        _batch({**GOOD_STORED, "medium": 3}),
        _batch({**GOOD_STORED, "lora_name": 3}),
        _batch({**GOOD_STORED, "lora_id": "a"}),
        _batch({**GOOD_STORED, "extra_keys": "x"}),
        _batch({**GOOD_STORED, "extra_keys": [1]}),
        _batch({**GOOD_STORED, "group_idx": "0"}),
        _batch({"type": "BlockRemoved"}),
        _batch(["BlockRemoved", [True]]),
        msgpack.packb([1.0, []]) + b"\x00",
    ],
    ids=lambda p: p.hex()[:24],
)
def test_malformed_payloads(payload: bytes) -> None:
    with pytest.raises(KVEventDecodeError):
        decode_payload(payload)


@pytest.mark.parametrize(
    "frames",
    [
        [b"kv@127.0.0.1:1@m", b"\x00" * 8],
        [b"kv@127.0.0.1:1@m", b"\x00" * 8, _batch(), b""],
        [b"kv@127.0.0.1:1@m", b"\x00" * 7, _batch()],
        [b"\xff\xfe", b"\x00" * 8, _batch()],
    ],
    ids=["two-frames", "four-frames", "short-seq", "topic-not-utf8"],
)
def test_malformed_frames(frames: list[bytes]) -> None:
    with pytest.raises(KVEventDecodeError):
        decode_message(frames)


def test_deeply_nested_extra_keys() -> None:
    """msgpack accepts ~1000 levels of nesting, deeper than Python's recursion limit for freezing them."""
    head = msgpack.packb([1.0, [{**GOOD_STORED, "extra_keys": "PLACEHOLDER"}]])
    payload = head.replace(msgpack.packb("PLACEHOLDER"), b"\x91" * 1000 + b"\xa1x")
    with pytest.raises(KVEventDecodeError, match="nested"):
        decode_payload(payload)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_random_bytes_never_crash(data: bytes) -> None:
    try:
        decode_message([b"kv@127.0.0.1:1@m", b"\x00" * 8, data])
    except KVEventDecodeError:
        pass


_msgpack_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats()
    | st.text(max_size=5)
    | st.binary(max_size=9),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4),
    max_leaves=20,
)
_event_like = st.one_of(
    st.fixed_dictionaries(
        {"type": st.sampled_from(["BlockStored", "BlockRemoved", "AllBlocksCleared"])},
        optional=dict.fromkeys(
            ("block_hashes", "parent_block_hash", "token_ids", "block_size", "medium", "extra_keys"), _msgpack_values
        ),
    ),
    st.tuples(st.sampled_from(["BlockStored", "BlockRemoved"]), _msgpack_values, _msgpack_values).map(list),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(_event_like, max_size=3))
def test_random_structures_never_crash(events: list[object]) -> None:
    try:
        wire.decode_payload(msgpack.packb([1.0, events, 0]))
    except KVEventDecodeError:
        pass
