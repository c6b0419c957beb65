"""``approx-prefix-cache-producer``: which endpoints probably hold this prompt's prefix in KV cache.

A DataProducer and a PreRequest hook (the reference's approximate prefix cache, see
``reference/gie-protocol.md`` section 2.6). Before scheduling it cuts the request's input into
blocks of ``blockSizeTokens x 4`` bytes (4 characters per token on average: nothing is
tokenized), chains their xxhash64 hashes and asks the :class:`PrefixIndex` how many leading
blocks each endpoint holds: ``request.data["PrefixCacheMatchInfo"]``. After the pick it records
the request's blocks for the chosen endpoint, which is how the index learns.

Parameters (camelCase in the configuration file):

* ``blockSizeTokens`` (16): block size in tokens (vLLM's default). The deprecated ``blockSize``
  (in characters) is refused with a message pointing here.
* ``maxPrefixBlocksToMatch`` (256): only this many leading blocks are hashed.
* ``lruCapacityPerServer`` (31,250): blocks remembered per endpoint (500K tokens of 16).
* ``autoTune`` (true): the block size comes from the candidates' ``cache_config_info`` block
  size when they all agree, the per-endpoint capacity from its ``num_gpu_blocks``.
* ``hashScheme``: ``"rendered"`` (default) or ``"reference"``, below.

Input bytes and hashes. The seed is ``h0 = xxh64(target model || cache_salt)`` (``cache_salt``
from the body when present), so different models or tenants never share blocks.

* ``reference``: what the reference EPP hashes. Completions: the prompt text. Chat: the JSON of
  ``messages``; responses: the JSON of ``[{instructions}, {tools}, {input}]``; conversations:
  the JSON of ``items``; embeddings: the JSON of ``input``. Block ``i`` hashes
  ``xxh64(block bytes || previous hash as 8 little-endian bytes)``; the trailing partial block
  is hashed too. The JSON is orjson's compact encoding of the decoded body, so it follows the
  client's key order and is not byte-identical to the reference's Go encoding (typed structs,
  ``<>&`` escaped): the hashes only ever meet this EPP's own index, so only the policy matters.
* ``rendered``: the conversation the way a chat template shows it to the engine: per message
  ``<|im_start|>role\\ncontent<|im_end|>\\n`` (text parts joined with newlines as vLLM does,
  images and other parts as a digest), tool definitions first as templates put them in the
  system turn. It does not depend on the client's JSON key order, whitespace or escaping, nor
  on fields it leaves out (``name``, ``temperature``, ``stream``, ...), so two clients sending
  the same conversation get the same blocks; a JSON dump misses whenever two SDKs order keys
  differently. Only full blocks are hashed: engines cache full blocks only, and a partial
  block's hash can never match the next turn of the same conversation (that turn has more text
  there), so it would only bloat the index by one dead entry per request. Block ``i`` hashes
  ``xxh64(block bytes, seed=previous hash)``, which chains as well and saves two allocations
  per block. Rendering stops once ``maxPrefixBlocksToMatch`` blocks' worth of text is there.

When the parser left no decoded body, both schemes hash the parser's ``prompt_text``.

``request.data["PrefixCacheMatchInfo"]`` is a :class:`PrefixCacheMatchInfo`: the number of
blocks and, per endpoint address holding the first one, how many leading blocks it holds.
Endpoints that leave the pool are purged from the index at once (the reference sweeps every
2 minutes).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import orjson
from pydantic import Field
from xxhash import xxh64_hexdigest, xxh64_intdigest

from igw.api.types import EndpointState, InferenceRequest
from igw.framework.plugin import Handle, PluginParams
from igw.framework.registry import register
from igw.framework.requestcontrol import DataProducer, PreRequest, ResponseHeadersHook
from igw.framework.scheduling import SchedulingResult
from igw.scheduling.plugins.prefix_index import PrefixIndex

MATCH_INFO_KEY = "PrefixCacheMatchInfo"
CHARS_PER_TOKEN = 4
"""The reference's average characters per token: block bytes = tokens x 4."""
DEFAULT_BLOCK_SIZE_TOKENS = 16
DEFAULT_MAX_PREFIX_BLOCKS = 256
DEFAULT_LRU_CAPACITY_PER_SERVER = 31_250
AUTOTUNE_REFRESH_SECONDS = 1.0
"""How often autoTune re-reads the candidates' block size (a scan of every candidate)."""

HashScheme = Literal["reference", "rendered"]


