"""Chained prefix-cache block hashes, as vLLM's v1 engine computes them.

Only *full* blocks of ``block_size`` tokens are hashed; a partial tail block never is. Block ``i`` of a
sequence hashes its parent's hash together with its own tokens and extra keys::

    H(-1) = NONE_HASH = hash_fn(seed)
    H(i)  = hash_fn((H(i-1), tuple(tokens of block i), extra_keys(i)))

so two equal hashes mean two equal whole prefixes. ``extra_keys`` is ``None`` for a plain request, or a
tuple: the LoRA adapter *name* (vLLM's current choice; older versions used the integer id), then the
``cache_salt``, which only block 0 carries.

Schemes (``hash_fn``):

``sha256_cbor``
    SHA-256 of canonical CBOR (``cbor2.dumps(obj, canonical=True)``): vLLM's
    ``--prefix-caching-hash-algo sha256_cbor``, reproducible by any process in any language. The object
    is the CBOR array ``[bytes parent, [token ids...], extra_keys or null]`` and the seed is the CBOR text
    string. With ``seed`` set to the engine's ``PYTHONHASHSEED`` value the hashes equal vLLM's.
``xxhash_cbor``
    xxh3-128 of the same canonical CBOR (vLLM's ``xxhash_cbor``).
``fast`` (default)
    xxh3-128 over a fixed binary layout: parent digest, then each token id as 8 little-endian bytes,
    then, when present, the canonical CBOR of the extra keys. Not vLLM's, but cheap (a 512-block prompt
    hashes in well under a millisecond) and just as recomputable: see :func:`fast_hash`.

Events and routers use the *int form* of a hash: its last 8 bytes read big-endian (vLLM's
``VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES=1``), see :func:`to_int`.
"""

from __future__ import annotations

import array
import hashlib
import sys
from collections.abc import Callable, Sequence
from typing import Literal, get_args

import cbor2
import xxhash

__all__ = [
    "DEFAULT_SEED",
    "BlockHasher",
    "ExtraKeys",
    "HashAlgo",
    "fast_hash",
    "sha256_cbor",
    "to_int",
    "xxhash_cbor",
]

HashAlgo = Literal["fast", "sha256_cbor", "xxhash_cbor"]
ExtraKeys = tuple[str, ...] | None
"""The extra keys a KV event reports for a block (vLLM's events carry the bare LoRA name and salt)."""
HashKeys = tuple[tuple[str, ...], ...] | None
"""The extra keys vLLM 0.32 hashes: tagged, ``("lora", name, path)`` and ``("cache_salt", salt)``."""

DEFAULT_SEED = "vllm-none-hash"
"""Seed of ``NONE_HASH`` when none is configured (vLLM derives it from ``PYTHONHASHSEED``)."""

_LITTLE = sys.byteorder == "little"


def sha256_cbor(obj: object) -> bytes:
    """SHA-256 of the canonical CBOR encoding of ``obj`` (32 bytes)."""
    return hashlib.sha256(cbor2.dumps(obj, canonical=True)).digest()


def xxhash_cbor(obj: object) -> bytes:
    """xxh3-128 of the canonical CBOR encoding of ``obj`` (16 bytes)."""
    return xxhash.xxh3_128_digest(cbor2.dumps(obj, canonical=True))


def _pack_tokens(tokens: Sequence[int]) -> bytes:
    packed = array.array("q", tokens)
    if not _LITTLE:  # pragma: no cover - every supported platform is little-endian
        packed.byteswap()
    return packed.tobytes()


def fast_hash(parent: bytes, tokens: Sequence[int], extra_keys: ExtraKeys | HashKeys) -> bytes:
    """The ``fast`` scheme for one block: xxh3-128 of ``parent || int64le(tokens) || cbor(extra_keys)``."""
    data = parent + _pack_tokens(tokens)
    if extra_keys is not None:
        data += cbor2.dumps(list(extra_keys), canonical=True)
    return xxhash.xxh3_128_digest(data)


def to_int(block_hash: bytes) -> int:
    """The external (event) form of a hash: its last 8 bytes, big-endian, as an unsigned int."""
    return int.from_bytes(block_hash[-8:], "big")


class BlockHasher:
    """Computes the chained hashes of one engine (one scheme, one seed, one block size).

    Pure and cheap to share: :meth:`hash_block` depends only on its arguments and the configuration.
    """

    def __init__(self, *, algo: HashAlgo = "fast", seed: str = DEFAULT_SEED, block_size: int = 16) -> None:
        if algo not in get_args(HashAlgo):
            raise ValueError(f"unknown hash algorithm {algo!r} (choose from {', '.join(get_args(HashAlgo))})")
        if block_size < 1:
            raise ValueError("block_size must be >= 1")
        self.algo: HashAlgo = algo
        self.seed = seed
        self.block_size = block_size
        self._block: Callable[[bytes, Sequence[int], ExtraKeys | HashKeys], bytes]
        if algo == "fast":
            self.none_hash = xxhash.xxh3_128_digest(seed.encode("utf-8"))
            self._block = fast_hash
        else:
            fn = sha256_cbor if algo == "sha256_cbor" else xxhash_cbor
            self.none_hash = fn(seed)
            self._block = lambda parent, tokens, extra: fn((parent, tuple(tokens), extra))

    def hash_block(self, parent: bytes | None, tokens: Sequence[int], extra_keys: ExtraKeys | HashKeys = None) -> bytes:
        """``H(i)`` for a block whose parent hash is ``parent`` (``None`` for the first block)."""
        return self._block(self.none_hash if parent is None else parent, tokens, extra_keys)

    def hash_prefix(
        self,
        tokens: Sequence[int],
        *,
        lora_name: str | None = None,
        cache_salt: str | None = None,
        lora_path: str | None = None,
    ) -> list[bytes]:
        """The hashes of every full block of ``tokens`` (what a router recomputes from ``/tokenize``).

        A LoRA request's blocks hash the adapter's name *and path* (as the engine was given it;
        ``/v1/models`` reports it as the adapter's ``root``)."""
        out: list[bytes] = []
        size = self.block_size
        parent: bytes | None = None
        for i in range(len(tokens) // size):
            parent = self.hash_block(
                parent, tokens[i * size : (i + 1) * size], hash_keys_for(i, lora_name, lora_path, cache_salt)
            )
            out.append(parent)
        return out


def extra_keys_for(block_index: int, lora_name: str | None, cache_salt: str | None) -> ExtraKeys:
    """vLLM's per-block extra keys: ``(lora_name?, cache_salt if block 0?)``, or ``None`` when empty."""
    keys: list[str] = []
    if lora_name:
        keys.append(lora_name)
    if cache_salt and block_index == 0:
        keys.append(cache_salt)
    return tuple(keys) if keys else None


def hash_keys_for(block_index: int, lora_name: str | None, lora_path: str | None, cache_salt: str | None) -> HashKeys:
    """What vLLM 0.32 hashes as a block's extra keys: ``("lora", name, path)`` on every block of a LoRA
    request, ``("cache_salt", salt)`` on block 0 of a salted one; ``None`` when neither applies
    (checked against a real engine: docs/simulator-validation.md, K1)."""
    keys: list[tuple[str, ...]] = []
    if lora_name:
        keys.append(("lora", lora_name, lora_path or ""))
    if cache_salt and block_index == 0:
        keys.append(("cache_salt", cache_salt))
    return tuple(keys) if keys else None
