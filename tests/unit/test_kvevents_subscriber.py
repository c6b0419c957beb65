"""KVEventSubscriber against the simulator's real ZMQ publisher over loopback: bind and connect modes,
gaps with and without replay, cache resets, pool changes; and its sequencing rules message by message."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest
import zmq
import zmq.asyncio
from prometheus_client import CollectorRegistry

from igw.datalayer.kvevents.index import KVBlockIndex
from igw.datalayer.kvevents.metrics import KVEventMetrics
from igw.datalayer.kvevents.subscriber import KVEventSubscriber, publisher_address
from igw_sim import kvevents as sim
from igw_sim.kvpublisher import ZmqEventPublisher, default_topic

EP_A, EP_B = "127.0.0.1:8001", "127.0.0.1:8002"
BS = 4
TOKENS = list(range(1000, 1032))  # 8 blocks
ANY_PORT = "tcp://127.0.0.1:*"


def h(i: int) -> bytes:
    """An engine block hash whose int form is ``i``."""
    return i.to_bytes(32, "big")


def stored(
    first: int, n: int, *, start_block: int = 0, parent: int | None = None, tokens: list[int] = TOKENS
) -> sim.BlockStored:
    """Blocks ``start_block..start_block+n-1`` of ``tokens`` with engine hashes ``first, first+1, ...``."""
    return sim.BlockStored(
        block_hashes=tuple(h(first + i) for i in range(n)),
        parent_block_hash=None if parent is None else h(parent),
        token_ids=tuple(tokens[start_block * BS : (start_block + n) * BS]),
        block_size=BS,
        lora_id=None,
        lora_name=None,
        extra_keys=(None,) * n,
    )


PROBE = sim.BlockRemoved(block_hashes=(h(2**40),))  # harmless: a hash nobody stored


class Env:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.metrics = KVEventMetrics(self.registry)
        self.index = KVBlockIndex()
        self.metrics.watch_index(self.index)
        self.keys = self.index.request_keys(TOKENS, BS)
        self.publishers: list[ZmqEventPublisher] = []

    def value(self, name: str, **labels: str) -> float:
        return self.registry.get_sample_value(name, labels) or 0.0

    def blocks(self, keys: list[int] | None = None) -> dict[str, int]:
        return {ep: m.blocks for ep, m in self.index.match_prefix(keys or self.keys, [EP_A, EP_B]).items()}

    def publisher(self, endpoint: str, address: str, **kw: Any) -> ZmqEventPublisher:
        pub = ZmqEventPublisher(endpoint=address, topic=default_topic(endpoint, "tiny"), **kw)
        self.publishers.append(pub)
        return pub

    async def warm(self, pub: ZmqEventPublisher) -> None:
        """Publish probes until one arrives (a ZMQ connection drops what is sent before it is up)."""
        before = self.value("igw_kv_events_received_total")
        deadline = time.monotonic() + 5
        while self.value("igw_kv_events_received_total") == before:
            assert time.monotonic() < deadline, "the publisher never reached the subscriber"
            pub.publish([PROBE])
            await asyncio.sleep(0.02)
        await self.settle()

    async def settle(self) -> None:
        await asyncio.sleep(0.1)


@pytest.fixture
async def env() -> AsyncIterator[Env]:
    e = Env()
    yield e
    for pub in e.publishers:
        await pub.aclose()


async def eventually(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.01)


class _LossySocket:
    def send_multipart(self, frames: list[bytes], flags: int = 0) -> None:
        pass  # lost on the way


@contextlib.contextmanager
def losing(pub: ZmqEventPublisher) -> Iterator[None]:
    """Messages published inside are lost (the publisher still numbers and buffers them for replay)."""
    real = pub._pub
    pub._pub = _LossySocket()  # type: ignore[assignment]
    try:
        yield
    finally:
        pub._pub = real


# -- end to end over loopback --------------------------------------------------------------------------


async def test_bind_mode_two_engines_both_encodings(env: Env) -> None:
    async with KVEventSubscriber(env.index, bind=ANY_PORT, metrics=env.metrics) as sub:
        address = sub.bound_endpoint
        assert address is not None
        assert address.startswith("tcp://127.0.0.1:")
        a = env.publisher(EP_A, address, event_format="map")
        b = env.publisher(EP_B, address, event_format="array", int_hashes=False)
        await env.warm(a)
        await env.warm(b)
        a.publish([stored(1, 4)])
        b.publish([stored(101, 2), stored(103, 1, start_block=2, parent=102)])
        await eventually(lambda: env.blocks() == {EP_A: 4, EP_B: 3})
        assert env.value("igw_kv_events_applied_total", type="BlockStored") == 3
        assert env.value("igw_kv_events_index_keys") == 4
        assert env.value("igw_kv_events_decode_errors_total") == 0
        assert env.index.block_sizes() == {EP_A: BS, EP_B: BS}


async def test_connect_mode_follows_the_pool(env: Env) -> None:
    a = env.publisher(EP_A, ANY_PORT)  # a wildcard endpoint: the engine binds
    b = env.publisher(EP_B, ANY_PORT)
    async with KVEventSubscriber(env.index, metrics=env.metrics) as sub:
        sub.set_publishers({EP_A: a.bound_endpoint})
        await env.warm(a)
        a.publish([stored(1, 3)])
        await eventually(lambda: env.blocks() == {EP_A: 3})

        sub.set_publishers({EP_A: a.bound_endpoint, EP_B: b.bound_endpoint})
        await env.warm(b)
        b.publish([stored(1, 2)])
        await eventually(lambda: env.blocks() == {EP_A: 3, EP_B: 2})

        sub.set_publishers({EP_B: b.bound_endpoint})  # A left the pool: its entries go at once
        assert env.blocks() == {EP_B: 2}
        assert EP_A not in env.index.endpoints()
        a.publish([stored(1, 4)])
        b.publish([stored(3, 1, start_block=2, parent=2)])
        await eventually(lambda: env.blocks() == {EP_B: 3})
        assert EP_A not in env.blocks()


async def test_gap_is_filled_by_replay(env: Env) -> None:
    async with KVEventSubscriber(env.index, bind=ANY_PORT, metrics=env.metrics) as sub:
        assert sub.bound_endpoint is not None
        a = env.publisher(EP_A, sub.bound_endpoint, replay_endpoint=ANY_PORT)
        assert a.replay_bound_endpoint is not None
        sub.set_replay_endpoints({EP_A: a.replay_bound_endpoint})
        await env.warm(a)
        replays_before = env.value("igw_kv_events_replays_total", outcome="ok")
        a.publish([stored(1, 6)])
        await eventually(lambda: env.blocks() == {EP_A: 6})
        with losing(a):
            a.publish([sim.BlockRemoved(block_hashes=(h(3),))])  # lost: only a replay can tell
        other = list(range(5000, 5008))
        a.publish([stored(50, 2, tokens=other)])
        await eventually(lambda: env.blocks(env.index.request_keys(other, BS)) == {EP_A: 2})
        assert env.blocks() == {EP_A: 2}  # the lost removal was applied, the rest kept
        assert env.value("igw_kv_events_gaps_total") == 1
        assert env.value("igw_kv_events_replays_total", outcome="ok") == replays_before + 1
        assert env.value("igw_kv_events_endpoint_clears_total") == 0


async def test_gap_without_replay_clears_the_endpoint(env: Env) -> None:
    async with KVEventSubscriber(env.index, bind=ANY_PORT, metrics=env.metrics) as sub:
        assert sub.bound_endpoint is not None
        a = env.publisher(EP_A, sub.bound_endpoint)
        b = env.publisher(EP_B, sub.bound_endpoint)
        await env.warm(a)
        await env.warm(b)
        a.publish([stored(1, 6)])
        b.publish([stored(1, 6)])
        await eventually(lambda: env.blocks() == {EP_A: 6, EP_B: 6})
        with losing(a):
            a.publish([sim.BlockRemoved(block_hashes=(h(3),))])
        a.publish([stored(50, 1, tokens=[7] * 4)])
        await eventually(lambda: env.blocks(env.index.request_keys([7] * 4, BS)) == {EP_A: 1})
        assert env.blocks() == {EP_B: 6}  # A's possibly stale entries are gone, B's untouched
        assert env.value("igw_kv_events_gaps_total") == 1
        assert env.value("igw_kv_events_endpoint_clears_total") == 1


async def test_joining_late_replays_from_the_start(env: Env) -> None:
    a = env.publisher(EP_A, ANY_PORT, replay_endpoint=ANY_PORT)
    a.publish([stored(1, 2)])  # nobody listens yet: lost, but buffered
    a.publish([stored(3, 2, start_block=2, parent=2)])
    async with KVEventSubscriber(env.index, metrics=env.metrics) as sub:
        assert a.replay_bound_endpoint is not None
        sub.set_replay_endpoints({EP_A: a.replay_bound_endpoint})
        sub.set_publishers({EP_A: a.bound_endpoint})
        await env.warm(a)
        assert env.blocks() == {EP_A: 4}
        assert env.value("igw_kv_events_replays_total", outcome="ok") == 1
        assert env.value("igw_kv_events_gaps_total") == 0


async def test_all_blocks_cleared_over_the_wire(env: Env) -> None:
    async with KVEventSubscriber(env.index, bind=ANY_PORT, metrics=env.metrics) as sub:
        assert sub.bound_endpoint is not None
        a = env.publisher(EP_A, sub.bound_endpoint)
        b = env.publisher(EP_B, sub.bound_endpoint)
        await env.warm(a)
        await env.warm(b)
        a.publish([stored(1, 3)])
        b.publish([stored(1, 5)])
        await eventually(lambda: env.blocks() == {EP_A: 3, EP_B: 5})
        b.publish([sim.AllBlocksCleared(), stored(9, 1)])
        await eventually(lambda: env.blocks() == {EP_A: 3, EP_B: 1})
        assert env.value("igw_kv_events_applied_total", type="AllBlocksCleared") == 1


async def test_endpoints_outside_the_pool_are_ignored(env: Env) -> None:
    async with KVEventSubscriber(env.index, bind=ANY_PORT, metrics=env.metrics) as sub:
        assert sub.bound_endpoint is not None
        a = env.publisher(EP_A, sub.bound_endpoint)
        await env.warm(a)
        a.publish([stored(1, 3)])
        await eventually(lambda: env.blocks() == {EP_A: 3})
        sub.set_known_endpoints([EP_B])  # A left the pool
        assert env.blocks() == {}
        before = env.value("igw_kv_events_dropped_unknown_endpoint_total")
        a.publish([stored(1, 3)])
        await eventually(lambda: env.value("igw_kv_events_dropped_unknown_endpoint_total") == before + 1)
        assert env.blocks() == {}
        sub.set_known_endpoints(None)
        a.publish([stored(1, 2)])
        await eventually(lambda: env.blocks() == {EP_A: 2})


async def test_garbage_on_the_wire_is_counted_and_survived(env: Env) -> None:
    async with KVEventSubscriber(env.index, bind=ANY_PORT, metrics=env.metrics) as sub:
        assert sub.bound_endpoint is not None
        ctx = zmq.asyncio.Context()
        raw = ctx.socket(zmq.PUB)
        raw.setsockopt(zmq.LINGER, 0)
        try:
            raw.connect(sub.bound_endpoint)
            deadline = time.monotonic() + 5
            while env.value("igw_kv_events_decode_errors_total") == 0:
                assert time.monotonic() < deadline
                await raw.send_multipart([b"kv@127.0.0.1:8001@tiny", b"\x00" * 8, b"\xc1garbage"])
                await asyncio.sleep(0.02)
            await raw.send_multipart([b"kv@127.0.0.1:8001@tiny", b"short"])
            await raw.send_multipart([b"kv@not-an-endpoint@tiny", b"\x00" * 8, sim.encode_batch(0.0, [PROBE])])
            await raw.send_multipart([b"other-topic", b"\x00" * 8, b""])  # not subscribed
            a = env.publisher(EP_A, sub.bound_endpoint)
            await env.warm(a)
            a.publish([stored(1, 2)])
            await eventually(lambda: env.blocks() == {EP_A: 2})
            assert env.value("igw_kv_events_decode_errors_total") >= 3
        finally:
            raw.close(linger=0)
            ctx.term()


async def test_replay_timeout_clears_the_endpoint(env: Env) -> None:
    ctx = zmq.asyncio.Context()
    silent = ctx.socket(zmq.ROUTER)  # takes replay requests, never answers
    silent.setsockopt(zmq.LINGER, 0)
    silent.bind(ANY_PORT)
    try:
        async with KVEventSubscriber(env.index, bind=ANY_PORT, metrics=env.metrics, replay_timeout_s=0.2) as sub:
            sub.set_replay_endpoints({EP_A: silent.getsockopt_string(zmq.LAST_ENDPOINT)})
            await sub.handle(_frames(EP_A, 0, [stored(1, 4)]))
            assert env.blocks() == {EP_A: 4}
            await sub.handle(_frames(EP_A, 5, [stored(9, 1, tokens=[7] * 4)]))
            assert env.value("igw_kv_events_replays_total", outcome="timeout") == 1
            assert env.value("igw_kv_events_endpoint_clears_total") == 1
            assert env.blocks() == {}
            assert env.blocks(env.index.request_keys([7] * 4, BS)) == {EP_A: 1}
    finally:
        silent.close(linger=0)
        ctx.term()


async def test_stop_is_idempotent_and_restartable(env: Env) -> None:
    sub = KVEventSubscriber(env.index, bind=ANY_PORT, metrics=env.metrics)
    await sub.stop()
    await sub.start()
    await sub.start()
    await sub.stop()
    await sub.stop()
    assert sub.bound_endpoint is None


# -- sequencing, message by message --------------------------------------------------------------------


def _frames(endpoint: str, seq: int, events: list[sim.KVEvent], *, rank: int = 0, ts: float = 1.0) -> list[bytes]:
    topic = default_topic(endpoint, "tiny").encode()
    return [topic, seq.to_bytes(8, "big"), sim.encode_batch(ts, events, data_parallel_rank=rank)]


def _sub(env: Env, **kw: Any) -> KVEventSubscriber:
    return KVEventSubscriber(env.index, bind=ANY_PORT, metrics=env.metrics, **kw)  # never started


async def test_duplicates_are_dropped(env: Env) -> None:
    sub = _sub(env)
    await sub.handle(_frames(EP_A, 3, [stored(1, 2)]))  # the first message of a stream may start anywhere
    await sub.handle(_frames(EP_A, 4, [sim.BlockRemoved(block_hashes=(h(2),))]))
    await sub.handle(_frames(EP_A, 3, [stored(1, 2)]))  # a late duplicate must not resurrect block 2
    await sub.handle(_frames(EP_A, 0, [stored(1, 2)], ts=0.5))  # an older one either
    assert env.blocks() == {EP_A: 1}
    assert env.value("igw_kv_events_duplicates_total") == 2
    assert env.value("igw_kv_events_gaps_total") == 0


@pytest.mark.parametrize(
    ("restart_seq", "ts"), [(0, 2.0), (55, 2.0), (40, 1.0)], ids=["seq-zero", "newer-batch", "far-behind"]
)
async def test_engine_restart_starts_the_stream_over(env: Env, restart_seq: int, ts: float) -> None:
    sub = _sub(env, restart_window=10)
    await sub.handle(_frames(EP_A, 60, [stored(1, 4)]))
    await sub.handle(_frames(EP_A, restart_seq, [stored(7, 1, tokens=[7] * 4)], ts=ts))
    assert env.blocks() == {}  # the restarted engine's cache is empty
    assert env.blocks(env.index.request_keys([7] * 4, BS)) == {EP_A: 1}
    await sub.handle(_frames(EP_A, restart_seq + 1, [stored(8, 1, tokens=[8] * 4)], ts=ts))
    assert env.value("igw_kv_events_gaps_total") == 0
    assert env.value("igw_kv_events_endpoint_clears_total") == 1


async def test_data_parallel_ranks_are_separate_streams(env: Env) -> None:
    sub = _sub(env)
    await sub.handle(_frames(EP_A, 0, [stored(1, 2)], rank=0))
    await sub.handle(_frames(EP_A, 0, [stored(3, 1, start_block=2, parent=2)], rank=1))
    await sub.handle(_frames(EP_A, 1, [stored(4, 1, start_block=3, parent=3)], rank=0))
    assert env.blocks() == {EP_A: 4}
    assert env.value("igw_kv_events_duplicates_total") == 0
    assert env.value("igw_kv_events_endpoint_clears_total") == 0


async def test_connect_mode_accepts_only_its_publishers(env: Env) -> None:
    sub = KVEventSubscriber(env.index, metrics=env.metrics)
    sub.set_publishers({EP_A: "tcp://127.0.0.1:1"})
    await sub.handle(_frames(EP_B, 0, [stored(1, 2)]))
    await sub.handle(_frames(EP_A, 0, [stored(1, 3)]))
    assert env.blocks() == {EP_A: 3}
    assert env.value("igw_kv_events_dropped_unknown_endpoint_total") == 1


async def test_unknown_event_types_are_counted(env: Env) -> None:
    import msgpack

    payload = msgpack.packb([1.0, [{"type": "SomethingNew"}, ["AllBlocksCleared"]], 0])
    await _sub(env).handle([default_topic(EP_A, "m").encode(), b"\x00" * 8, payload])
    assert env.value("igw_kv_events_skipped_unknown_type_total") == 1
    assert env.value("igw_kv_events_applied_total", type="AllBlocksCleared") == 1


@pytest.mark.parametrize(
    ("template", "endpoint", "offset", "expected"),
    [
        ("tcp://{host}:{kv_port}", "10.0.0.5:8000", -2443, "tcp://10.0.0.5:5557"),
        ("tcp://{host}:5557", "[fd00::1]:8000", 0, "tcp://[fd00::1]:5557"),
        ("tcp://{host}:{port}", "pod.ns:9", 0, "tcp://pod.ns:9"),
    ],
    ids=["offset", "ipv6-fixed-port", "same-port"],
)
def test_publisher_address(template: str, endpoint: str, offset: int, expected: str) -> None:
    assert publisher_address(template, endpoint, port_offset=offset) == expected