class PrefixCacheMatchInfo:
    """What the producer found for one request (``request.data["PrefixCacheMatchInfo"]``)."""

    __slots__ = ("block_size_tokens", "hashes", "matched", "recorded_for", "total_blocks")

    def __init__(self, total_blocks: int, matched: dict[str, int], block_size_tokens: int, hashes: list[int]) -> None:
        self.total_blocks = total_blocks
        """Blocks hashed for this request (0: too short, or no input)."""
        self.matched = matched
        """Endpoint address -> leading blocks it holds; endpoints holding none are absent."""
        self.block_size_tokens = block_size_tokens
        self.hashes = hashes
        """The block hashes, kept for the PreRequest hook."""
        self.recorded_for: str | None = None
        """The endpoint the blocks were recorded for (the pick, then the one that served)."""

    def matched_blocks(self, address: str) -> int:
        return self.matched.get(address, 0)

    def __repr__(self) -> str:
        return f"PrefixCacheMatchInfo(total_blocks={self.total_blocks}, matched={self.matched})"


class ProducerParams(PluginParams):
    block_size_tokens: int = Field(default=DEFAULT_BLOCK_SIZE_TOKENS, ge=1)
    """Block size in tokens; a block is this many x 4 bytes of input."""
    max_prefix_blocks_to_match: int = Field(default=DEFAULT_MAX_PREFIX_BLOCKS, ge=1)
    """Only the first this many blocks are hashed and matched."""
    lru_capacity_per_server: int = Field(default=DEFAULT_LRU_CAPACITY_PER_SERVER, ge=1)
    """Blocks remembered per endpoint (unless autoTune reads the endpoint's ``num_gpu_blocks``)."""
    auto_tune: bool = True
    """Block size and per-endpoint capacity from the engines' ``cache_config_info``."""
    hash_scheme: HashScheme = "rendered"
    """``rendered`` (the conversation as a template shows it, full blocks) or ``reference``."""
    max_prefix_tokens_to_match: int | None = Field(default=None, ge=1)
    """Alternative to ``maxPrefixBlocksToMatch``, in tokens (wins when both are given)."""
    block_size: int | None = None
    """Deprecated (characters): refused, with a pointer to ``blockSizeTokens``."""


def deprecated_block_size_error(value: int) -> str:
    return (
        f"blockSize ({value}) is deprecated and no longer accepted; use blockSizeTokens instead to "
        f"give the cache block size in tokens (blockSize {value} characters is about "
        f"blockSizeTokens {max(1, value // CHARS_PER_TOKEN)})"
    )


