"""igw.parsing.tokenizer: token ids identical to vLLM's, errors, the prefix cache.

The parity fixture (tests/unit/data/tokenizer-parity/parity.json) holds the ids vLLM 0.32 and
transformers 5.19 computed; regenerate it with tools/tokenizer/make_parity_fixture.py.
"""

from __future__ import annotations

import copy
import itertools
import json
import shutil
import sys
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from igw.parsing.chat_template import chat_template_kwargs
from igw.parsing.errors import ChatTemplateError, TokenizerError, TokenizerUnavailable
from igw.parsing.tokenizer import _SAFE_SPLIT_REGEXES, PieceCache, Tokenizer, TokenizerSet, TokenizerSettings

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools" / "tokenizer"))
from make_parity_fixture import build_variant_dir

DATA = Path(__file__).parent / "data" / "tokenizer-parity"
MODEL = DATA / "model"
FIXTURE: dict[str, Any] = json.loads((DATA / "parity.json").read_text(encoding="utf-8"))
QWEN2_SPLIT = next(r for r in _SAFE_SPLIT_REGEXES if r"\p{N}|" in r)


def build_variant(dest: Path, variant: dict[str, Any], base: Path = MODEL) -> Path:
    """The fixture's variant directory, written by the fixture maker's own recipe."""
    build_variant_dir(base, variant, dest)
    return dest


@pytest.fixture(scope="module")
def variant_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("variants")
    return {name: build_variant(root / name, v) for name, v in FIXTURE["variants"].items()}


def split_variant(tmp_path: Path, pre_tokenizer: dict[str, Any], normalizer: Any = None) -> Tokenizer:
    patch = {"json_patch": {"pre_tokenizer": pre_tokenizer, "normalizer": normalizer}}
    return Tokenizer.from_dir(build_variant(tmp_path, patch), settings=TokenizerSettings(segment_chars=8))


def _split(regex: str) -> dict[str, Any]:
    return {
        "type": "Sequence",
        "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": False},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False},
        ],
    }


# ---------------------------------------------------------------------------------------------
# Parity with vLLM / transformers


def _case_id(case: dict[str, Any]) -> str:
    return f"{case['variant']}/{case['name']}"


@pytest.mark.parametrize("segment_chars", [32, 1024], ids=["pieces32", "pieces1024"])
@pytest.mark.parametrize("case", FIXTURE["cases"], ids=_case_id)
def test_ids_match_vllm(case: dict[str, Any], segment_chars: int, variant_dirs: dict[str, Path]) -> None:
    tok = Tokenizer.from_dir(variant_dirs[case["variant"]], settings=TokenizerSettings(segment_chars=segment_chars))
    if case["kind"] == "completion":
        assert tok.encode_completion(case["prompt"]) == case["ids"]
        return
    messages_before = copy.deepcopy(case["messages"])
    kwargs: dict[str, Any] = {
        "add_generation_prompt": case.get("add_generation_prompt", True),
        "continue_final_message": case.get("continue_final_message", False),
        "tools": case.get("tools"),
        "chat_template_kwargs": case.get("chat_template_kwargs"),
    }
    assert tok.render_chat(case["messages"], **kwargs) == case["text"]
    assert tok.encode_chat(case["messages"], **kwargs) == case["ids"]
    assert case["messages"] == messages_before  # the request body is not modified


def test_fixture_covers_the_brief() -> None:
    cases = FIXTURE["cases"]
    assert {c["content_format"] for c in cases if c["kind"] == "chat"} == {"string", "openai"}
    assert any(c.get("add_generation_prompt") is False for c in cases)
    assert any(c["name"].startswith("parts") for c in cases)
    assert any(c.get("tools") for c in cases)
    assert sum(c["kind"] == "completion" for c in cases) >= 10


def test_model_files_load_as_generic_backend() -> None:
    tok = Tokenizer.from_dir(MODEL)
    assert tok.generic_backend
    assert tok.splittable
    assert tok.special_tokens == {
        "bos_token": "<|begin_of_text|>",
        "eos_token": "<|end_of_text|>",
        "pad_token": "<|pad|>",
    }
    assert tok.encode_completion("Hello")[0] == 0  # BOS from tokenizer.json's post-processor


