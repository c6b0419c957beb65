"""Workloads rendered to prompt text: exact token counts, exact sharing, per-step tags, quoted answers."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from igw_bench.textgen import PER_STEP_KEYS, HttpRequest, Quote, render_workload, segment_text
from igw_sim import tokenizer
from igw_sim.replay.workloads import build_workload


def _render(spec: str, *, tag: str = "", model: str = "sim-model") -> list[HttpRequest]:
    return render_workload(build_workload(spec), model, tag=tag)


def _prompt(request: HttpRequest, answers: dict[str, str] | None = None) -> str:
    prompt = request.body(answers or {})["prompt"]
    assert isinstance(prompt, str)
    return prompt


# --------------------------------------------------------------------------------------------
# segment_text


@pytest.mark.parametrize("length", [0, 1, 2, 17, 1000])
def test_segment_text_is_exactly_length_tokens_for_the_simulator(length: int) -> None:
    text = segment_text("w1/s3", length)
    assert tokenizer.count(text) == length
    assert len(tokenizer.pieces(text)) == length


def test_segment_texts_concatenate_without_merging_tokens() -> None:
    a, b, c = segment_text("a", 13), segment_text("b", 7), segment_text("c", 1)
    assert tokenizer.count(a + b + c) == 21
    assert tokenizer.pieces(a + b) == tokenizer.pieces(a) + tokenizer.pieces(b)


def test_segment_text_is_deterministic_per_key_and_differs_between_keys() -> None:
    assert segment_text("w4/s0", 64) == segment_text("w4/s0", 64)
    assert segment_text("w4/s0", 64) != segment_text("w4/s1", 64)


def test_segment_text_is_the_same_in_another_process_with_another_hash_seed() -> None:
    code = "from igw_bench.textgen import segment_text; print(segment_text('w1/s0', 50), end='')"
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True, timeout=60)
    assert out.stdout == segment_text("w1/s0", 50)


# --------------------------------------------------------------------------------------------
# render_workload: sharing and token counts

W1 = "w1:groups=3,prompts=4,system=40,question=10,output=4,qps=50,requests=40,seed=7"


def test_every_rendered_prompt_has_the_workloads_token_count() -> None:
    for spec in (W1, "w4:groups=4,system=32,question=8,output=4,qps=50,requests=20,seed=1",
                 "w7:long_prompt=50,short_prompt=5,qps=50,requests=20,seed=1"):  # fmt: skip
        rendered = _render(spec)
        assert rendered
        for request in rendered:
            assert tokenizer.count(_prompt(request)) == request.prompt_tokens, spec


def test_w1_requests_of_one_group_share_exactly_the_system_prompt_text() -> None:
    workload = list(build_workload(W1))
    rendered = render_workload(workload, "sim-model")
    by_group: dict[str, list[tuple[str, HttpRequest]]] = {}
    for sim, http in zip(workload, rendered, strict=True):
        by_group.setdefault(sim.segments[0][0], []).append((sim.segments[1][0], http))
    assert len(by_group) > 1
    systems = set()
    checked = 0
    for members in by_group.values():
        system = members[0][1].parts[0]
        assert isinstance(system, str)
        assert tokenizer.count(system) == 40
        systems.add(system)
        for question, http in members:
            assert http.parts[0] == system
            assert _prompt(http).startswith(system)
            for other_question, other in members:
                if other_question != question:
                    assert http.parts[1] != other.parts[1]
                    checked += 1
    assert checked > 0, "the workload must have two questions of one group"
    assert len(systems) == len(by_group), "different groups must have different system prompts"


def test_w1_whole_prompts_recur_verbatim() -> None:
    workload = list(build_workload(W1))
    rendered = render_workload(workload, "sim-model")
    prompts: dict[tuple[tuple[str, int], ...], str] = {}
    repeats = 0
    for sim, http in zip(workload, rendered, strict=True):
        text = _prompt(http)
        if sim.segments in prompts:
            assert prompts[sim.segments] == text
            repeats += 1
        prompts[sim.segments] = text
    assert repeats > 0


def test_request_fields_come_from_the_workload() -> None:
    workload = list(build_workload(W1))
    rendered = render_workload(workload, "my-model")
    assert [r.index for r in rendered] == list(range(len(workload)))
    for sim, http in zip(workload, rendered, strict=True):
        assert http.at == sim.arrival
        assert http.max_tokens == sim.output_tokens == 4
        assert http.model == "my-model"
        assert http.output_key is None


def test_w6_requests_name_their_lora_adapter_as_the_model() -> None:
    rendered = _render("w6:adapters=3,system=8,question=4,output=2,qps=50,requests=30,seed=2", model="base")
    assert {r.model for r in rendered} <= {"lora-0", "lora-1", "lora-2"}
    assert "base" not in {r.model for r in rendered}


def test_body_is_a_streamed_completion_with_usage_and_exact_length() -> None:
    (request,) = _render("w7:short_prompt=6,short_output=9,long_fraction=0,qps=10,requests=1,seed=1")
    body = request.body({})
    assert body == {
        "model": "sim-model",
        "prompt": _prompt(request),
        "max_tokens": 9,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }


# --------------------------------------------------------------------------------------------
# Per-step tags


@pytest.mark.parametrize(
    ("key", "per_step"),
    [
        ("w4/q17", True),
        ("w5/h3", True),
        ("w5/q3.1", True),
        ("w5/a3.0", True),
        ("w6/q5", True),
        ("w7/p9", True),
        ("w1/s0", False),
        ("w1/q0.3", False),
        ("w4/s2", False),
        ("w5/sys", False),
        ("w6/s1", False),
    ],
)
def test_per_step_keys_are_the_unique_segments(key: str, per_step: bool) -> None:
    assert bool(PER_STEP_KEYS.match(key)) is per_step


def test_tags_make_w4_questions_new_in_each_step_and_keep_system_prompts() -> None:
    spec = "w4:groups=2,system=16,question=4,output=2,qps=20,requests=10,seed=3"
    one, two = _render(spec, tag="step0"), _render(spec, tag="step1")
    for a, b in zip(one, two, strict=True):
        assert a.parts[0] == b.parts[0]
        assert a.parts[1] != b.parts[1]
        assert tokenizer.count(_prompt(b)) == b.prompt_tokens
    assert _render(spec, tag="step0") == one


def test_tags_leave_w1_prompts_alone() -> None:
    one, two = _render(W1, tag="step0"), _render(W1, tag="step1")
    assert [_prompt(r) for r in one] == [_prompt(r) for r in two]
    assert [_prompt(r) for r in one] == [_prompt(r) for r in _render(W1)]


def test_tags_give_w5_users_a_fresh_history_but_the_same_system_prompt() -> None:
    spec = "w5:users=2,rounds=1,system=6,history=5,question=3,answer=2,qps=10,requests=2,seed=1"
    one, two = _render(spec, tag="step0"), _render(spec, tag="step1")
    for a, b in zip(one, two, strict=True):
        assert a.parts[0] == b.parts[0]  # w5/sys
        assert a.parts[1] != b.parts[1]  # w5/h<user>


# --------------------------------------------------------------------------------------------
# Quotes

W5 = "w5:users=2,rounds=3,system=4,history=3,question=2,answer=5,qps=10,requests=6,seed=1"


def test_w5_quotes_every_earlier_answer_of_the_same_user() -> None:
    workload = list(build_workload(W5))
    rendered = render_workload(workload, "sim-model", tag="s")
    for sim, http in zip(workload, rendered, strict=True):
        user, turn = sim.request_id % 2, sim.request_id // 2
        assert http.output_key == f"w5/a{user}.{turn}"
        quotes = [p for p in http.parts if isinstance(p, Quote)]
        assert quotes == [Quote(f"w5/a{user}.{k}") for k in range(turn)]
        assert all(isinstance(p, str) for p in http.parts if not isinstance(p, Quote))


def test_the_body_puts_each_answer_where_its_quote_is() -> None:
    rendered = render_workload(build_workload(W5), "sim-model")
    second_turn = rendered[2]
    assert second_turn.output_key == "w5/a0.1"
    answers = {"w5/a0.0": " ANSWER ZERO", "w5/a1.0": " OTHER USER"}
    prompt = _prompt(second_turn, answers)
    text_parts = [p for p in second_turn.parts if isinstance(p, str)]
    assert prompt == "".join(text_parts[:3]) + " ANSWER ZERO" + text_parts[3]
    assert "OTHER USER" not in prompt
    # An answer that never came (a failed request) is quoted as nothing.
    assert _prompt(second_turn, {}) == "".join(text_parts)


def test_a_quote_only_refers_to_an_earlier_requests_output_key() -> None:
    # A segment that merely looks like an answer key, but that no earlier request produced, is plain text.
    from igw_sim.replay.requests import SimRequest

    requests = [
        SimRequest(0, 0.0, (("x/a", 3),), 2, output_key="ans"),
        SimRequest(1, 0.1, (("x/b", 2), ("ans", 3), ("later", 2)), 2),
        SimRequest(2, 0.2, (("later", 2),), 2, output_key="later"),
    ]
    rendered = render_workload(requests, "m")
    assert rendered[1].parts[1] == Quote("ans")
    assert isinstance(rendered[1].parts[2], str)
    assert rendered[2].parts == (segment_text("later", 2),)
