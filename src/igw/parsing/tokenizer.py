"""Token ids exactly as the engine computes them, for precise prefix routing.

A router that matches the engine's KV-cache blocks must hash the very token ids the engine
feeds its model. This module reproduces vLLM 0.32 (with transformers 5) for text-only models:

* **completions** — ``tokenizer(prompt, add_special_tokens=True)``: the ``tokenizer.json``
  pipeline (added tokens, normalizer, pre-tokenizer, model) plus its post-processor (BOS/EOS).
  transformers 5 ignores ``add_bos_token``/``add_eos_token`` of ``tokenizer_config.json`` next to
  a ``tokenizer.json`` (``from_pretrained`` drops them); when ``tokenizer.json`` has no
  post-processor it installs one that adds nothing. Special tokens named in the config that the
  vocabulary lacks are added, in transformers' order.
* **chat** — vLLM's message parsing (content-format detection on the template's AST, list-of-parts
  content joined with ``"\\n"`` for "string" templates or kept as parts for "openai" ones, tool-call
  arguments decoded, developer→system conversion), then transformers' ``apply_chat_template``
  rendering (sandboxed jinja2, ``trim_blocks``/``lstrip_blocks``, ``raise_exception``,
  ``strftime_now``, a ``tojson`` that does not HTML-escape, the special tokens as variables), then
  the rendered text encoded **without** special tokens (the template already placed them).

Only the generic ``TokenizersBackend``/``PreTrainedTokenizerFast`` classes build their pipeline
from ``tokenizer.json`` alone; a model-specific class (``LlamaTokenizer``…) may rebuild it in
transformers 5, so :attr:`Tokenizer.generic_backend` says whether parity is by construction —
check other models with ``tools/tokenizer/make_parity_fixture.py``.

**The prefix cache.** Turns of a conversation share long rendered prefixes. Texts are cut into
pieces of about ``segment_chars`` at *safe cuts* — after a single ``"\\n"`` that has a
non-whitespace character on each side — and each piece's ids are memoised by a 128-bit digest of
its text, so a new turn re-encodes only its tail. A cut is safe when encoding the two sides alone
gives the ids of the whole, which holds for byte-level BPE pre-tokenizers whose regex never
matches across ``"\\n"`` followed by a non-space, starts no match from a look-behind, and lets no
whitespace-only lookahead end at the cut (GPT-2, Llama-3/cl100k, Qwen2 patterns), with no
normalizer (or NFC: ``"\\n"`` is a starter that composes with nothing), and no added token that
contains a newline or strips/matches on surrounding whitespace. Any other tokenizer is encoded
whole (still memoised). The property is tested with random texts (tests/unit/test_tokenizer.py).
"""

from __future__ import annotations

import copy
import itertools
import json
import threading
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal, NoReturn

import jinja2
import jinja2.ext
import jinja2.meta
import jinja2.nodes
import jinja2.parser
import jinja2.sandbox
import tokenizers
import tokenizers.processors
import xxhash

__all__ = [
    "ChatTemplateError",
    "Tokenizer",
    "TokenizerError",
    "TokenizerSet",
    "TokenizerSettings",
    "TokenizerUnavailable",
    "chat_template_kwargs",
    "normalize_tools",
]

ContentFormat = Literal["string", "openai"]


class TokenizerError(Exception):
    """The tokenizer directory is broken: the message names the file and the problem.

    Base of this module's errors, so a caller that can route without ids catches just this::

        TokenizerError            broken directory (missing/invalid tokenizer.json, bad config)
        ├── TokenizerUnavailable  no tokenizer configured for the model
        └── ChatTemplateError     no chat template, or the template rejected the messages
                                  (the engine answers 400 to such a request)
    """


class TokenizerUnavailable(TokenizerError):
    """No tokenizer directory is configured for ``model`` (nor for its base model)."""

    def __init__(self, model: str) -> None:
        super().__init__(f"no tokenizer is configured for model {model!r}")
        self.model = model


class ChatTemplateError(TokenizerError):
    """The model has no chat template, or rendering it failed for these messages."""