# ---------------------------------------------------------------------------------------------
# Loading errors


def test_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(TokenizerError, match="not a directory"):
        Tokenizer.from_dir(tmp_path / "nope")


def test_missing_tokenizer_json(tmp_path: Path) -> None:
    with pytest.raises(TokenizerError, match=r"tokenizer\.json: missing"):
        Tokenizer.from_dir(tmp_path)


@pytest.mark.parametrize(
    ("file", "content", "message"),
    [
        ("tokenizer.json", "{not json", r"tokenizer\.json: not valid JSON"),
        ("tokenizer.json", '{"version": "1.0"}', r"tokenizer\.json: not a tokenizers serialisation"),
        ("tokenizer.json", '{"model": {"type": "Nope"}}', r"tokenizer\.json: the tokenizers library cannot load it"),
        ("tokenizer_config.json", "[1, 2", r"tokenizer_config\.json: not valid JSON"),
        ("tokenizer_config.json", "[1, 2]", r"tokenizer_config\.json: must be a JSON object"),
        ("tokenizer_config.json", '{"bos_token": 3}', r"tokenizer_config\.json: bos_token: a special token"),
        ("special_tokens_map.json", "[]", r"special_tokens_map\.json: must be a JSON object"),
        (
            "tokenizer_config.json",
            '{"added_tokens_decoder": {"x": {}}}',
            r"tokenizer_config\.json: 'added_tokens_decoder' must",
        ),
        (
            "tokenizer_config.json",
            '{"added_tokens_decoder": {"9": {}}}',
            r"added_tokens_decoder\.9: an added token needs",
        ),
    ],
    ids=[
        "json-syntax",
        "json-no-model",
        "json-bad-model",
        "config-syntax",
        "config-list",
        "config-token",
        "map-list",
        "decoder-key",
        "decoder-content",
    ],
)
def test_broken_files_are_named(tmp_path: Path, file: str, content: str, message: str) -> None:
    shutil.copytree(MODEL, tmp_path / "m")
    (tmp_path / "m" / file).write_text(content, encoding="utf-8")
    with pytest.raises(TokenizerError, match=message):
        Tokenizer.from_dir(tmp_path / "m")


def test_bad_inline_chat_template(tmp_path: Path) -> None:
    root = build_variant(tmp_path, {"config_patch": {"chat_template": 5}, "template_file": None})
    with pytest.raises(TokenizerError, match=r"tokenizer_config\.json: 'chat_template' must be"):
        Tokenizer.from_dir(root)


def test_no_chat_template(tmp_path: Path) -> None:
    tok = Tokenizer.from_dir(build_variant(tmp_path, {"template_file": None}))
    assert tok.encode_completion("hi")  # completions still work
    with pytest.raises(ChatTemplateError, match="has no chat template"):
        tok.encode_chat([{"role": "user", "content": "hi"}])


def test_chat_template_json_is_the_last_resort(tmp_path: Path) -> None:
    root = build_variant(tmp_path, {"template_file": None})
    (root / "chat_template.json").write_text(json.dumps({"chat_template": "{{ messages[0]['content'] }}!"}))
    assert Tokenizer.from_dir(root).render_chat([{"role": "user", "content": "x"}]) == "x!"


def test_additional_chat_templates_dir(tmp_path: Path) -> None:
    root = build_variant(tmp_path, {})
    (root / "additional_chat_templates").mkdir()
    (root / "additional_chat_templates" / "tool_use.jinja").write_text("TOOLS {{ tools | length if tools else 0 }}")
    tok = Tokenizer.from_dir(root)
    assert isinstance(tok.chat_template, dict)
    assert sorted(tok.chat_template) == ["default", "tool_use"]
    tools = [{"type": "function", "function": {"name": "f"}}]
    assert tok.render_chat([{"role": "user", "content": "x"}], tools=tools) == "TOOLS 1"
    assert tok.render_chat([{"role": "user", "content": "x"}], chat_template="tool_use", tools=None) == "TOOLS 0"


