"""The knobs of one simulated engine (:class:`EngineConfig`), validated on construction.

Latency comes either from an explicit :class:`~igw_sim.profiles.LatencyProfile` (``latency=``, or a named
preset through :meth:`EngineConfig.from_preset`) or, when none is given, from four simple knobs
(``itl_ms``, ``itl_slowdown_at_full_batch``, ``prefill_overhead_ms``, ``prefill_ms_per_token``; see
:func:`~igw_sim.profiles.legacy_profile`). Every simulated duration is multiplied by ``time_dilation``
when the engine runs in real time.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from igw_sim.hashing import DEFAULT_SEED, HashAlgo
from igw_sim.profiles import PRESETS, LatencyProfile, legacy_profile
from igw_sim.tokenizer import TOY, SimTokenizer

__all__ = ["EngineConfig"]


@dataclass(frozen=True, slots=True)
class EngineConfig:
    """Capacity, cache, LoRA and latency knobs of one simulated engine (``ValueError`` when invalid)."""

    max_num_seqs: int = 8
    """Maximum number of running sequences (vLLM ``--max-num-seqs``)."""
    max_num_batched_tokens: int = 8192
    """Token budget of one step (vLLM ``--max-num-batched-tokens``); longer prompts are prefilled in chunks."""
    max_waiting: int = 1000
    """Maximum waiting requests while every running slot is taken; beyond it a request is rejected (429)."""
    max_model_len: int = 131_072
    """Maximum ``prompt_tokens + max_tokens`` of one request; beyond it the request is rejected (400)."""

    prefill_overhead_ms: float = 20.0
    """Simple latency knob: fixed extra time of a step that computes prompt tokens."""
    prefill_ms_per_token: float = 0.05
    """Simple latency knob: compute time per scheduled token."""
    itl_ms: float = 10.0
    """Simple latency knob: inter-token latency with a single running sequence."""
    itl_slowdown_at_full_batch: float = 1.5
    """Simple latency knob: ITL multiplier with ``max_num_seqs`` decoding sequences."""
    latency: LatencyProfile | None = None
    """An explicit step-time profile; when set, the four simple knobs above are ignored."""
    time_dilation: float = 1.0
    """Real seconds per simulated second (2.0 = everything takes twice as long)."""

    kv_blocks: int = 8192
    """KV cache size in blocks, vLLM's ``--num-gpu-blocks-override`` (reported as ``num_gpu_blocks``). As in
    vLLM, one is the null block, so ``kv_blocks - 1`` hold tokens."""
    block_size: int = 16
    """Tokens per KV block."""
    enable_prefix_caching: bool = True
    hash_algo: HashAlgo = "fast"
    """Block hash scheme: ``fast``, ``sha256_cbor`` or ``xxhash_cbor`` (see :mod:`igw_sim.hashing`)."""
    hash_seed: str = DEFAULT_SEED
    """Seed string of ``NONE_HASH`` (vLLM: the value of ``PYTHONHASHSEED``)."""

    max_loras: int = 1
    """LoRA adapters that can be resident at once (GPU slots; vLLM ``--max-loras``)."""
    lora_load_ms: float = 10.0
    """Simulated time added to a step for each adapter it must load into a slot."""
    lora_modules: tuple[tuple[str, str], ...] = ()
    """Adapters known at start-up: ``(name, path)`` pairs (vLLM ``--lora-modules name=path``)."""
    enable_lora: bool = False
    """Report LoRA metrics and accept adapters even when none is known at start-up."""

    tokenizer: SimTokenizer = TOY
    """How prompts are tokenized and which tokens are generated (vLLM ``--tokenizer``): the toy tokenizer,
    or an :class:`~igw_sim.hf_tokenizer.HFTokenizer` for engine-exact token ids."""

    def __post_init__(self) -> None:
        for name in ("max_num_seqs", "max_num_batched_tokens", "kv_blocks", "block_size", "max_model_len", "max_loras"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        if self.kv_blocks < 2:
            raise ValueError("kv_blocks must be >= 2 (one is vLLM's null block)")
        if self.max_waiting < 0:
            raise ValueError("max_waiting must be >= 0")
        for name in ("prefill_overhead_ms", "prefill_ms_per_token", "itl_ms", "lora_load_ms"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0")
        if self.itl_slowdown_at_full_batch < 1.0:
            raise ValueError("itl_slowdown_at_full_batch must be >= 1.0")
        if not self.time_dilation > 0:
            raise ValueError("time_dilation must be > 0")
        names = [name for name, _ in self.lora_modules]
        if len(set(names)) != len(names):
            raise ValueError("LoRA adapter names must be unique")

    @property
    def lora_enabled(self) -> bool:
        return self.enable_lora or bool(self.lora_modules)

    @property
    def profile(self) -> LatencyProfile:
        """The effective step-time profile."""
        if self.latency is not None:
            return self.latency
        return legacy_profile(
            itl_ms=self.itl_ms,
            itl_slowdown_at_full_batch=self.itl_slowdown_at_full_batch,
            max_num_seqs=self.max_num_seqs,
            prefill_overhead_ms=self.prefill_overhead_ms,
            prefill_ms_per_token=self.prefill_ms_per_token,
        )

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> EngineConfig:
        """A config from a named :data:`~igw_sim.profiles.PRESETS` entry, with field overrides."""
        try:
            preset = PRESETS[name]
        except KeyError:
            raise ValueError(f"unknown profile {name!r} (choose from {', '.join(sorted(PRESETS))})") from None
        base: dict[str, Any] = {
            "latency": preset.profile,
            "max_num_seqs": preset.max_num_seqs,
            "max_num_batched_tokens": preset.max_num_batched_tokens,
            "kv_blocks": preset.kv_blocks,
            "block_size": preset.block_size,
            "max_model_len": preset.max_model_len,
        }
        base.update(overrides)
        return cls(**base)

    def replace(self, **changes: Any) -> EngineConfig:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)
