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

import itertools
import json
import threading
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jinja2
import tokenizers
import tokenizers.processors
import xxhash

from igw.parsing.chat_template import (
    HF_CALL_PARAMS,
    compile_template,
    cut_at_tag,
    developer_to_system,
    normalize_tools,
    parse_conversation,
    tag_final_message,
)
from igw.parsing.errors import ChatTemplateError, TokenizerError, TokenizerUnavailable

__all__ = [
    "Tokenizer",
    "TokenizerSet",
    "TokenizerSettings",
]


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
        compiled = compile_template(source)
        conversation = parse_conversation(messages, compiled.content_format)
        if not compiled.supports_developer and any(m["role"] == "developer" for m in conversation):
            conversation = developer_to_system(conversation)
        # vLLM keeps the kwargs the template reads; transformers consumes its own parameters.
        template_kwargs = {
            k: v for k, v in (chat_template_kwargs or {}).items() if k in compiled.variables and k not in HF_CALL_PARAMS
        }
        documents = (chat_template_kwargs or {}).get("documents")
        if documents is not None and not all(isinstance(d, dict) for d in documents):
            raise ChatTemplateError("documents must be a list of objects")
        final: Any = None
        if continue_final_message:
            conversation, final = tag_final_message(conversation, source)
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
            text = cut_at_tag(text, final)
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

    def load_all(self) -> None:
        """Load every configured tokenizer now (start-up: a broken directory is a configuration error
        naming the file, not a fallback discovered on the first request). Raises :class:`TokenizerError`."""
        for model in self._dirs:
            self.get(model)

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