@register
class ApproxPrefixCacheProducer(DataProducer, PreRequest, ResponseHeadersHook):
    type_name = "approx-prefix-cache-producer"
    Params = ProducerParams
    produces = frozenset({MATCH_INFO_KEY})

    def __init__(
        self,
        name: str | None = None,
        *,
        block_size_tokens: int = DEFAULT_BLOCK_SIZE_TOKENS,
        max_prefix_blocks: int = DEFAULT_MAX_PREFIX_BLOCKS,
        lru_capacity_per_server: int = DEFAULT_LRU_CAPACITY_PER_SERVER,
        auto_tune: bool = True,
        hash_scheme: HashScheme = "rendered",
        clock: Callable[[], float] | None = None,
    ) -> None:
        super().__init__(name)
        if block_size_tokens < 1 or max_prefix_blocks < 1 or lru_capacity_per_server < 1:
            raise ValueError("blockSizeTokens, maxPrefixBlocksToMatch and lruCapacityPerServer must be at least 1")
        if hash_scheme not in ("reference", "rendered"):
            raise ValueError(f"hashScheme must be 'reference' or 'rendered', got {hash_scheme!r}")
        self.block_size_tokens = block_size_tokens
        self.max_prefix_blocks = max_prefix_blocks
        self.lru_capacity_per_server = lru_capacity_per_server
        self.auto_tune = auto_tune
        self.hash_scheme: HashScheme = hash_scheme
        self.index = PrefixIndex(lru_capacity_per_server)
        self._clock = clock or time.monotonic
        self._pool: frozenset[str] | None = None
        """Addresses in the pool, once known: picks outside it are not recorded."""
        self._tuned_block_size = block_size_tokens
        self._tuned_at = float("-inf")
        self._tuned_count = -1
        # Observability (the lead exports them as inference_extension_prefix_indexer_*).
        self.lookups = 0
        """Requests that had at least one block to match."""
        self.recorded = 0
        """Picks recorded in the index."""
        self.hit_blocks = 0
        """Leading blocks the chosen endpoint already held, summed over recorded picks."""
        self.total_blocks = 0
        """Blocks of the recorded picks, summed."""
        self.on_match: Callable[[int, int], None] | None = None
        """Called per recorded pick with (matched bytes, total bytes) on the chosen endpoint."""

    @classmethod
    def from_params(cls, name: str, params: ProducerParams, handle: Handle) -> ApproxPrefixCacheProducer:
        if params.block_size is not None:
            raise ValueError(deprecated_block_size_error(params.block_size))
        producer = cls(
            name,
            block_size_tokens=params.block_size_tokens,
            max_prefix_blocks=(
                max(1, params.max_prefix_tokens_to_match // params.block_size_tokens)
                if params.max_prefix_tokens_to_match is not None
                else params.max_prefix_blocks_to_match
            ),
            lru_capacity_per_server=params.lru_capacity_per_server,
            auto_tune=params.auto_tune,
            hash_scheme=params.hash_scheme,
            clock=handle.clock,
        )
        producer.watch(handle)
        return producer

    def watch(self, handle: Handle) -> None:
        """Purge endpoints that leave ``handle``'s pool from the index, as soon as they leave."""
        current = handle.endpoints()
        if current:
            self._pool = frozenset(e.address for e in current)

        def changed() -> None:
            pool = frozenset(e.address for e in handle.endpoints())
            self._pool = pool
            self.index.retain(pool)

        handle.on_endpoints_change(changed)

    def describe(self) -> Mapping[str, Any]:
        return {
            "blockSizeTokens": self.block_size_tokens,
            "maxPrefixBlocksToMatch": self.max_prefix_blocks,
            "lruCapacityPerServer": self.lru_capacity_per_server,
            "autoTune": self.auto_tune,
            "hashScheme": self.hash_scheme,
        }

    # ---------------------------------------------------------------------------- observability

    @property
    def indexer_size(self) -> int:
        """(endpoint, block) entries in the index."""
        return self.index.size

    def hit_ratio(self) -> float:
        """Share of recorded blocks the chosen endpoint already held (0 before any)."""
        return self.hit_blocks / self.total_blocks if self.total_blocks else 0.0

    # ---------------------------------------------------------------------------- hooks

    def prepare(self, request: InferenceRequest, candidates: Sequence[EndpointState]) -> None:
        block_size = self._block_size(candidates) if self.auto_tune else self.block_size_tokens
        hashes = self.hash_request(request, block_size)
        if hashes:
            self.lookups += 1
            matched = self.index.match(hashes)
        else:
            matched = {}
        request.data[MATCH_INFO_KEY] = PrefixCacheMatchInfo(len(hashes), matched, block_size, hashes)

    def pre_request(self, request: InferenceRequest, result: SchedulingResult) -> None:
        info = request.data.get(MATCH_INFO_KEY)
        if not isinstance(info, PrefixCacheMatchInfo) or not info.hashes or not result.endpoints:
            return
        target = result.endpoints[0]
        address = target.address
        pool = self._pool
        if pool is not None and address not in pool:
            return  # left the pool while this request was scheduled: do not resurrect it
        capacity = self.lru_capacity_per_server
        if self.auto_tune:
            gpu_blocks = target.metrics.num_gpu_blocks
            if gpu_blocks:
                capacity = gpu_blocks
        self.index.add(address, info.hashes, capacity)
        info.recorded_for = address
        matched = info.matched.get(address, 0)
        self.recorded += 1
        self.hit_blocks += matched
        self.total_blocks += info.total_blocks
        if self.on_match is not None:
            block_bytes = info.block_size_tokens * CHARS_PER_TOKEN
            self.on_match(matched * block_bytes, info.total_blocks * block_bytes)

    def on_response_headers(
        self, request: InferenceRequest, endpoint: str | None, status: int | None
    ) -> Mapping[str, str] | None:
        """The proxy fell back to another endpoint: that one now holds the prompt, record it there."""
        info = request.data.get(MATCH_INFO_KEY)
        if (
            endpoint is None
            or not isinstance(info, PrefixCacheMatchInfo)
            or info.recorded_for in (None, endpoint)
            or (self._pool is not None and endpoint not in self._pool)
        ):
            return None
        self.index.add(endpoint, info.hashes, self.lru_capacity_per_server)
        info.recorded_for = endpoint
        return None

    # ---------------------------------------------------------------------------- hashing

    def hash_request(self, request: InferenceRequest, block_size_tokens: int) -> list[int]:
        """The request's block hashes under this producer's scheme (empty: nothing to match)."""
        block_bytes = block_size_tokens * CHARS_PER_TOKEN
        limit = block_bytes * self.max_prefix_blocks
        body = request.body
        salt = body.get("cache_salt") if body is not None else None
        seed = prefix_seed(request.effective_model, salt if isinstance(salt, str) else None)
        if self.hash_scheme == "rendered":
            data = rendered_input(request, limit)
            return chain_rendered(data, seed, block_bytes) if data else []
        data = reference_input(request, limit)
        return chain_reference(data, seed, block_bytes) if data else []

    def _block_size(self, candidates: Sequence[EndpointState]) -> int:
        """autoTune: the block size every reporting candidate agrees on, else the configured one.

        Scanning a thousand candidates costs tens of microseconds, so the answer is kept for
        a second (or until the number of candidates changes).
        """
        now = self._clock()
        if len(candidates) == self._tuned_count and now - self._tuned_at < AUTOTUNE_REFRESH_SECONDS:
            return self._tuned_block_size
        sizes = {size for c in candidates if (size := c.metrics.block_size)}
        self._tuned_block_size = sizes.pop() if len(sizes) == 1 else self.block_size_tokens
        self._tuned_at = now
        self._tuned_count = len(candidates)
        return self._tuned_block_size


# -------------------------------------------------------------------------------------------
# hash chains
# -------------------------------------------------------------------------------------------


def prefix_seed(model: str | None, cache_salt: str | None) -> int:
    """``h0``: xxhash64 of the target model name followed by the cache salt (if any)."""
    data = (model or "").encode()
    if cache_salt:
        data += cache_salt.encode()
    return xxh64_intdigest(data)


def chain_reference(data: bytes, seed: int, block_bytes: int) -> list[int]:
    """Reference chain: ``h_i = xxh64(block_i || h_{i-1} as 8 little-endian bytes)``.

    Every full block, then the trailing partial block; nothing if ``data`` is shorter than one
    block. ``data`` is already cut to the maximum number of blocks.
    """
    size = len(data)
    if size < block_bytes:
        return []
    out: list[int] = []
    append = out.append
    prev = seed
    for start in range(0, size, block_bytes):
        prev = xxh64_intdigest(data[start : start + block_bytes] + prev.to_bytes(8, "little"))
        append(prev)
    return out


def chain_rendered(data: bytes, seed: int, block_bytes: int) -> list[int]:
    """Rendered chain: ``h_i = xxh64(block_i, seed=h_{i-1})``, full blocks only."""
    out: list[int] = []
    append = out.append
    prev = seed
    for start in range(0, len(data) - block_bytes + 1, block_bytes):
        prev = xxh64_intdigest(data[start : start + block_bytes], prev)
        append(prev)
    return out


# -------------------------------------------------------------------------------------------
# input bytes
# -------------------------------------------------------------------------------------------


def _api(request: InferenceRequest, body: dict[str, Any]) -> str:
    path = request.path
    if path.endswith("/responses"):
        return "responses"
    if path.endswith("/embeddings"):
        return "embeddings"
    if path.endswith("/conversations") or ("items" in body and "messages" not in body and "prompt" not in body):
        return "conversations"
    if "messages" in body:
        return "chat"
    if "prompt" in body:
        return "completions"
    if "input" in body:
        return "responses" if "instructions" in body or "tools" in body else "embeddings"
    return ""


def _text_limit(text: str, limit: int) -> bytes:
    # At least one byte per character: the first ``limit`` characters hold the first ``limit`` bytes.
    return text[:limit].encode()[:limit]


def _prompt_text(prompt: Any) -> str | None:
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list) and all(isinstance(p, str) for p in prompt):
        return " ".join(prompt)
    return None