@dataclass(frozen=True, slots=True)
class TokenizerSettings:
    """Limits of the tokenizers (one :class:`TokenizerSet` shares one prefix cache)."""

    prefix_cache_max_tokens: int = 4_000_000
    """Token ids the prefix cache keeps (about 4 bytes each, plus ~64 per cached piece); LRU."""
    segment_chars: int = 1024
    """Target piece length: a text is cut at the first safe cut after each such stretch."""


# --------------------------------------------------------------------------------------------
# The piece cache


class PieceCache:
    """An LRU of ``digest(piece text) -> token ids`` bounded by the ids it holds.

    Safe to share between tokenizers and threads: keys include the tokenizer's identity.
    """

    _ENTRY_OVERHEAD = 64  # in token units: key, list and dict-slot bytes / 4, roughly

    def __init__(self, max_tokens: int) -> None:
        if max_tokens < 0:
            raise ValueError(f"prefix cache size must be >= 0, got {max_tokens}")
        self.max_tokens = max_tokens
        self._entries: OrderedDict[bytes, tuple[int, ...]] = OrderedDict()
        self._size = 0
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def get(self, key: bytes) -> tuple[int, ...] | None:
        with self._lock:
            ids = self._entries.get(key)
            if ids is None:
                self.misses += 1
                return None
            self._entries.move_to_end(key)
            self.hits += 1
            return ids

    def put(self, key: bytes, ids: tuple[int, ...]) -> None:
        cost = len(ids) + self._ENTRY_OVERHEAD
        if cost > self.max_tokens:
            return
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self._size -= len(old) + self._ENTRY_OVERHEAD
            self._entries[key] = ids
            self._size += cost
            while self._size > self.max_tokens:
                _, evicted = self._entries.popitem(last=False)
                self._size -= len(evicted) + self._ENTRY_OVERHEAD

    @property
    def tokens(self) -> int:
        """Cost units in use (ids plus per-entry overhead)."""
        return self._size

    def __len__(self) -> int:
        return len(self._entries)


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
def _compile(source: str) -> _CompiledTemplate:
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
_HF_CALL_PARAMS = frozenset(
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


def _conversation(messages: Sequence[Mapping[str, Any]], content_format: ContentFormat) -> list[dict[str, Any]]:
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


def _developer_to_system(conversation: list[dict[str, Any]]) -> list[dict[str, Any]]:
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
# Loading a tokenizer directory

_SALTS = itertools.count()
_SPECIAL_ATTRIBUTES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
_GENERIC_CLASSES = frozenset({None, "TokenizersBackend", "PreTrainedTokenizerFast", "PythonBackend"})
# Split regexes for which safe cuts are proven (see the module docstring).
_SAFE_SPLIT_REGEXES = frozenset(
    {
        # Llama-3 / cl100k
        r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
        # Qwen2
        r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
    }
)
_SAFE_NORMALIZERS = frozenset({"NFC"})


def _read_text(path: Path, *, required: bool) -> str | None:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        if required:
            raise TokenizerError(f"{path}: missing") from None
        return None
    except (OSError, UnicodeDecodeError) as exc:
        raise TokenizerError(f"{path}: cannot be read: {exc}") from None


def _parse_json(path: Path, text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise TokenizerError(f"{path}: not valid JSON: {exc}") from None


def _read_json(path: Path, *, required: bool) -> Any:
    text = _read_text(path, required=required)
    return None if text is None else _parse_json(path, text)


def _token_content(value: Any, *, where: str) -> tokenizers.AddedToken | None:
    """A special-token value of a config (a string or a serialised AddedToken) as an AddedToken."""
    if value is None:
        return None
    if isinstance(value, str):
        return tokenizers.AddedToken(value, special=True, normalized=False)
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return tokenizers.AddedToken(
            value["content"],
            single_word=bool(value.get("single_word", False)),
            lstrip=bool(value.get("lstrip", False)),
            rstrip=bool(value.get("rstrip", False)),
            normalized=bool(value.get("normalized", False)),
            special=True,
        )
    raise TokenizerError(f"{where}: a special token must be a string or an object with 'content'")


def _added_token(value: dict[str, Any], *, where: str) -> tokenizers.AddedToken:
    content = value.get("content")
    if not isinstance(content, str):
        raise TokenizerError(f"{where}: an added token needs a string 'content'")
    special = bool(value.get("special", False))
    return tokenizers.AddedToken(
        content,
        single_word=bool(value.get("single_word", False)),
        lstrip=bool(value.get("lstrip", False)),
        rstrip=bool(value.get("rstrip", False)),
        normalized=bool(value.get("normalized", not special)),
        special=special,
    )


def _add_config_tokens(
    backend: tokenizers.Tokenizer,
    config: dict[str, Any],
    config_path: Path,
    named: dict[str, tokenizers.AddedToken | None],
    extra: list[tokenizers.AddedToken | None],
) -> None:
    """Add the config's tokens as ``TokenizersBackend.__init__`` does, in its order (it decides new ids).

    First the ``added_tokens_decoder`` entries that differ from the backend's added tokens (flags
    included: re-adding replaces them), then named and extra special tokens whose text is not an
    added token yet (a special token found only in the base vocabulary becomes an added token).
    """
    decoder = config.get("added_tokens_decoder") or {}
    if not (
        isinstance(decoder, dict) and all(key.isdigit() and isinstance(value, dict) for key, value in decoder.items())
    ):
        raise TokenizerError(f"{config_path}: 'added_tokens_decoder' must map token ids to objects")
    current = list(backend.get_added_tokens_decoder().values())
    known = {repr(t) for t in current}
    to_add = [
        token
        for key in sorted(decoder, key=int)
        if repr(token := _added_token(decoder[key], where=f"{config_path}: added_tokens_decoder.{key}")) not in known
    ]
    contents = {t.content for t in current} | {t.content for t in to_add}
    for special in (*named.values(), *extra):
        if special is not None and special.content not in contents:
            to_add.append(special)
            contents.add(special.content)
    named_contents = {t.content for t in named.values() if t is not None}
    for added in to_add:
        if not added.special and added.content in named_contents:
            added.special = True
    if to_add:
        backend.add_tokens(to_add)


def _splittable(tok_json: dict[str, Any], tokenizer: tokenizers.Tokenizer) -> bool:
    """Whether safe cuts hold for this pipeline (module docstring); False means encode whole."""
    normalizer = tok_json.get("normalizer")
    if normalizer is not None and normalizer.get("type") not in _SAFE_NORMALIZERS:
        return False
    pre = tok_json.get("pre_tokenizer")
    if not isinstance(pre, dict):
        return False
    if pre.get("type") == "ByteLevel":
        ok = pre.get("use_regex", True) and not pre.get("add_prefix_space", True)
    elif pre.get("type") == "Sequence" and len(pre.get("pretokenizers", [])) == 2:
        split, byte_level = pre["pretokenizers"]
        ok = (
            split.get("type") == "Split"
            and split.get("pattern", {}).get("Regex") in _SAFE_SPLIT_REGEXES
            and split.get("behavior") == "Isolated"
            and not split.get("invert", False)
            and byte_level.get("type") == "ByteLevel"
            and not byte_level.get("use_regex", True)
            and not byte_level.get("add_prefix_space", True)
        )
    else:
        ok = False
    if not ok:
        return False
    for added in tokenizer.get_added_tokens_decoder().values():
        if "\n" in added.content or added.lstrip or added.rstrip or added.single_word:
            return False
    return True


class Tokenizer:
    """One model's tokenizer: ``tokenizer.json`` + ``tokenizer_config.json`` + chat template(s).

    Methods may be called from several threads; results are plain ``list[int]``.
    """

    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        *,
        name: str,
        special_tokens: Mapping[str, str],
        chat_template: str | dict[str, str] | None,
        tokenizer_class: str | None = None,
        splittable: bool = False,
        cache: PieceCache | None = None,
        settings: TokenizerSettings | None = None,
    ) -> None:
        self._backend = backend
        self.name = name
        self.special_tokens: dict[str, str] = dict(special_tokens)
        """Named special tokens (``bos_token``…): the template sees them as variables."""
        self.chat_template = chat_template
        """The template, or named templates (``default``, ``tool_use``…), or ``None``."""
        self.tokenizer_class = tokenizer_class
        self.generic_backend = tokenizer_class in _GENERIC_CLASSES
        """transformers builds this class from tokenizer.json alone: parity by construction."""
        self.splittable = splittable
        """Safe cuts hold: long texts are encoded (and cached) piecewise."""
        self.settings = settings or TokenizerSettings()
        self.cache = cache if cache is not None else PieceCache(self.settings.prefix_cache_max_tokens)
        self._salt = next(_SALTS).to_bytes(8, "big")  # cache keys of two tokenizers never meet
        affixes = self._special_affixes()
        self._prefix: tuple[int, ...] | None = affixes[0]
        self._suffix: tuple[int, ...] | None = affixes[1]

    # ---- construction -------------------------------------------------------------------

    @classmethod
    def from_dir(
        cls,
        path: str | Path,
        *,
        name: str | None = None,
        cache: PieceCache | None = None,
        settings: TokenizerSettings | None = None,
    ) -> Tokenizer:
        """Load a model directory the way transformers 5 ``AutoTokenizer.from_pretrained`` does.

        Raises :class:`TokenizerError` naming the file when the directory is unusable.
        """
        root = Path(path).expanduser()
        if not root.is_dir():
            raise TokenizerError(f"{root}: not a directory")
        tok_path = root / "tokenizer.json"
        tok_text = _read_text(tok_path, required=True) or ""
        tok_json = _parse_json(tok_path, tok_text)
        if not isinstance(tok_json, dict) or "model" not in tok_json:
            raise TokenizerError(f"{tok_path}: not a tokenizers serialisation (no 'model')")
        try:
            backend = tokenizers.Tokenizer.from_str(tok_text)
        except Exception as exc:  # the Rust side raises plain Exception
            raise TokenizerError(f"{tok_path}: the tokenizers library cannot load it: {exc}") from None
        config_path = root / "tokenizer_config.json"
        config = _read_json(config_path, required=False) or {}
        if not isinstance(config, dict):
            raise TokenizerError(f"{config_path}: must be a JSON object")
        config = dict(config)
        if "added_tokens_decoder" not in config:
            # Legacy special_tokens_map.json: its values win over the config's (transformers 5).
            legacy_path = root / "special_tokens_map.json"
            legacy = _read_json(legacy_path, required=False)
            if legacy is not None and not isinstance(legacy, dict):
                raise TokenizerError(f"{legacy_path}: must be a JSON object")
            for key, value in (legacy or {}).items():
                if key in ("extra_special_tokens", "additional_special_tokens") and isinstance(value, list):
                    existing = list(config.get("extra_special_tokens") or config.get("additional_special_tokens") or [])
                    existing += [v for v in value if v not in existing]
                    config["extra_special_tokens"] = existing
                else:
                    config[key] = value

        named, extra = cls._special_token_config(config, config_path)
        _add_config_tokens(backend, config, config_path, named, extra)
        backend.encode_special_tokens = bool(config.get("split_special_tokens", False))
        if tok_json.get("post_processor") is None:
            # transformers' update_post_processor with add_bos_token = add_eos_token = False.
            backend.post_processor = tokenizers.processors.TemplateProcessing(
                single="$A:0", pair="$A:0 $B:1", special_tokens=[]
            )
        backend.no_truncation()
        backend.no_padding()

        template = cls._chat_template(root, config, config_path)
        tokenizer_class = config.get("tokenizer_class")
        return cls(
            backend,
            name=name or root.name,
            special_tokens={k: v.content for k, v in named.items() if v is not None},
            chat_template=template,
            tokenizer_class=tokenizer_class if isinstance(tokenizer_class, str) else None,
            splittable=_splittable(tok_json, backend),
            cache=cache,
            settings=settings,
        )

    @staticmethod
    def _special_token_config(
        config: dict[str, Any], where: Path
    ) -> tuple[dict[str, tokenizers.AddedToken | None], list[tokenizers.AddedToken | None]]:
        named: dict[str, tokenizers.AddedToken | None] = {
            key: _token_content(config.get(key), where=f"{where}: {key}") for key in _SPECIAL_ATTRIBUTES
        }
        # Model-specific named tokens: any other "*_token" string, and a dict of extra tokens.
        for key, value in config.items():
            named_like = isinstance(value, str) or (isinstance(value, dict) and "content" in value)
            if key.endswith("_token") and key not in named and named_like:
                named[key] = _token_content(value, where=f"{where}: {key}")
        extra_value = config.get("extra_special_tokens", config.get("additional_special_tokens"))
        extra: list[tokenizers.AddedToken | None] = []
        if isinstance(extra_value, dict):
            for key, value in extra_value.items():
                named[key] = _token_content(value, where=f"{where}: extra_special_tokens.{key}")
        elif isinstance(extra_value, list):
            extra = [_token_content(v, where=f"{where}: extra_special_tokens") for v in extra_value]
        elif extra_value is not None:
            raise TokenizerError(f"{where}: 'extra_special_tokens' must be a list or an object")
        return named, extra

    @staticmethod
    def _chat_template(root: Path, config: dict[str, Any], config_path: Path) -> str | dict[str, str] | None:
        templates: dict[str, str] = {}
        try:
            jinja_file = root / "chat_template.jinja"
            if jinja_file.is_file():
                templates["default"] = jinja_file.read_text(encoding="utf-8")
            extra_dir = root / "additional_chat_templates"
            if extra_dir.is_dir():
                for file in sorted(extra_dir.glob("*.jinja")):
                    templates[file.name.removesuffix(".jinja")] = file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise TokenizerError(f"{root}: cannot read a chat template file: {exc}") from None
        if templates:
            # Template files win over the config's entry (transformers 5).
            return templates["default"] if list(templates) == ["default"] else templates
        value = config.get("chat_template")
        if value is None:
            # A processor's template (multimodal models keep it in chat_template.json); vLLM
            # prefers it, transformers' tokenizer never reads it.
            legacy_path = root / "chat_template.json"
            legacy = _read_json(legacy_path, required=False)
            if legacy is None:
                return None
            if not isinstance(legacy, dict) or not isinstance(legacy.get("chat_template"), str):
                raise TokenizerError(f"{legacy_path}: must be an object with a string 'chat_template'")
            return str(legacy["chat_template"])
        if isinstance(value, str):
            return value
        if isinstance(value, list) and all(
            isinstance(t, dict) and isinstance(t.get("name"), str) and isinstance(t.get("template"), str) for t in value
        ):
            return {t["name"]: t["template"] for t in value}
        raise TokenizerError(f"{config_path}: 'chat_template' must be a string or a list of {{name, template}}")

    def _special_affixes(self) -> tuple[tuple[int, ...], tuple[int, ...]] | tuple[None, None]:
        """The ids the post-processor puts around a single sequence, when that is all it does."""
        found: set[tuple[tuple[int, ...], tuple[int, ...]]] = set()
        for probe in ("a", "Hello, world!\nx", "  ", "1234"):
            plain = self._backend.encode(probe, add_special_tokens=False).ids
            full = self._backend.encode(probe, add_special_tokens=True).ids
            for start in range(len(full) - len(plain) + 1):
                if full[start : start + len(plain)] == plain:
                    found.add((tuple(full[:start]), tuple(full[start + len(plain) :])))
                    break
            else:
                return None, None
        if len(found) != 1:
            return None, None
        return found.pop()

    # ---- encoding -----------------------------------------------------------------------

    def encode_completion(self, prompt: str) -> list[int]:
        """Ids of a completions prompt: vLLM's ``add_special_tokens=True`` (BOS etc. per tokenizer.json)."""
        if self._prefix is None or self._suffix is None:
            return list(self._backend.encode_batch([prompt], add_special_tokens=True)[0].ids)
        return [*self._prefix, *self.encode_text(prompt), *self._suffix]

    def encode_text(self, text: str) -> list[int]:
        """Ids of ``text`` without special tokens added (added tokens in the text still match)."""
        pieces = [p for p in (self._pieces(text) if self.splittable else [text]) if p]
        keys = [self._salt + xxhash.xxh3_128_digest(p.encode("utf-8", "surrogatepass")) for p in pieces]
        found = [self.cache.get(key) for key in keys]
        misses = [i for i, ids in enumerate(found) if ids is None]
        if misses:
            # One batch call: it releases the GIL (plain encode does not), so callers can run
            # tokenization in a worker thread; the library may encode the pieces in parallel
            # (TOKENIZERS_PARALLELISM=false keeps it to one core).
            encodings = self._backend.encode_batch([pieces[i] for i in misses], add_special_tokens=False)
            for i, encoding in zip(misses, encodings, strict=True):
                found[i] = tuple(encoding.ids)
                self.cache.put(keys[i], tuple(encoding.ids))
        out: list[int] = []
        for ids in found:
            out.extend(ids or ())
        return out

    def render_chat(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
        tools: Sequence[Mapping[str, Any]] | None = None,
        chat_template_kwargs: Mapping[str, Any] | None = None,
        chat_template: str | None = None,
    ) -> str:
        """The prompt text vLLM renders for a chat request (see :meth:`encode_chat`)."""
        if continue_final_message and add_generation_prompt:
            raise ChatTemplateError("continue_final_message and add_generation_prompt cannot both be true")
        if not messages:
            raise ChatTemplateError("cannot apply the chat template to an empty conversation")
        if tools is not None and len(tools) == 0:
            raise ChatTemplateError("'tools' must not be an empty array")
        tool_dicts = None if tools is None else normalize_tools(tools)
        source = self._template_source(chat_template, tool_dicts)
        compiled = _compile(source)
        conversation = _conversation(messages, compiled.content_format)
        if not compiled.supports_developer and any(m["role"] == "developer" for m in conversation):
            conversation = _developer_to_system(conversation)
        # vLLM keeps the kwargs the template reads; transformers consumes its own parameters.
        template_kwargs = {
            k: v
            for k, v in (chat_template_kwargs or {}).items()
            if k in compiled.variables and k not in _HF_CALL_PARAMS
        }
        documents = (chat_template_kwargs or {}).get("documents")
        if documents is not None and not all(isinstance(d, dict) for d in documents):
            raise ChatTemplateError("documents must be a list of objects")
        final: Any = None
        if continue_final_message:
            conversation, final = self._tag_final_message(conversation, source)
        try:
            text = compiled.template.render(
                **{**self.special_tokens, **template_kwargs},
                messages=conversation,
                tools=tool_dicts,
                documents=documents,
                add_generation_prompt=add_generation_prompt,
            )
        except jinja2.TemplateError as exc:
            raise ChatTemplateError(f"chat template rejected the request: {exc}") from None
        except Exception as exc:  # a template can fail in many ways (TypeError in a filter…)
            raise ChatTemplateError(f"chat template failed: {type(exc).__name__}: {exc}") from None
        if continue_final_message:
            text = self._cut_at_tag(text, final)
        return text

    def encode_chat(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
        tools: Sequence[Mapping[str, Any]] | None = None,
        chat_template_kwargs: Mapping[str, Any] | None = None,
        chat_template: str | None = None,
    ) -> list[int]:
        """Ids of a chat request as vLLM 0.32 feeds them to the model.

        ``messages`` and ``tools`` are the request's (OpenAI format; not modified).
        ``chat_template_kwargs`` keeps only the template's variables (vLLM's filter) and
        ``documents``. ``chat_template`` names a template of a named-template set
        or gives one inline (the engine accepts request templates only when trusted).
        Raises :class:`ChatTemplateError` for what the engine answers with 400.
        """
        text = self.render_chat(
            messages,
            add_generation_prompt=add_generation_prompt,
            continue_final_message=continue_final_message,
            tools=tools,
            chat_template_kwargs=chat_template_kwargs,
            chat_template=chat_template,
        )
        return self.encode_text(text)

    # ---- internals ----------------------------------------------------------------------

    def _template_source(self, requested: str | None, tools: list[dict[str, Any]] | None) -> str:
        # transformers' get_chat_template.
        template = self.chat_template
        if isinstance(template, dict):
            if requested is not None:
                return template.get(requested, requested)
            if tools is not None and "tool_use" in template:
                return template["tool_use"]
            if "default" in template:
                return template["default"]
            raise ChatTemplateError(
                f"model {self.name!r} has several chat templates and no 'default': {sorted(template)}"
            )
        if requested is not None:
            return requested
        if template is None:
            raise ChatTemplateError(
                f"model {self.name!r} has no chat template (none in tokenizer_config.json, "
                "chat_template.jinja, additional_chat_templates/ or chat_template.json)"
            )
        return template

    @staticmethod
    def _tag_final_message(conversation: list[dict[str, Any]], source: str) -> tuple[list[dict[str, Any]], str]:
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

    @staticmethod
    def _cut_at_tag(text: str, final: str) -> str:
        tag = _CONTINUE_TAG.strip()
        if final.strip() not in text or tag not in text:
            raise ChatTemplateError("continue_final_message: the template dropped part of the final message")
        at = text.rindex(tag)
        return text[:at] if text[at : at + len(_CONTINUE_TAG)] == _CONTINUE_TAG else text[:at].rstrip()

    def _pieces(self, text: str) -> list[str]:
        """Cut ``text`` at safe cuts, about every ``segment_chars`` characters."""
        step = max(1, self.settings.segment_chars)
        n = len(text)
        pieces: list[str] = []
        start = 0
        while n - start > 2 * step:
            at = start + step
            cut = -1
            while True:
                nl = text.find("\n", at, n - 1)
                if nl < 0:
                    break
                if nl > 0 and not text[nl - 1].isspace() and not text[nl + 1].isspace():
                    cut = nl + 1
                    break
                at = nl + 1
            if cut < 0:
                break
            pieces.append(text[start:cut])
            start = cut
        pieces.append(text[start:])
        return pieces

    def __repr__(self) -> str:
        return f"Tokenizer({self.name!r}, class={self.tokenizer_class}, splittable={self.splittable})"


# --------------------------------------------------------------------------------------------
# Models -> tokenizers


class TokenizerSet:
    """Tokenizers by model name, loaded on first use; LoRA adapters use their base model's.

    ``directories`` maps served model names to tokenizer directories; ``adapters`` maps LoRA
    adapter names to the model they extend. All tokenizers share one prefix cache.
    """

    def __init__(
        self,
        directories: Mapping[str, str | Path],
        *,
        adapters: Mapping[str, str] | None = None,
        settings: TokenizerSettings | None = None,
    ) -> None:
        self.settings = settings or TokenizerSettings()
        self._dirs = {model: Path(path) for model, path in directories.items()}
        self._adapters = dict(adapters or {})
        for adapter, base in self._adapters.items():
            if base not in self._dirs:
                raise TokenizerError(f"LoRA adapter {adapter!r} names base model {base!r}, which has no tokenizer")
        self.cache = PieceCache(self.settings.prefix_cache_max_tokens)
        self._loaded: dict[Path, Tokenizer] = {}
        self._lock = threading.Lock()

    def resolve(self, model: str) -> str:
        """The model whose tokenizer serves ``model`` (itself, or an adapter's base model)."""
        base = self._adapters.get(model, model)
        if base not in self._dirs:
            raise TokenizerUnavailable(model)
        return base

    def __contains__(self, model: object) -> bool:
        return isinstance(model, str) and self._adapters.get(model, model) in self._dirs

    def get(self, model: str) -> Tokenizer:
        """The tokenizer for ``model``; loads it on first use.

        Raises :class:`TokenizerUnavailable` (none configured) or :class:`TokenizerError`
        (broken directory: raised again on each call, the directory may get fixed).
        """
        path = self._dirs[self.resolve(model)]
        tokenizer = self._loaded.get(path)
        if tokenizer is not None:
            return tokenizer
        with self._lock:
            tokenizer = self._loaded.get(path)
            if tokenizer is None:
                tokenizer = Tokenizer.from_dir(path, name=self.resolve(model), cache=self.cache, settings=self.settings)
                self._loaded[path] = tokenizer
        return tokenizer
