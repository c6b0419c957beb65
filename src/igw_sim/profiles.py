"""Latency profiles: how long one engine step takes, given what it computes.

A step runs one forward pass over every scheduled token (prefill chunks and one token per decoding
sequence). Its duration follows a roofline:

.. code-block:: text

    step_ms = step_overhead_ms
            + max(weights_ms, (prefill_tokens + decode_seqs) * ms_per_token)   # memory- vs compute-bound
            + decode_seqs * ms_per_decode_seq                                   # sampling, per-sequence work
            + context_tokens / 1000 * ms_per_kv_ktoken                          # attention reads the KV cache
            + (prefill_overhead_ms if prefill_tokens else 0)

``context_tokens`` is the number of already-computed tokens of every scheduled sequence (the KV each
one attends to). A decode-only step of a small batch therefore costs about ``step_overhead_ms +
weights_ms`` (the time to stream the weights once), and a large prefill costs about ``tokens *
ms_per_token`` (compute-bound). Published figures and the derivation of each preset are in
``docs/simulator.md``.

A :class:`Preset` bundles a profile with the capacity a real deployment of that model would have
(max-num-seqs, token budget, KV blocks).
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["PRESETS", "LatencyProfile", "Preset", "legacy_profile"]


@dataclass(frozen=True, slots=True)
class LatencyProfile:
    """Coefficients of the step-time model above (all in milliseconds of simulated time)."""

    name: str
    weights_ms: float
    """Memory-bound floor of a forward pass: streaming the weights once."""
    ms_per_token: float
    """Compute per scheduled token, once the step is compute-bound."""
    step_overhead_ms: float = 0.0
    """Fixed per-step cost (scheduling, launch, sampling setup)."""
    ms_per_decode_seq: float = 0.0
    """Extra per decoding sequence."""
    ms_per_kv_ktoken: float = 0.0
    """Attention: per 1000 context tokens read by the scheduled sequences."""
    prefill_overhead_ms: float = 0.0
    """Extra once per step that computes prompt tokens."""

    def __post_init__(self) -> None:
        for name in (
            "weights_ms",
            "ms_per_token",
            "step_overhead_ms",
            "ms_per_decode_seq",
            "ms_per_kv_ktoken",
            "prefill_overhead_ms",
        ):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0")

    def step_ms(self, *, prefill_tokens: int, decode_seqs: int, context_tokens: int = 0) -> float:
        """Duration of one step in simulated milliseconds."""
        compute = (prefill_tokens + decode_seqs) * self.ms_per_token
        ms = self.step_overhead_ms + max(self.weights_ms, compute)
        ms += decode_seqs * self.ms_per_decode_seq + context_tokens * self.ms_per_kv_ktoken / 1000.0
        if prefill_tokens:
            ms += self.prefill_overhead_ms
        return ms


def legacy_profile(
    *, itl_ms: float, itl_slowdown_at_full_batch: float, max_num_seqs: int, prefill_overhead_ms: float,
    prefill_ms_per_token: float, name: str = "custom",
) -> LatencyProfile:  # fmt: skip
    """The profile behind the simple knobs: ITL ``itl_ms`` with one sequence, rising linearly to
    ``itl_ms * itl_slowdown_at_full_batch`` at ``max_num_seqs``; a lone prompt of ``n`` tokens takes
    ``prefill_overhead_ms + max(itl_ms, n * prefill_ms_per_token)``."""
    per_seq = itl_ms * (itl_slowdown_at_full_batch - 1.0) / (max_num_seqs - 1) if max_num_seqs > 1 else 0.0
    per_seq = min(per_seq, itl_ms)
    return LatencyProfile(
        name=name,
        weights_ms=itl_ms - per_seq,
        ms_per_token=prefill_ms_per_token,
        ms_per_decode_seq=per_seq,
        prefill_overhead_ms=prefill_overhead_ms,
    )


@dataclass(frozen=True, slots=True)
class Preset:
    """A latency profile plus the capacity of a typical deployment of that model."""

    profile: LatencyProfile
    max_num_seqs: int
    max_num_batched_tokens: int
    kv_blocks: int
    block_size: int = 16
    max_model_len: int = 131_072
    description: str = ""


PRESETS: dict[str, Preset] = {
    # Llama-3.1-8B BF16 on one H100 SXM 80 GB, vLLM v1 defaults (see docs/simulator.md for sources).
    "h100-llama3-8b": Preset(
        LatencyProfile(
            name="h100-llama3-8b",
            weights_ms=5.5,
            ms_per_token=0.035,
            step_overhead_ms=0.8,
            ms_per_decode_seq=0.02,
            ms_per_kv_ktoken=0.065,
        ),
        max_num_seqs=256,
        max_num_batched_tokens=8192,
        kv_blocks=27_000,
        description="Llama-3.1-8B, 1x H100 80GB",
    ),
    # Llama-3.1-70B BF16 on 8x H100 SXM (tensor parallel 8).
    "h100x8-llama3-70b": Preset(
        LatencyProfile(
            name="h100x8-llama3-70b",
            weights_ms=6.0,
            ms_per_token=0.045,
            step_overhead_ms=3.5,
            ms_per_decode_seq=0.02,
            ms_per_kv_ktoken=0.02,
        ),
        max_num_seqs=256,
        max_num_batched_tokens=8192,
        kv_blocks=75_000,
        description="Llama-3.1-70B, 8x H100 80GB, TP8",
    ),
    # llm-d-inference-sim's manifests/latency-profiles (per-token calculator), for comparisons with it.
    "llmd-sim-8b-h100": Preset(
        legacy_profile(
            name="llmd-sim-8b-h100",
            itl_ms=12.0,
            itl_slowdown_at_full_batch=2.0,
            max_num_seqs=16,
            prefill_overhead_ms=30.0,
            prefill_ms_per_token=0.25,
        ),
        max_num_seqs=16,
        max_num_batched_tokens=8192,
        kv_blocks=1024,
        description="llm-d-inference-sim 8B-H100 profile",
    ),
    "llmd-sim-70b-h100-tp8": Preset(
        legacy_profile(
            name="llmd-sim-70b-h100-tp8",
            itl_ms=25.0,
            itl_slowdown_at_full_batch=3.0,
            max_num_seqs=64,
            prefill_overhead_ms=80.0,
            prefill_ms_per_token=0.5,
        ),
        max_num_seqs=64,
        max_num_batched_tokens=8192,
        kv_blocks=1024,
        description="llm-d-inference-sim 70B-H100-TP8 profile",
    ),
}
"""Named presets, selectable with ``--profile``."""