def reference_input(request: InferenceRequest, limit: int) -> bytes:
    """The bytes the reference scheme hashes, cut to ``limit``."""
    body = request.body
    if body is None:
        return _text_limit(request.prompt_text, limit) if request.prompt_text else b""
    api = _api(request, body)
    if api == "chat":
        messages = body.get("messages")
        if isinstance(messages, list):
            # orjson's compact list is "[" + ",".join(items) + "]": dump message by message and
            # stop once there is enough, so a 200 KiB conversation is not serialised whole.
            parts = [b"["]
            size = 1
            for i, message in enumerate(messages):
                item = b"," + orjson.dumps(message) if i else orjson.dumps(message)
                parts.append(item)
                size += len(item)
                if size >= limit:
                    break
            else:
                parts.append(b"]")
            return b"".join(parts)[:limit]
        return orjson.dumps(messages)[:limit]
    if api == "completions":
        prompt = body.get("prompt")
        text = _prompt_text(prompt)
        return _text_limit(text, limit) if text is not None else orjson.dumps(prompt)[:limit]
    if api == "responses":
        combined: list[dict[str, Any]] = []
        if body.get("instructions") is not None:
            combined.append({"instructions": body["instructions"]})
        if body.get("tools") is not None:
            combined.append({"tools": body["tools"]})
        combined.append({"input": body.get("input")})
        return orjson.dumps(combined)[:limit]
    if api == "conversations":
        return orjson.dumps(body.get("items"))[:limit]
    if api == "embeddings":
        return orjson.dumps(body.get("input"))[:limit]
    return _text_limit(request.prompt_text, limit) if request.prompt_text else b""