@pytest.mark.parametrize(
    ("template", "message"),
    [
        ("{{ raise_exception('no system role') }}", "rejected the request: no system role"),
        ("{% for m in messages %}", "does not compile"),
        ("{{ messages[0]['content'] | nosuchfilter }}", "does not compile"),
        ("{{ 1 / 0 }}", "ZeroDivisionError"),
    ],
    ids=["raise_exception", "syntax", "unknown-filter", "runtime"],
)
def test_template_errors(tmp_path: Path, template: str, message: str) -> None:
    tok = Tokenizer.from_dir(build_variant(tmp_path, {"template_file": template}))
    with pytest.raises(ChatTemplateError, match=message):
        tok.encode_chat([{"role": "user", "content": "hi"}])


@pytest.mark.parametrize(
    ("messages", "kwargs", "message"),
    [
        ([], {}, "empty conversation"),
        ([{"content": "x"}], {}, "string 'role'"),
        ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}], {}, "not text"),
        ([{"role": "user", "content": [{"text": "x"}]}], {}, "no 'type'"),
        ([{"role": "user", "content": 5}], {}, "content must be"),
        ([{"role": "user", "content": "x"}], {"tools": []}, "must not be an empty array"),
        ([{"role": "user", "content": "x"}], {"tools": [{"type": "function"}]}, "has a 'name'"),
        ([{"role": "user", "content": "x"}], {"continue_final_message": True}, "cannot both be true"),
    ],
    ids=["empty", "no-role", "image", "no-type", "bad-content", "empty-tools", "bad-tool", "continue-and-gen"],
)
def test_request_errors(messages: list[Any], kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ChatTemplateError, match=message):
        Tokenizer.from_dir(MODEL).encode_chat(messages, **kwargs)


def test_named_templates_without_default(tmp_path: Path) -> None:
    variant = {"config_patch": {"chat_template": [{"name": "a", "template": "A"}]}, "template_file": None}
    tok = Tokenizer.from_dir(build_variant(tmp_path, variant))
    with pytest.raises(ChatTemplateError, match=r"several chat templates and no 'default': \['a'\]"):
        tok.render_chat([{"role": "user", "content": "x"}])
    assert tok.render_chat([{"role": "user", "content": "x"}], chat_template="a") == "A"


def test_template_globals_match_transformers(tmp_path: Path) -> None:
    template = (
        "{{ messages[0]['content'] | tojson }}|{{ strftime_now('%Y') | length }}|{% generation %}g{% endgeneration %}"
    )
    tok = Tokenizer.from_dir(build_variant(tmp_path, {"template_file": template}))
    # tojson does not HTML-escape and keeps non-ASCII (transformers' override).
    assert tok.render_chat([{"role": "user", "content": "<b>é</b>"}]) == '"<b>é</b>"|4|g'


def test_config_special_tokens_missing_from_vocab_are_added(tmp_path: Path) -> None:
    variant = {"config_patch": {"extra_special_tokens": ["<|im_start|>", "<|tool|>"], "image_token": "<|image|>"}}
    tok = Tokenizer.from_dir(build_variant(tmp_path, variant))
    assert tok.special_tokens["image_token"] == "<|image|>"  # a named token: a template variable
    ids = tok.encode_text("a<|tool|>b<|image|>")
    assert len(ids) == 4
    assert ids[1] != ids[3]


# ---------------------------------------------------------------------------------------------
# TokenizerSet


def test_tokenizer_set_resolves_adapters_and_loads_lazily(tmp_path: Path) -> None:
    shutil.copytree(MODEL, tmp_path / "m")
    tokenizers = TokenizerSet({"base": tmp_path / "m", "broken": tmp_path / "missing"}, adapters={"lora-a": "base"})
    assert "lora-a" in tokenizers
    assert "other" not in tokenizers
    assert tokenizers.get("lora-a") is tokenizers.get("base")
    assert tokenizers.get("base").cache is tokenizers.cache
    with pytest.raises(TokenizerUnavailable, match="'other'") as info:
        tokenizers.get("other")
    assert info.value.model == "other"
    with pytest.raises(TokenizerError, match="missing: not a directory"):
        tokenizers.get("broken")


