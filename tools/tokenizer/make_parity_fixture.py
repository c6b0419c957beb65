"""Write the token-id parity fixture for ``igw.parsing.tokenizer`` from vLLM's own code.

Run it with the vLLM venv's interpreter (it imports vLLM and transformers, never igw)::

    HF_HUB_OFFLINE=1 ~/.cache/igw-vllm/venv/bin/python tools/tokenizer/make_parity_fixture.py \
        [--model-dir ~/.cache/igw-vllm/tiny-model] [--out tests/unit/data/tokenizer-parity]

For every case it computes the ids the engine would feed the model, the way vLLM 0.32 does:

* completion: ``tokenizer(prompt, add_special_tokens=True)`` (vLLM's renderer call);
* chat: vLLM's ``parse_chat_messages`` (content-format detection, list-of-parts handling,
  tool-call argument parsing), then vLLM's ``safe_apply_chat_template`` (developer-role
  conversion, chat_template_kwargs filtering, transformers' ``apply_chat_template`` with
  ``tokenize=False``), then ``tokenizer(text, add_special_tokens=False)``.

Variants are tokenizer directories derived from the model's (another chat template, another
tokenizer_config.json, a patched tokenizer.json); the fixture stores each variant's differences,
and the model's tokenizer files are copied next to it so the tests run without this venv.

``--model-dir`` can point at any local model: the same script checks parity for it (the
variants that patch the tiny model's files are then skipped with ``--base-only``).
"""

from __future__ import annotations

import argparse
import copy
import json
import shutil
import sys
import tempfile
import types
from pathlib import Path
from typing import Any

# config.json too: transformers reads its model_type to choose the tokenizer class.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
    "special_tokens_map.json",
    "config.json",
)

LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# A template that iterates over content parts: vLLM detects the "openai" content format.
OPENAI_PARTS_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}"
    "{% for part in m['content'] %}{% if part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}"
    "{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# A Qwen-like template: tools (tojson), tool calls, tool results, loop controls, {% generation %},
# raise_exception, a template kwarg (enable_thinking), trim/lstrip blocks, a 'developer' role.
TOOLS_TEMPLATE = """{%- if tools %}
<|im_start|>system
{%- if messages[0]['role'] == 'system' %}
{{ messages[0]['content'] }}
{%- endif %}
# Tools
{%- for tool in tools %}
{{ tool | tojson }}
{%- endfor %}<|im_end|>
{% elif messages[0]['role'] == 'system' %}
<|im_start|>system
{{ messages[0]['content'] }}<|im_end|>
{% endif %}
{%- for message in messages %}
    {%- if message.role not in ['system', 'user', 'assistant', 'tool', 'developer'] %}
        {{- raise_exception('unknown role: ' + message.role) }}
    {%- endif %}
    {%- if message.role == 'system' and loop.first %}{% continue %}{% endif %}
    {%- if message.role == 'assistant' %}
<|im_start|>assistant
{% generation %}{{ message.content if message.content is string else '' }}
        {%- if message.tool_calls %}
            {%- for call in message.tool_calls %}
<tool_call>{{ {'name': call.function.name, 'arguments': call.function.arguments} | tojson }}</tool_call>
            {%- endfor %}
        {%- endif %}{% endgeneration %}<|im_end|>
    {%- elif message.role == 'tool' %}
<|im_start|>tool
{{ message.tool_call_id }}: {{ message.content }}<|im_end|>
    {%- else %}
<|im_start|>{{ message.role }}
{{ message.content }}<|im_end|>
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
<|im_start|>assistant
{%- if enable_thinking is defined and enable_thinking %}
<think>
{%- else %}
<think></think>
{%- endif %}
{%- endif %}
"""

NAMED_TEMPLATES = [
    {
        "name": "default",
        "template": "{{ bos_token }}{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}",
    },
    {
        "name": "tool_use",
        "template": "{{ bos_token }}TOOLS {{ tools | length }}\n{% for m in messages %}{{ m['content'] }}\n{% endfor %}",
    },
]

