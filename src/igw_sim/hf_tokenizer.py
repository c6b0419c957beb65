"""Engine-exact tokenization from a Hugging Face tokenizer directory (``igw-sim --tokenizer DIR``).

:class:`HFTokenizer` is a :class:`~igw_sim.tokenizer.SimTokenizer` that gives the token ids vLLM would
compute for the same model, so that a precise prefix-cache router (which hashes the token ids of the KV
events and tokenizes requests itself with the same ``tokenizer.json``) can be tested against the
simulator. It is the simulator's own small implementation of what vLLM does through ``transformers``:

* **Files.** ``tokenizer.json`` (required, loaded with the ``tokenizers`` library),
  ``tokenizer_config.json`` (optional: special tokens, ``add_bos_token``/``add_eos_token``, a
  ``chat_template``) and ``chat_template.jinja`` (optional; preferred over the config's template).
* **Completion prompts** are encoded with special tokens. The BOS/EOS rule is transformers' (v5
  ``TokenizersBackend``): the ``tokenizer.json`` post-processor decides, unless ``tokenizer_config.json``
  sets ``add_bos_token`` or ``add_eos_token``, in which case the post-processor is rebuilt as
  ``[bos] $A [eos]`` from those two flags. Named special tokens of the config that the vocabulary lacks
  are added as special tokens, as transformers does.
* **Chat prompts** are rendered like ``apply_chat_template(tokenize=False)``: a sandboxed Jinja
  environment with ``trim_blocks``, ``lstrip_blocks``, the ``loopcontrols`` extension, a no-op
  ``{% generation %}`` tag, ``raise_exception``, ``strftime_now`` and a ``tojson`` that does not escape
  HTML; the variables are the named special tokens (``bos_token``, ``eos_token``...), the request's
  ``chat_template_kwargs``, then ``messages``, ``tools``, ``documents`` and ``add_generation_prompt``.
  Content given as a list of text parts is joined with ``"\\n"`` (vLLM's "string" content format).
  The text is then encoded *without* special tokens (vLLM's chat default).
* **Generated tokens** are words of the vocabulary chosen so that the generated text re-tokenizes one
  to one: each candidate piece (``" " + word``, first from
  :data:`~igw_sim.tokenizer.GENERATION_WORDS`, then from the vocabulary itself) must encode to a single
  id that decodes back to the piece, and the concatenation of all pieces must encode to their ids. A
  tokenizer where that fails (for example one whose decoder drops leading spaces) is refused at load.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.parser
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken, Tokenizer, processors

from igw_sim.tokenizer import GENERATION_WORDS, ChatFormatError, text_blocks

__all__ = ["GENERATION_PIECES_MAX", "HFTokenizer", "TokenizerLoadError"]

GENERATION_PIECES_MAX = 256
"""At most this many distinct generated pieces; the vocabulary is scanned only while fewer are found."""

_SPECIAL_ATTRIBUTES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
_VOCAB_WORD = re.compile(r" [a-z]{2,12}")


class TokenizerLoadError(ValueError):
    """A tokenizer directory that cannot be used; the message is one line naming the file at fault."""


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def _token_text(value: object) -> str | None:
    """A special token from ``tokenizer_config.json``: a string or a serialized ``AddedToken``."""
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping):
        content = value.get("content")
        return content if isinstance(content, str) else None
    return None


class _GenerationTag(jinja2.ext.Extension):
    """``{% generation %}...{% endgeneration %}`` renders its body (transformers uses it only to mask
    assistant tokens in training data)."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller: Any) -> str:
        return str(caller())


def _raise_exception(message: str) -> None:
    raise jinja2.TemplateError(message)