def test_tokenizer_set_rejects_an_adapter_without_base() -> None:
    with pytest.raises(TokenizerError, match="'lora-a' names base model 'nope'"):
        TokenizerSet({"base": MODEL}, adapters={"lora-a": "nope"})


# ---------------------------------------------------------------------------------------------
# The prefix cache

TEXT = st.lists(
    st.sampled_from(
        [
            *"ab Z09.,;'!?\n\n\n\t\r-_(){}",
            "  ",
            "\n\n",
            " \n",
            "'s",
            "東",
            "é",
            "🙂",
            "<|im_start|>",
            "<|im_end|>",
            "\u00a0",
            "\u3000",
            "\u0301",
        ]
    ),
    max_size=60,
).map("".join)


def _check_cache(tok: Tokenizer, text: str, cut: int) -> None:
    expected = tok._backend.encode(text, add_special_tokens=False).ids
    tok.encode_text(text[:cut])  # warm the cache with an arbitrary prefix
    assert tok.encode_text(text) == expected
    assert tok.encode_text(text) == expected  # all pieces cached now
    assert tok.encode_completion(text) == tok._backend.encode(text, add_special_tokens=True).ids


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=TEXT, cut=st.integers(min_value=0, max_value=120))
def test_pieces_equal_whole_gpt2_regex(text: str, cut: int) -> None:
    tok = Tokenizer.from_dir(MODEL, settings=TokenizerSettings(segment_chars=4))
    assert tok.splittable
    _check_cache(tok, text, cut)


@pytest.mark.parametrize(
    ("regex", "normalizer"),
    [(r, None) for r in sorted(_SAFE_SPLIT_REGEXES)] + [(QWEN2_SPLIT, {"type": "NFC"})],
    ids=["llama3", "qwen2", "qwen2-nfc"],
)
def test_pieces_equal_whole_split_regexes(tmp_path: Path, regex: str, normalizer: Any) -> None:
    tok = split_variant(tmp_path, _split(regex), normalizer)
    assert tok.splittable

    @settings(max_examples=200, deadline=None)
    @given(text=TEXT, cut=st.integers(min_value=0, max_value=120))
    def check(text: str, cut: int) -> None:
        _check_cache(tok, text, cut)

    check()