VARIANTS: dict[str, dict[str, Any]] = {
    # The model's own files.
    "base": {},
    # An inline chat template in tokenizer_config.json that iterates over content parts.
    "openai-parts": {"config_patch": {"chat_template": OPENAI_PARTS_TEMPLATE}, "template_file": None},
    # The tools template from chat_template.jinja.
    "tools": {"template_file": TOOLS_TEMPLATE},
    # Named templates (list form in tokenizer_config.json), no chat_template.jinja.
    "named": {"config_patch": {"chat_template": NAMED_TEMPLATES}, "template_file": None},
    # add_bos_token / add_eos_token in the config (transformers 5 ignores them next to a tokenizer.json).
    "config-add-eos": {"config_patch": {"add_bos_token": False, "add_eos_token": True}},
    # No post-processor in tokenizer.json: transformers builds one from add_bos/add_eos (both false).
    "no-post-processor": {"json_patch": {"post_processor": None}},
    # Config tokens: an extra special token missing from the vocabulary, a model-specific named
    # token, and an added_tokens_decoder entry whose flags differ from tokenizer.json's.
    "config-tokens": {
        "config_patch": {
            "extra_special_tokens": ["<|im_start|>", "<|im_end|>", "<|tool|>"],
            "image_token": "<|image|>",
            "added_tokens_decoder": {
                "3": {"content": "<|im_start|>", "lstrip": True, "rstrip": False, "normalized": False, "special": True}
            },
        }
    },
    # A Llama-3 style pre-tokenizer (Split regex + byte-level) with the same vocabulary.
    "llama3-split": {
        "json_patch": {
            "pre_tokenizer": {
                "type": "Sequence",
                "pretokenizers": [
                    {"type": "Split", "pattern": {"Regex": LLAMA3_SPLIT}, "behavior": "Isolated", "invert": False},
                    {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False},
                ],
            }
        }
    },
}

LONG_TEXT = "".join(
    f"Section {i}: the quick brown fox jumps over the lazy dog, {i * 7} times.\n"
    f"  indented line with  two  spaces\tand a tab; café naïve 東京 🙂\n\n"
    f"print('hello {i}')  # comment!\r\n"
    for i in range(12)
)

COMPLETIONS: list[str] = [
    "Hello, world!",
    "",
    " leading space and trailing space ",
    "line one\nline two\n\n\nline five\r\nwindows line",
    "unicode: café naïve 東京 🙂🙂 Ωmega ß",
    "<|im_start|>user\nliteral special tokens<|im_end|>",
    "<|begin_of_text|>already has a bos",
    "numbers 1234567890 3.14159 -42 1e10",
    "    code:\n        def f(x):\n            return x ** 2\n",
    "tool: <|tool|> image: <|image|> spaces  \n<|im_start|>x",
    LONG_TEXT,
]

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather in a city (°C)",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
        },
    }
]