def _tojson(
    value: object,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _compile_template(source: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env.from_string(source)


def _read_config(path: Path) -> dict[str, Any]:
    file = path / "tokenizer_config.json"
    if not file.is_file():
        return {}
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise TokenizerLoadError(f"{file}: {_one_line(exc)}") from None
    if not isinstance(config, dict):
        raise TokenizerLoadError(f"{file}: not a JSON object")
    return config


def _template_source(path: Path, config: Mapping[str, Any]) -> str | None:
    file = path / "chat_template.jinja"
    if file.is_file():
        try:
            return file.read_text(encoding="utf-8")
        except OSError as exc:
            raise TokenizerLoadError(f"{file}: {_one_line(exc)}") from None
    template = config.get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": ..., "template": ...}]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, Mapping)}
        template = named.get("default")
    return template if isinstance(template, str) else None


class HFTokenizer:
    """A Hugging Face tokenizer directory as a :class:`~igw_sim.tokenizer.SimTokenizer`.

    Build it with :meth:`load`. Immutable after loading; safe to share between engines.
    """

    def __init__(
        self,
        *,
        path: str,
        tokenizer: Tokenizer,
        special_tokens: Mapping[str, str],
        chat_template: str | None,
    ) -> None:
        self._path = path
        self._tok = tokenizer
        self.special_tokens = dict(special_tokens)
        """Named special tokens (``bos_token``...), the variables a chat template sees."""
        self.chat_template = chat_template
        self._template = _compile_template(chat_template) if chat_template is not None else None
        self._max_token_id = tokenizer.get_vocab_size(with_added_tokens=True) - 1
        self.generation_ids, self.generation_pieces = self._generation_vocabulary()
        """The generated tokens: ids and their text (same order)."""

    @classmethod
    def load(cls, path: str | Path) -> HFTokenizer:
        """Load ``path`` (a directory); :class:`TokenizerLoadError` when it cannot be used."""
        root = Path(path)
        if not root.is_dir():
            raise TokenizerLoadError(f"{root}: not a directory")
        file = root / "tokenizer.json"
        if not file.is_file():
            raise TokenizerLoadError(f"{file}: no such file")
        try:
            tok = Tokenizer.from_file(str(file))
        except Exception as exc:  # the Rust side raises plain Exception subclasses
            raise TokenizerLoadError(f"{file}: {_one_line(exc)}") from None
        config = _read_config(root)
        special = {attr: text for attr in _SPECIAL_ATTRIBUTES if (text := _token_text(config.get(attr))) is not None}
        extra = config.get("extra_special_tokens", config.get("additional_special_tokens"))
        if isinstance(extra, Mapping):
            extra = list(extra.values())
        extra_texts = [t for v in extra if (t := _token_text(v)) is not None] if isinstance(extra, list) else []
        missing = [t for t in [*special.values(), *extra_texts] if tok.token_to_id(t) is None]
        if missing:
            tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in dict.fromkeys(missing)])
        if "add_bos_token" in config or "add_eos_token" in config:
            tok.post_processor = _bos_eos_processor(
                tok,
                bos=special.get("bos_token") if config.get("add_bos_token") else None,
                eos=special.get("eos_token") if config.get("add_eos_token") else None,
            )
        source = _template_source(root, config)
        try:
            return cls(path=str(root), tokenizer=tok, special_tokens=special, chat_template=source)
        except jinja2.TemplateError as exc:
            raise TokenizerLoadError(f"{root}: chat template: {_one_line(exc)}") from None

    # -- SimTokenizer ---------------------------------------------------------------------------------

    @property
    def path(self) -> str:
        return self._path

    @property
    def max_token_id(self) -> int:
        return self._max_token_id

    def encode(self, text: str, *, add_special_tokens: bool) -> list[int]:
        ids: list[int] = self._tok.encode(text, add_special_tokens=add_special_tokens).ids
        return ids

    def count(self, text: str, *, add_special_tokens: bool) -> int:
        return len(self.encode(text, add_special_tokens=add_special_tokens))

    def decode(self, ids: Sequence[int]) -> str:
        """The text of ``ids``, special tokens included."""
        text: str = self._tok.decode(list(ids), skip_special_tokens=False)
        return text

    def render_chat(
        self,
        messages: Sequence[object],
        *,
        add_generation_prompt: bool = True,
        template_kwargs: Mapping[str, object] | None = None,
    ) -> str:
        """The prompt text of a chat, as ``apply_chat_template(..., tokenize=False)`` renders it.

        ``template_kwargs`` may carry ``tools``, ``documents`` and a request's ``chat_template_kwargs``
        (merged by the caller). Raises :class:`ChatFormatError` for malformed messages, a tokenizer
        without a chat template, and template errors (``raise_exception`` included).
        """
        if self._template is None:
            raise ChatFormatError(
                "The tokenizer has no chat template (tokenizer_config.json or chat_template.jinja), "
                "so chat requests cannot be rendered."
            )
        variables: dict[str, object] = {**self.special_tokens, **(template_kwargs or {})}
        variables.setdefault("tools", None)
        variables.setdefault("documents", None)
        variables["messages"] = [_message(m) for m in messages]
        variables["add_generation_prompt"] = add_generation_prompt
        try:
            return self._template.render(**variables)
        except (jinja2.TemplateError, TypeError, ValueError, KeyError, AttributeError) as exc:
            raise ChatFormatError(f"chat template error: {_one_line(exc)}") from None

    def generated_id(self, seed: int, index: int) -> int:
        return self.generation_ids[(seed + index * 7919) % len(self.generation_ids)]

    def generated_piece(self, seed: int, index: int) -> str:
        return self.generation_pieces[(seed + index * 7919) % len(self.generation_pieces)]

    def __repr__(self) -> str:
        return f"HFTokenizer({self.path!r})"

    # -- internals ------------------------------------------------------------------------------------

    def _single_token(self, piece: str) -> int | None:
        ids = self.encode(piece, add_special_tokens=False)
        if len(ids) != 1 or self.decode(ids) != piece:
            return None
        return ids[0]

    def _generation_vocabulary(self) -> tuple[tuple[int, ...], tuple[str, ...]]:
        chosen: dict[int, str] = {}
        for word in GENERATION_WORDS:
            token = self._single_token(" " + word)
            if token is not None:
                chosen.setdefault(token, " " + word)
        if len(chosen) < GENERATION_PIECES_MAX:
            vocab = self._tok.get_vocab(with_added_tokens=False)
            for token in sorted(vocab.values()):
                if len(chosen) >= GENERATION_PIECES_MAX:
                    break
                piece = self.decode([token])
                if token not in chosen and _VOCAB_WORD.fullmatch(piece) and self._single_token(piece) == token:
                    chosen[token] = piece
        if not chosen:
            raise TokenizerLoadError(f"{self.path}: no vocabulary word round-trips as a single ' word' token")
        ids, pieces = tuple(chosen), tuple(chosen.values())
        for order in (ids, ids[::-1]):
            text = "".join(chosen[i] for i in order)
            if self.encode(text, add_special_tokens=False) != list(order):
                raise TokenizerLoadError(f"{self.path}: generated words do not re-tokenize one to one")
        return ids, pieces


