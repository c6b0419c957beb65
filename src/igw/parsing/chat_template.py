"""Render an OpenAI chat the way transformers' ``apply_chat_template`` does, so token ids match the engine's.

vLLM's message parsing for text-only models (content-format detection on the template's AST,
tool-call arguments decoded, developer→system conversion) and transformers' jinja environment;
:meth:`igw.parsing.tokenizer.Tokenizer.render_chat` puts them together.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache
from typing import Any, Literal, NoReturn

import jinja2
import jinja2.ext
import jinja2.meta
import jinja2.nodes
import jinja2.parser
import jinja2.sandbox

from igw.parsing.errors import ChatTemplateError

__all__ = [
    "HF_CALL_PARAMS",
    "ContentFormat",
    "chat_template_kwargs",
    "compile_template",
    "cut_at_tag",
    "developer_to_system",
    "normalize_tools",
    "parse_conversation",
    "tag_final_message",
]

ContentFormat = Literal["string", "openai"]


# --------------------------------------------------------------------------------------------
# Chat templates: transformers' jinja environment and vLLM's content-format detection


class _GenerationTag(jinja2.ext.Extension):
    """``{% generation %}…{% endgeneration %}``: transformers' assistant-mask tag; renders its body."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller: Any) -> str:
        return str(caller())


def _raise_exception(message: str) -> NoReturn:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(
    x: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None, sort_keys: bool = False
) -> str:
    # transformers' override: jinja's own tojson HTML-escapes, and templates pass indent etc.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(format: str) -> str:
    return datetime.now().strftime(format)


@lru_cache(maxsize=1)
def _environment() -> jinja2.sandbox.ImmutableSandboxedEnvironment:
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


@dataclass(frozen=True, slots=True)
class _CompiledTemplate:
    template: jinja2.Template
    variables: frozenset[str]
    """Undeclared variables: the chat_template_kwargs vLLM lets through."""
    content_format: ContentFormat
    supports_developer: bool


@lru_cache(maxsize=64)
def compile_template(source: str) -> _CompiledTemplate:
    env = _environment()
    try:
        ast = env.parse(source)
        template = env.from_string(source)
    except jinja2.TemplateSyntaxError as exc:
        raise ChatTemplateError(f"chat template does not compile: {exc} (line {exc.lineno})") from None
    return _CompiledTemplate(
        template=template,
        variables=frozenset(jinja2.meta.find_undeclared_variables(ast)),
        content_format=_detect_content_format(ast),
        supports_developer='"developer"' in source or "'developer'" in source,
    )


def _is_var(node: jinja2.nodes.Node, name: str) -> bool:
    return isinstance(node, jinja2.nodes.Name) and node.ctx == "load" and node.name == name


def _is_attr(node: jinja2.nodes.Node, name: str, key: str) -> bool:
    if isinstance(node, jinja2.nodes.Getitem):
        return _is_var(node.node, name) and isinstance(node.arg, jinja2.nodes.Const) and node.arg.value == key
    if isinstance(node, jinja2.nodes.Getattr):
        return _is_var(node.node, name) and node.attr == key
    return False


def _is_var_or_elems(node: jinja2.nodes.Node, name: str, key: str | None = None) -> bool:
    if isinstance(node, jinja2.nodes.Filter):
        return node.node is not None and _is_var_or_elems(node.node, name, key)
    if isinstance(node, jinja2.nodes.Test):
        return _is_var_or_elems(node.node, name, key)
    if isinstance(node, jinja2.nodes.Getitem) and isinstance(node.arg, jinja2.nodes.Slice):
        return _is_var_or_elems(node.node, name, key)
    return _is_attr(node, name, key) if key else _is_var(node, name)