@pytest.mark.parametrize(
    ("pre_tokenizer", "normalizer"),
    [
        ({"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True}, None),
        (_split(r"\s+|\w+|[^\w\s]+"), None),
        ({"type": "Metaspace", "replacement": "▁", "prepend_scheme": "first", "split": False}, None),
        (
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
            {"type": "Lowercase"},
        ),
    ],
    ids=["prefix-space", "unknown-regex", "metaspace", "lowercase"],
)
def test_unproven_pipelines_encode_whole(tmp_path: Path, pre_tokenizer: dict[str, Any], normalizer: Any) -> None:
    tok = split_variant(tmp_path, pre_tokenizer, normalizer)
    assert not tok.splittable
    text = "line one\nline two\nline three\n" * 10
    assert tok.encode_text(text) == tok._backend.encode(text, add_special_tokens=False).ids


def test_added_token_with_lstrip_disables_pieces(tmp_path: Path) -> None:
    tok_json = json.loads((MODEL / "tokenizer.json").read_text())
    for token in tok_json["added_tokens"]:
        if token["content"] == "<|im_start|>":
            token["lstrip"] = True
    patch = {"json_patch": {"added_tokens": tok_json["added_tokens"]}}
    tok = Tokenizer.from_dir(build_variant(tmp_path, patch), settings=TokenizerSettings(segment_chars=4))
    assert not tok.splittable
    text = "abc \n<|im_start|>def\nghi\njkl\nmno\n"
    ids = tok.encode_text(text)
    assert ids == tok._backend.encode(text, add_special_tokens=False).ids
    assert ids[:3] == [69, 406, 3]  # " \n" went into <|im_start|> (transformers 5.19 gives the same)


def test_config_added_tokens_decoder_replaces_flags(tmp_path: Path) -> None:
    decoder = {"3": {"content": "<|im_start|>", "lstrip": True, "rstrip": False, "normalized": False, "special": True}}
    tok = Tokenizer.from_dir(build_variant(tmp_path, {"config_patch": {"added_tokens_decoder": decoder}}))
    assert tok._backend.get_added_tokens_decoder()[3].lstrip
    assert not tok.splittable


def test_pieces_cut_only_at_safe_newlines() -> None:
    tok = Tokenizer.from_dir(MODEL, settings=TokenizerSettings(segment_chars=10))
    text = "".join(f"line {i} with words\n" for i in range(30)) + "  \n\nend"
    pieces = tok._pieces(text)
    assert "".join(pieces) == text
    assert len(pieces) > 5
    for left, right in itertools.pairwise(pieces):
        assert left.endswith("\n")
        assert not left[-2].isspace()
        assert not right[0].isspace()


def test_conversation_turns_reuse_cached_pieces() -> None:
    tok = Tokenizer.from_dir(MODEL, settings=TokenizerSettings(segment_chars=256))
    history: list[dict[str, str]] = [{"role": "system", "content": "Rules:\n" + "Be precise.\n" * 200}]
    for turn in range(4):
        history.append({"role": "user", "content": f"Question {turn}?\nPlease answer."})
        misses = tok.cache.misses
        ids = tok.encode_chat(history)
        expected = tok._backend.encode(tok.render_chat(history), add_special_tokens=False).ids
        assert ids == expected
        if turn:
            assert tok.cache.misses - misses <= 2  # only the new tail is encoded
        history.append({"role": "assistant", "content": f"Answer {turn}.\nDone."})


def test_piece_cache_is_bounded_lru() -> None:
    cache = PieceCache(max_tokens=3 * (10 + PieceCache._ENTRY_OVERHEAD))
    for i in range(5):
        cache.put(bytes([i]), tuple(range(10)))
    assert len(cache) == 3
    assert cache.get(b"\x00") is None
    assert cache.get(b"\x02") is not None  # now the most recent
    cache.put(b"\x05", tuple(range(10)))
    assert cache.get(b"\x03") is None
    assert cache.get(b"\x02") is not None
    assert cache.tokens <= cache.max_tokens
    cache.put(b"big", tuple(range(10_000)))  # larger than the whole cache: not kept
    assert cache.get(b"big") is None
    with pytest.raises(ValueError, match=">= 0"):
        PieceCache(-1)


def test_zero_sized_cache_still_encodes() -> None:
    tok = Tokenizer.from_dir(MODEL, settings=TokenizerSettings(prefix_cache_max_tokens=0, segment_chars=8))
    text = "alpha\nbeta\ngamma\ndelta\nepsilon\n" * 5
    assert tok.encode_completion(text) == tok._backend.encode(text).ids
    assert len(tok.cache) == 0


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ({}, {}),
        (
            {"chat_template_kwargs": {"x": 1, "enable_thinking": False}, "reasoning_effort": "high"},
            {"x": 1, "enable_thinking": False, "reasoning_effort": "high"},
        ),
        ({"reasoning_effort": "none"}, {"reasoning_effort": "none", "enable_thinking": False}),
        (
            {"reasoning_effort": "low", "documents": [{"title": "t", "text": "d"}]},
            {"documents": [{"title": "t", "text": "d"}], "reasoning_effort": "low", "enable_thinking": True},
        ),
        ({"chat_template_kwargs": {"documents": [1]}, "documents": None}, {"documents": [1]}),
    ],
    ids=["empty", "user-thinking-wins", "effort-none", "documents", "none-does-not-override"],
)
def test_chat_template_kwargs_from_body(body: dict[str, Any], expected: dict[str, Any]) -> None:
    assert chat_template_kwargs(body) == expected
