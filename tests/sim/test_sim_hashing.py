"""Block hashes: vLLM's sha256_cbor chain recomputed from the spec with a hand-written CBOR encoder."""

from __future__ import annotations

import hashlib

import pytest
import xxhash

from igw_sim.hashing import BlockHasher, extra_keys_for, fast_hash, to_int


def _cbor_head(major: int, n: int) -> bytes:
    if n < 24:
        return bytes([major << 5 | n])
    if n < 256:
        return bytes([major << 5 | 24, n])
    if n < 65536:
        return bytes([major << 5 | 25]) + n.to_bytes(2, "big")
    return bytes([major << 5 | 26]) + n.to_bytes(4, "big")


def _cbor(obj: object) -> bytes:
    """Just enough canonical CBOR (RFC 8949) for block-hash inputs."""
    if obj is None:
        return b"\xf6"
    if isinstance(obj, int):
        assert obj >= 0
        return _cbor_head(0, obj)
    if isinstance(obj, bytes):
        return _cbor_head(2, len(obj)) + obj
    if isinstance(obj, str):
        raw = obj.encode()
        return _cbor_head(3, len(raw)) + raw
    assert isinstance(obj, tuple | list)
    return _cbor_head(4, len(obj)) + b"".join(_cbor(item) for item in obj)


def test_sha256_cbor_none_hash_matches_vllm() -> None:
    hasher = BlockHasher(algo="sha256_cbor", seed="vllm-none-hash")
    # The value verified against live vLLM 0.32 events (reference/vllm-cpu.md §6).
    assert _cbor("vllm-none-hash").hex() == "6e766c6c6d2d6e6f6e652d68617368"
    assert hasher.none_hash.hex() == "9bd96a485ad84efdafb72ee48a1d7a69bcead0f8f0433173941b276b9581eef0"


def test_sha256_cbor_chain_from_the_spec() -> None:
    hasher = BlockHasher(algo="sha256_cbor", seed="0", block_size=4)
    tokens = [1, 300, 70000, 5, 17, 23, 24, 255, 9]  # 2 full blocks + 1 token; ids cross CBOR size classes
    none_hash = hashlib.sha256(_cbor("0")).digest()
    h0 = hashlib.sha256(_cbor((none_hash, (1, 300, 70000, 5), None))).digest()
    h1 = hashlib.sha256(_cbor((h0, (17, 23, 24, 255), None))).digest()
    assert hasher.hash_prefix(tokens) == [h0, h1]
    # vLLM 0.32 hashes tagged extra keys: the adapter's name and path, the salt on block 0 only.
    lora = ("lora", "lora-a", "/adapters/a")
    lora0 = hashlib.sha256(_cbor((none_hash, (1, 300, 70000, 5), (lora,)))).digest()
    assert hasher.hash_prefix(tokens, lora_name="lora-a", lora_path="/adapters/a")[0] == lora0
    salted0 = hashlib.sha256(_cbor((none_hash, (1, 300, 70000, 5), (lora, ("cache_salt", "s"))))).digest()
    salted = hasher.hash_prefix(tokens, lora_name="lora-a", lora_path="/adapters/a", cache_salt="s")
    assert salted[0] == salted0
    assert salted[1] == hashlib.sha256(_cbor((salted0, (17, 23, 24, 255), (lora,)))).digest()


def test_xxhash_cbor_is_xxh3_128_of_the_same_encoding() -> None:
    hasher = BlockHasher(algo="xxhash_cbor", seed="0", block_size=2)
    none_hash = xxhash.xxh3_128_digest(_cbor("0"))
    assert hasher.hash_prefix([7, 8]) == [xxhash.xxh3_128_digest(_cbor((none_hash, (7, 8), None)))]


def test_fast_scheme_layout() -> None:
    hasher = BlockHasher(algo="fast", seed="s", block_size=2)
    none_hash = xxhash.xxh3_128_digest(b"s")
    packed = (7).to_bytes(8, "little") + (8).to_bytes(8, "little")
    assert hasher.hash_prefix([7, 8]) == [xxhash.xxh3_128_digest(none_hash + packed)]
    assert fast_hash(none_hash, [7, 8], ("l",)) == xxhash.xxh3_128_digest(none_hash + packed + _cbor(["l"]))


@pytest.mark.parametrize("algo", ["fast", "sha256_cbor", "xxhash_cbor"])
def test_equal_hashes_mean_equal_prefixes(algo: str) -> None:
    hasher = BlockHasher(algo=algo, block_size=4)  # type: ignore[arg-type]
    a = hasher.hash_prefix(list(range(12)))
    b = hasher.hash_prefix([*range(8), 0, 0, 0, 0])
    c = hasher.hash_prefix([99, *range(1, 12)])
    assert a[:2] == b[:2]
    assert a[2] != b[2]
    assert not set(a) & set(c)  # a different first block changes every later hash
    assert BlockHasher(algo=algo, block_size=4, seed="other").hash_prefix(list(range(12))) != a


def test_int_form_is_the_last_8_bytes_big_endian() -> None:
    digest = bytes(range(32))
    assert to_int(digest) == int.from_bytes(bytes(range(24, 32)), "big")
    assert to_int(b"\xff" * 32) == 2**64 - 1


def test_extra_keys() -> None:
    assert extra_keys_for(0, None, None) is None
    assert extra_keys_for(3, "l", "s") == ("l",)
    assert extra_keys_for(0, None, "s") == ("s",)


def test_unknown_algorithm_is_rejected() -> None:
    with pytest.raises(ValueError, match="unknown hash algorithm"):
        BlockHasher(algo="md5")  # type: ignore[arg-type]
