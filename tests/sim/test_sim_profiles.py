"""Step-time profiles: the roofline formula, the simple knobs, and the presets against published figures."""

from __future__ import annotations

import pytest

from igw_sim.config import EngineConfig
from igw_sim.profiles import PRESETS, LatencyProfile, legacy_profile


def test_step_ms_is_a_roofline_plus_per_sequence_and_attention_terms() -> None:
    p = LatencyProfile(
        name="p",
        weights_ms=5.0,
        ms_per_token=0.1,
        step_overhead_ms=1.0,
        ms_per_decode_seq=0.5,
        ms_per_kv_ktoken=2.0,
        prefill_overhead_ms=3.0,
    )
    assert p.step_ms(prefill_tokens=0, decode_seqs=1) == pytest.approx(1 + 5 + 0.5)
    assert p.step_ms(prefill_tokens=0, decode_seqs=4, context_tokens=2000) == pytest.approx(1 + 5 + 2 + 4)
    assert p.step_ms(prefill_tokens=100, decode_seqs=0) == pytest.approx(1 + 10 + 3)  # compute-bound
    assert p.step_ms(prefill_tokens=20, decode_seqs=10) == pytest.approx(1 + 5 + 5 + 3)  # 30 tokens: still 5 ms
    with pytest.raises(ValueError, match="weights_ms"):
        LatencyProfile(name="bad", weights_ms=-1, ms_per_token=0)


def test_simple_knobs_keep_the_linear_itl_law() -> None:
    p = legacy_profile(
        itl_ms=10.0, itl_slowdown_at_full_batch=2.0, max_num_seqs=5, prefill_overhead_ms=20.0, prefill_ms_per_token=1.0
    )
    itls = [p.step_ms(prefill_tokens=0, decode_seqs=n) for n in range(1, 6)]
    assert itls == pytest.approx([10.0, 12.5, 15.0, 17.5, 20.0])
    assert p.step_ms(prefill_tokens=100, decode_seqs=0) == pytest.approx(20 + 100)
    assert p.step_ms(prefill_tokens=3, decode_seqs=0) == pytest.approx(20 + 7.5)
    assert EngineConfig(itl_ms=10, max_num_seqs=1).profile.step_ms(prefill_tokens=0, decode_seqs=1) == 10.0


def _itl(name: str, batch: int, context: int) -> float:
    return PRESETS[name].profile.step_ms(prefill_tokens=0, decode_seqs=batch, context_tokens=batch * context)


def _ttft(name: str, prompt: int) -> float:
    return PRESETS[name].profile.step_ms(prefill_tokens=prompt, decode_seqs=0)


def test_presets_land_near_published_h100_figures() -> None:
    # Llama-3.1-8B on one H100: ~6-7 ms per token alone, ~12-18 ms at 64 x 2k context; ~30k prefill tok/s.
    assert 6.0 <= _itl("h100-llama3-8b", 1, 1000) <= 7.5
    assert 12.0 <= _itl("h100-llama3-8b", 64, 2000) <= 18.0
    assert 60.0 <= _ttft("h100-llama3-8b", 2000) <= 100.0
    # Llama-3.1-70B on 8x H100 (TP8): ~10 ms per token alone, ~100-150 ms TTFT for 2k tokens.
    assert 9.0 <= _itl("h100x8-llama3-70b", 1, 1000) <= 12.0
    assert 80.0 <= _ttft("h100x8-llama3-70b", 2000) <= 150.0
    # llm-d-inference-sim's own figures: 8B ITL 12 ms; TTFT 30 ms + 250 us/token.
    assert _itl("llmd-sim-8b-h100", 1, 0) == pytest.approx(12.0)
    assert _ttft("llmd-sim-8b-h100", 1000) == pytest.approx(30 + 250)


def test_from_preset_applies_overrides() -> None:
    cfg = EngineConfig.from_preset("h100-llama3-8b", kv_blocks=512, time_dilation=4.0)
    assert cfg.profile is PRESETS["h100-llama3-8b"].profile
    assert (cfg.max_num_seqs, cfg.max_num_batched_tokens, cfg.kv_blocks, cfg.time_dilation) == (256, 8192, 512, 4.0)
    with pytest.raises(ValueError, match="unknown profile"):
        EngineConfig.from_preset("a100")