_START = "<|im_start|>"
_END = "<|im_end|>\n"
_TEXT_PARTS = frozenset({"text", "input_text", "output_text"})


def _digest(value: Any) -> str:
    return xxh64_hexdigest(value if isinstance(value, str) else orjson.dumps(value, option=orjson.OPT_SORT_KEYS))


def _render_content(content: Any) -> str:
    if isinstance(content, str):
        return content
    if content is None:
        return ""
    if not isinstance(content, list):
        return orjson.dumps(content).decode()
    texts: list[str] = []
    for part in content:
        if isinstance(part, str):
            texts.append(part)
            continue
        if not isinstance(part, dict):
            continue
        kind = part.get("type")
        if not isinstance(kind, str):
            kind = "part"
        text = part.get("text")
        if kind in _TEXT_PARTS and isinstance(text, str):
            texts.append(text)
        elif kind in ("image_url", "input_image"):
            image = part.get("image_url")
            url = image.get("url") if isinstance(image, dict) else image
            # A digest stands for the image: the engine keys its blocks by the image's content hash.
            texts.append(f"<image:{_digest(url if url is not None else part)}>")
        else:
            texts.append(f"<{kind}:{_digest(part)}>")
    return "\n".join(texts)


def _render_turn(role: str, text: str) -> str:
    return f"{_START}{role}\n{text}{_END}"


def _render_item(item: Any) -> str:
    """One chat message / responses input item / conversation item."""
    if not isinstance(item, dict):
        return _render_turn("user", _render_content(item))
    role = item.get("role")
    if isinstance(role, str):
        text = _render_content(item.get("content"))
        calls = item.get("tool_calls")
        if calls:
            text += "\n" + orjson.dumps(calls).decode()
        return _render_turn(role, text)
    kind = item.get("type")
    # function_call, function_call_output, ...: their JSON, in the client's key order as a
    # template's tojson would print it (whitespace does not survive the decode).
    return _render_turn(kind if isinstance(kind, str) else "item", orjson.dumps(item).decode())


def _render_turns(turns: list[str], items: Any, limit: int) -> None:
    size = sum(map(len, turns))
    for item in items:
        turn = _render_item(item)
        turns.append(turn)
        size += len(turn)
        if size >= limit:  # characters >= bytes wanted: enough
            return


def rendered_input(request: InferenceRequest, limit: int) -> bytes:
    """The bytes the rendered scheme hashes, cut to ``limit``."""
    body = request.body
    if body is None:
        return _text_limit(request.prompt_text, limit) if request.prompt_text else b""
    api = _api(request, body)
    if api == "completions":
        prompt = body.get("prompt")
        text = _prompt_text(prompt)
        return _text_limit(text, limit) if text is not None else orjson.dumps(prompt)[:limit]
    if api == "embeddings":
        value = body.get("input")
        text = _prompt_text(value)
        return _text_limit(text, limit) if text is not None else orjson.dumps(value)[:limit]
    turns: list[str] = []
    tools = body.get("tools")
    if tools:
        turns.append(_render_turn("tools", orjson.dumps(tools).decode()))
    if api == "chat":
        messages = body.get("messages")
        _render_turns(turns, messages if isinstance(messages, list) else [messages], limit)
    elif api == "responses":
        instructions = body.get("instructions")
        if isinstance(instructions, str) and instructions:
            turns.append(_render_turn("system", instructions))
        value = body.get("input")
        inputs = value if isinstance(value, list) else [{"role": "user", "content": value}] if value else []
        _render_turns(turns, inputs, limit)
    elif api == "conversations":
        items = body.get("items")
        _render_turns(turns, items if isinstance(items, list) else (), limit)
    else:
        return _text_limit(request.prompt_text, limit) if request.prompt_text else b""
    return _text_limit("".join(turns), limit)


__all__ = [
    "MATCH_INFO_KEY",
    "ApproxPrefixCacheProducer",
    "PrefixCacheMatchInfo",
    "chain_reference",
    "chain_rendered",
    "prefix_seed",
    "reference_input",
    "rendered_input",
]