def _detect_content_format(root: jinja2.nodes.Template) -> ContentFormat:
    """vLLM's ``_detect_content_format``: "openai" when the template loops over message content."""
    # Names bound to `messages` (breadth-first over assignments), then loop variables over them.
    names = ["messages"]
    pending = ["messages"]
    while pending:
        current = pending.pop(0)
        for assign in root.find_all(jinja2.nodes.Assign):
            if _is_var_or_elems(assign.node, current) and isinstance(assign.target, jinja2.nodes.Name):
                names.append(assign.target.name)
                if assign.target.name != current:
                    pending.append(assign.target.name)
    message_names = [
        loop.target.name
        for loop in root.find_all(jinja2.nodes.For)
        if any(_is_var_or_elems(loop.iter, n) for n in names) and isinstance(loop.target, jinja2.nodes.Name)
    ]

    # Macro parameters that receive message.content.
    params_by_loop: dict[int, set[str]] = {}
    loops_in_macros: set[int] = set()
    for macro in root.find_all(jinja2.nodes.Macro):
        arg_names = {arg.name for arg in macro.args}
        content_params: set[str] = set()
        for call in root.find_all(jinja2.nodes.Call):
            if not (isinstance(call.node, jinja2.nodes.Name) and call.node.name == macro.name):
                continue
            for i, arg in enumerate(call.args):
                if i < len(macro.args) and any(_is_var_or_elems(arg, n, "content") for n in message_names):
                    content_params.add(macro.args[i].name)
            for kwarg in call.kwargs:
                if kwarg.key in arg_names and any(_is_var_or_elems(kwarg.value, n, "content") for n in message_names):
                    content_params.add(kwarg.key)
        for loop in macro.find_all(jinja2.nodes.For):
            loops_in_macros.add(id(loop))
            if content_params:
                params_by_loop[id(loop)] = content_params

    for loop in root.find_all(jinja2.nodes.For):
        if any(_is_var_or_elems(loop.iter, n, "content") for n in message_names):
            return "openai"
        if isinstance(loop.iter, jinja2.nodes.Name):
            if loop.iter.name in params_by_loop.get(id(loop), ()):
                return "openai"
            if id(loop) not in loops_in_macros and loop.iter.name == "content":
                return "openai"
    return "string"


# --------------------------------------------------------------------------------------------
# vLLM's chat message parsing for text-only models

_TEXT_PART_KEYS = {
    "text": "text",
    "input_text": "text",
    "output_text": "text",
    "refusal": "refusal",
    "thinking": "thinking",
}
# vLLM's _KNOWN_CONTENT_PART_FIELDS (0.32): other keys of a text part survive in "openai" format.
_KNOWN_PART_FIELDS = frozenset(
    {
        "audio_embeds", "audio_url", "closed", "data", "file", "image_embeds", "image_pil", "image_url",
        "input_audio", "name", "prompt_cache_breakpoint", "refusal", "text", "thinking", "type", "uuid",
        "video_embeds", "video_url",
    }
)  # fmt: skip
_BILLING_HEADER = "x-anthropic-billing-header"
# transformers' apply_chat_template parameters: vLLM accepts them as chat_template_kwargs, the
# template never sees them.
HF_CALL_PARAMS = frozenset(
    {
        "self", "conversation", "tools", "documents", "chat_template", "add_generation_prompt",
        "continue_final_message", "tokenize", "padding", "truncation", "max_length", "return_tensors",
        "return_dict", "return_assistant_tokens_mask", "tokenizer_kwargs",
    }
)  # fmt: skip
_CONTINUE_TAG = "CONTINUE_FINAL_MESSAGE_TAG "


def _text_parts(role: str, content: Any) -> list[Any]:
    """Content as vLLM parses it: a list of ``str`` (text) or ``dict`` (openai-format part)."""
    if content is None:
        parts: list[Any] = []
    elif isinstance(content, str):
        parts = [{"type": "text", "text": content}]
    elif isinstance(content, list):
        parts = content
    else:
        raise ChatTemplateError(f"{role} message content must be a string, a list of parts or null")
    if role == "system":
        parts = _strip_billing_header(parts)
    return parts


def _strip_billing_header(parts: list[Any]) -> list[Any]:
    # vLLM drops Claude Code's per-request attribution line so prefixes stay cacheable.
    out: list[Any] = []
    for part in parts:
        text = (
            part
            if isinstance(part, str)
            else part.get("text")
            if isinstance(part, dict) and part.get("type") == "text"
            else None
        )
        if not (isinstance(text, str) and text.startswith(_BILLING_HEADER)):
            out.append(part)
            continue
        rest = text.partition("\n")[2]
        if rest:
            out.append(rest if isinstance(part, str) else {**part, "text": rest})
    return out