SYSTEM = {"role": "system", "content": "You are a helpful assistant."}
MULTI_TURN = [
    SYSTEM,
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "4."},
    {"role": "user", "content": "And 3+3?\nExplain  briefly."},
]
PARTS = [
    {"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
    {
        "role": "user",
        "content": [
            {"type": "text", "text": "first part"},
            {"type": "text", "text": "second part"},
            "a bare string part",
            {"type": "input_text", "text": "input_text part"},
        ],
    },
]

CHATS: list[dict[str, Any]] = [
    {"name": "single-user", "messages": [{"role": "user", "content": "Hi there!"}]},
    {"name": "system-user", "messages": [SYSTEM, {"role": "user", "content": "Hello"}]},
    {"name": "multi-turn", "messages": MULTI_TURN},
    {"name": "multi-turn-no-gen", "messages": MULTI_TURN, "add_generation_prompt": False},
    {"name": "parts", "messages": PARTS},
    {"name": "parts-no-gen", "messages": PARTS, "add_generation_prompt": False},
    {
        "name": "developer-role",
        "messages": [SYSTEM, {"role": "developer", "content": "Answer in French."}, {"role": "user", "content": "Hi"}],
    },
    {
        "name": "assistant-none-content",
        "messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": None}],
    },
    {
        "name": "unicode-whitespace",
        "messages": [
            {"role": "user", "content": "  spaces  \n\n\ttabs\t  café 東京 🙂\r\n"},
            {"role": "assistant", "content": " ok "},
        ],
    },
    {"name": "long", "messages": [SYSTEM, {"role": "user", "content": LONG_TEXT}]},
    {
        "name": "kwargs-bos-override",
        "messages": [{"role": "user", "content": "Hi"}],
        "chat_template_kwargs": {"bos_token": "<|pad|>", "unused_kwarg": 1},
    },
    {
        "name": "continue-final",
        "messages": [{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "Hi, I am"}],
        "add_generation_prompt": False,
        "continue_final_message": True,
    },
    {
        "name": "claude-billing-header",
        "messages": [
            {"role": "system", "content": "x-anthropic-billing-header: cch=123\nReal system prompt."},
            {"role": "user", "content": "Hi"},
        ],
    },
]

TOOL_CHATS: list[dict[str, Any]] = [
    {"name": "tools-system", "messages": MULTI_TURN, "tools": TOOLS},
    {
        "name": "tools-calls",
        "messages": [
            {"role": "user", "content": "Weather in Paris?"},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": "call_1",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                    }
                ],
            },
            {
                "role": "tool",
                "tool_call_id": "call_1",
                "content": [{"type": "text", "text": "21"}, {"type": "text", "text": "sunny"}],
            },
        ],
        "tools": TOOLS,
    },
    {"name": "no-tools-thinking", "messages": MULTI_TURN, "chat_template_kwargs": {"enable_thinking": True}},
    {"name": "no-tools-no-gen", "messages": MULTI_TURN, "add_generation_prompt": False},
    {
        "name": "developer-kept",
        "messages": [{"role": "developer", "content": "Dev says hi"}, {"role": "user", "content": "Hi"}],
    },
]


def _fake_model_config() -> Any:
    # What vLLM's chat parsing reads from a ModelConfig for a text-only model.
    return types.SimpleNamespace(
        multimodal_config=None,
        enable_prompt_embeds=False,
        hf_config=types.SimpleNamespace(model_type="llama"),
        allowed_local_media_path=None,
        allowed_media_domains=None,
        tokenizer_revision=None,
        code_revision=None,
        trust_remote_code=False,
        revision=None,
        tokenizer="fixture",
        model="fixture",
    )


def build_variant_dir(base: Path, variant: dict[str, Any], dest: Path) -> None:
    """Write a tokenizer directory: the base files with the variant's changes (tests do the same)."""
    dest.mkdir(parents=True, exist_ok=True)
    tok_json = json.loads((base / "tokenizer.json").read_text(encoding="utf-8"))
    tok_json.update(copy.deepcopy(variant.get("json_patch", {})))
    (dest / "tokenizer.json").write_text(json.dumps(tok_json, ensure_ascii=False), encoding="utf-8")
    config = json.loads((base / "tokenizer_config.json").read_text(encoding="utf-8"))
    config.update(copy.deepcopy(variant.get("config_patch", {})))
    (dest / "tokenizer_config.json").write_text(json.dumps(config, ensure_ascii=False), encoding="utf-8")
    template: str | None
    if "template_file" in variant:
        template = variant["template_file"]
    else:
        src = base / "chat_template.jinja"
        template = src.read_text(encoding="utf-8") if src.is_file() else None
    if template is not None:
        (dest / "chat_template.jinja").write_text(template, encoding="utf-8")
    for name in ("special_tokens_map.json", "config.json"):
        if (base / name).is_file():
            shutil.copyfile(base / name, dest / name)