def _bos_eos_processor(tok: Tokenizer, *, bos: str | None, eos: str | None) -> processors.TemplateProcessing:
    """transformers' ``update_post_processor``: ``[bos:0] $A:0 [eos:0]`` (and the pair form)."""
    specials = [(t, tok.token_to_id(t)) for t in (bos, eos) if t is not None]
    head = f"{bos}:0 " if bos is not None else ""
    tail = f" {eos}:0" if eos is not None else ""
    single = f"{head}$A:0{tail}"
    pair = f"{single}{f' {bos}:1' if bos is not None else ''} $B:1{f' {eos}:1' if eos is not None else ''}"
    return processors.TemplateProcessing(single=single, pair=pair, special_tokens=specials)


def _message(message: object) -> dict[str, object]:
    """One chat message as a template sees it (vLLM's "string" content format)."""
    if not isinstance(message, Mapping):
        raise ChatFormatError("each message must be an object")
    role = message.get("role")
    if not isinstance(role, str):
        raise ChatFormatError("each message needs a string 'role'")
    out = {str(k): v for k, v in message.items()}
    content = message.get("content")
    if content is None:
        out["content"] = ""
    elif isinstance(content, list):
        out["content"] = "\n".join(text_blocks(content))  # vLLM joins text parts with new lines
    elif not isinstance(content, str):
        raise ChatFormatError("message content must be a string or a list of text blocks")
    return out