def _parse_part(part: Any, *, wrap: bool) -> Any:
    if isinstance(part, str):
        return {"type": "text", "text": part} if wrap else part
    if not isinstance(part, dict):
        raise ChatTemplateError(f"content part must be an object or a string, got {type(part).__name__}")
    part_type = part.get("type")
    if part_type is None:
        if "tool_reference" in part:
            name = part.get("name")
            return {"type": "tool_reference", "name": name} if wrap else name
        raise ChatTemplateError("content part has no 'type' field")
    if part_type == "tool_reference":
        name = part.get("name")
        return {"type": "tool_reference", "name": name} if wrap else name
    key = _TEXT_PART_KEYS.get(part_type) if isinstance(part_type, str) else None
    if key is None:
        raise ChatTemplateError(
            f"content part type {part_type!r} is not text: not supported for text-only tokenization"
        )
    text = part.get(key)
    if text is None:
        return None  # vLLM skips text/refusal parts without content
    if wrap:
        result: dict[str, Any] = {"type": "text", "text": text}
        result.update({k: v for k, v in part.items() if k not in _KNOWN_PART_FIELDS})
        return result
    return text


def parse_conversation(messages: Sequence[Mapping[str, Any]], content_format: ContentFormat) -> list[dict[str, Any]]:
    """vLLM's ``parse_chat_messages`` + ``_postprocess_messages`` for a text-only model."""
    wrap = content_format == "openai"
    conversation: list[dict[str, Any]] = []
    for message in messages:
        if not isinstance(message, Mapping) or not isinstance(message.get("role"), str):
            raise ChatTemplateError("every message must be an object with a string 'role'")
        role: str = message["role"]
        # vLLM keeps truthy parts only: an empty text part vanishes in "string" format.
        parsed = [p for p in (_parse_part(p, wrap=wrap) for p in _text_parts(role, message.get("content"))) if p]
        out: dict[str, Any] = {"role": role, "content": parsed if wrap else "\n".join(parsed)}
        if role == "assistant":
            if message.get("tool_calls") is not None:
                out["tool_calls"] = copy.deepcopy(list(message["tool_calls"]))
            if message.get("reasoning") is not None:
                out["reasoning"] = out["reasoning_content"] = message["reasoning"]
        elif role == "tool":
            if "tool_call_id" in message:
                out["tool_call_id"] = message["tool_call_id"]
            content = out["content"]
            if isinstance(content, list) and not any(isinstance(p, dict) and p.get("type") != "text" for p in content):
                texts = [p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text"]
                out["content"] = "\n".join(texts) if texts else ""
        if isinstance(message.get("name"), str):
            out["name"] = message["name"]
        if isinstance(message.get("task"), str):
            out["task"] = message["task"]
        if role == "developer":
            out["tools"] = message.get("tools")
        conversation.append(out)
    for out in conversation:
        _decode_tool_call_arguments(out)
    return conversation


def _decode_tool_call_arguments(message: dict[str, Any]) -> None:
    # Templates expect tool-call arguments as objects; vLLM decodes the JSON strings.
    if message["role"] != "assistant" or not isinstance(message.get("tool_calls"), list):
        return
    calls: list[Any] = message["tool_calls"]
    if not calls:
        del message["tool_calls"]
        return
    for call in calls:
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or call.get("type", "function") != "function":
            raise ChatTemplateError("assistant tool_calls entries must be objects of type 'function'")
        arguments = function.get("arguments")
        if not arguments:
            function["arguments"] = {}
        elif not isinstance(arguments, dict):
            parsed: Any = arguments
            if isinstance(arguments, str):
                try:
                    parsed = json.loads(arguments)
                except json.JSONDecodeError:
                    parsed = None
            function["arguments"] = parsed if isinstance(parsed, dict) else {}


def developer_to_system(conversation: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """vLLM's fallback for templates that do not know the 'developer' role."""
    converted = [
        {**{k: v for k, v in m.items() if k != "tools"}, "role": "system"} if m["role"] == "developer" else m
        for m in conversation
    ]
    contents: list[str] = []
    others: list[dict[str, Any]] = []
    merge = False
    for i, m in enumerate(converted):
        if m["role"] != "system":
            others.append(m)
            continue
        merge = merge or i > 0 or bool(contents)
        content = m.get("content", "")
        if isinstance(content, list):
            texts = [p if isinstance(p, str) else p["text"] for p in content if isinstance(p, str) or "text" in p]
            content = "\n".join(texts)
        if content:
            contents.append(content)
    if not merge:
        return converted
    return [{"role": "system", "content": "\n\n".join(contents)}, *others]


def chat_template_kwargs(body: Mapping[str, Any]) -> dict[str, Any]:
    """The template kwargs vLLM derives from a chat-completions body (``build_chat_params``).

    The body's ``chat_template_kwargs`` plus its ``documents`` and ``reasoning_effort``, and
    ``enable_thinking`` (``reasoning_effort != "none"``) unless the kwargs set it; ``None`` and
    ``"auto"`` request fields do not override. Pass the result to :meth:`Tokenizer.encode_chat`.
    """
    user = body.get("chat_template_kwargs")
    kwargs: dict[str, Any] = dict(user) if isinstance(user, Mapping) else {}
    extra: dict[str, Any] = {"documents": body.get("documents"), "reasoning_effort": body.get("reasoning_effort")}
    effort = body.get("reasoning_effort")
    if effort is not None and "enable_thinking" not in kwargs:
        extra["enable_thinking"] = effort != "none"
    kwargs.update({k: v for k, v in extra.items() if v is not None and not (isinstance(v, str) and v == "auto")})
    return kwargs


def normalize_tools(tools: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The tool dicts vLLM gives the template: ``ChatCompletionToolsParam(...).model_dump()``."""
    out: list[dict[str, Any]] = []
    for tool in tools:
        function = tool.get("function") if isinstance(tool, Mapping) else None
        if not isinstance(function, Mapping) or not isinstance(function.get("name"), str):
            raise ChatTemplateError("each tool must be an object with a 'function' that has a 'name'")
        fn: dict[str, Any] = {
            "name": function["name"],
            "description": function.get("description"),
            "parameters": function.get("parameters"),
        }
        defer = tool.get("defer_loading")
        fn_defer = function.get("defer_loading", defer)
        if function.get("strict") is not None:
            fn["strict"] = function["strict"]
        if fn_defer is not None:
            fn["defer_loading"] = fn_defer
        entry: dict[str, Any] = {"type": "function", "function": fn}
        if defer is not None:
            entry["defer_loading"] = defer
        out.append(entry)
    return out


# --------------------------------------------------------------------------------------------
# continue_final_message: transformers' tag at the end of the final message


def tag_final_message(conversation: list[dict[str, Any]], source: str) -> tuple[list[dict[str, Any]], str]:
    conversation = copy.deepcopy(conversation)
    last = conversation[-1]
    final = last.get("content")
    if final is None:
        raise ChatTemplateError('continue_final_message is set but the final message has no "content"')
    if "content" not in source:
        raise ChatTemplateError('continue_final_message is set but the template has no "content" field')
    if isinstance(final, list):
        for part in reversed(final):
            if isinstance(part, dict) and "text" in part:
                final = part["text"]
                part["text"] = part["text"] + _CONTINUE_TAG
                break
        else:
            raise ChatTemplateError("continue_final_message is set but the final message has no text")
    else:
        last["content"] = final + _CONTINUE_TAG
    return conversation, str(final)


def cut_at_tag(text: str, final: str) -> str:
    tag = _CONTINUE_TAG.strip()
    if final.strip() not in text or tag not in text:
        raise ChatTemplateError("continue_final_message: the template dropped part of the final message")
    at = text.rindex(tag)
    return text[:at] if text[at : at + len(_CONTINUE_TAG)] == _CONTINUE_TAG else text[:at].rstrip()