def chat_ids(tokenizer: Any, case: dict[str, Any]) -> tuple[str, list[int], str]:
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionToolsParam
    from vllm.renderers.chat_utils import parse_chat_messages
    from vllm.renderers.hf import _detect_content_format, safe_apply_chat_template

    model_config = _fake_model_config()
    # The server validates the request's tools and passes their model_dump() to the template.
    raw_tools = case.get("tools")
    tools = None if raw_tools is None else [ChatCompletionToolsParam.model_validate(t).model_dump() for t in raw_tools]
    template = tokenizer.get_chat_template(None, tools=tools)
    content_format = _detect_content_format(template, default="string")
    conversation, _, _ = parse_chat_messages(
        copy.deepcopy(case["messages"]), model_config, content_format=content_format
    )
    kwargs: dict[str, Any] = dict(case.get("chat_template_kwargs") or {})
    # What ChatCompletionRequest.build_chat_params adds (documents/reasoning_effort are None).
    kwargs["add_generation_prompt"] = case.get("add_generation_prompt", True)
    kwargs["continue_final_message"] = case.get("continue_final_message", False)
    text = safe_apply_chat_template(
        model_config, tokenizer, conversation, tools=tools, chat_template=None, tokenize=False, **kwargs
    )
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return text, list(ids), content_format


def _dump(fixture: dict[str, Any]) -> str:
    """One case per line: reviewable diffs, a small file."""
    head = {k: v for k, v in fixture.items() if k != "cases"}
    lines = [json.dumps(head, ensure_ascii=False, indent=1)[:-2] + ',\n "cases": [']
    lines.append(",\n".join("  " + json.dumps(c, ensure_ascii=False, separators=(",", ":")) for c in fixture["cases"]))
    lines.append(" ]\n}\n")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", type=Path, default=Path.home() / ".cache/igw-vllm/tiny-model")
    parser.add_argument("--out", type=Path, default=Path("tests/unit/data/tokenizer-parity"))
    parser.add_argument("--base-only", action="store_true", help="only the model's own files (no patched variants)")
    args = parser.parse_args(argv)

    import transformers
    import vllm
    from vllm.tokenizers import get_tokenizer

    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    model_out = out / "model"
    model_out.mkdir(exist_ok=True)
    for name in TOKENIZER_FILES:
        src = args.model_dir / name
        if src.is_file():
            shutil.copyfile(src, model_out / name)

    variants = {"base": VARIANTS["base"]} if args.base_only else VARIANTS
    cases: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for vname, variant in variants.items():
            vdir = Path(tmp) / vname
            build_variant_dir(model_out, variant, vdir)
            tokenizer = get_tokenizer(str(vdir))
            for i, prompt in enumerate(COMPLETIONS):
                if vname in ("openai-parts", "tools", "named") and i > 1:
                    continue  # only the tokenizer-side variants need every completion
                ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
                cases.append(
                    {
                        "variant": vname,
                        "kind": "completion",
                        "name": f"completion-{i}",
                        "prompt": prompt,
                        "ids": list(ids),
                    }
                )
            chats = TOOL_CHATS if vname == "tools" else CHATS
            if vname in ("config-add-eos", "no-post-processor", "llama3-split", "config-tokens"):
                chats = CHATS[:3] + [c for c in CHATS if c["name"] == "long"]
            if vname == "named":
                chats = [CHATS[1], {**CHATS[1], "name": "system-user-tools", "tools": TOOLS}]
            for chat in chats:
                text, ids, content_format = chat_ids(tokenizer, chat)
                case = {"variant": vname, "kind": "chat", **copy.deepcopy(chat), "text": text, "ids": ids}
                case["content_format"] = content_format
                cases.append(case)

    fixture = {
        "generated_by": "tools/tokenizer/make_parity_fixture.py",
        "vllm": vllm.__version__,
        "transformers": transformers.__version__,
        "variants": variants,
        "cases": cases,
    }
    (out / "parity.json").write_text(_dump(fixture), encoding="utf-8")
    print(f"wrote {len(cases)} cases for {len(variants)} variants to {out / 'parity.json'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
