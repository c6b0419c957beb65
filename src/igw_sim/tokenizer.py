"""A deterministic toy tokenizer, shaped so that token counts behave like a real one.

Contract:

* A *piece* is a word (``\\w+``) or a single punctuation character, together with the whitespace that
  precedes it; whitespace at the very end of a text is one final piece. ``"".join(pieces(t)) == t``
  for every string ``t``.
* ``encode(t)`` maps each piece to a stable id in ``[FIRST_ID, VOCAB_SIZE)`` (``zlib.crc32``, so ids do
  not depend on ``PYTHONHASHSEED`` or the process). Ids below ``FIRST_ID`` are reserved.
* Generated text is a sequence of pieces ``" word"`` taken from ``GENERATION_WORDS``. Any concatenation of
  generated pieces re-tokenizes to exactly one piece per generated piece, so a client that counts tokens
  in the output agrees with ``usage.completion_tokens``.
* Chat prompts are tokenized from ``render_chat(messages)``: ``"<|role|>\\ncontent\\n"`` per message plus
  ``"<|assistant|>\\n"`` when a generation prompt is added.

The server and the engine do not call these functions directly: they call one :class:`SimTokenizer`
(``EngineConfig.tokenizer``), whose default implementation :data:`TOY` is this module. The other one,
:class:`igw_sim.hf_tokenizer.HFTokenizer`, tokenizes exactly like a real model (``igw-sim --tokenizer``).
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Mapping, Sequence
from typing import Protocol

__all__ = [
    "FIRST_ID",
    "GENERATION_WORDS",
    "TOY",
    "VOCAB_SIZE",
    "ChatFormatError",
    "SimTokenizer",
    "ToyTokenizer",
    "count",
    "encode",
    "generated_id",
    "generated_piece",
    "pieces",
    "render_chat",
    "seed_of",
    "synthetic_ids",
    "text_blocks",
]

VOCAB_SIZE = 50_000
"""Ids are in ``[FIRST_ID, VOCAB_SIZE)``."""

FIRST_ID = 3
"""Ids 0, 1 and 2 are reserved (pad, bos, eos in a real vocabulary)."""

_PIECE = re.compile(r"\s*\w+|\s*[^\w\s]|\s+\Z")

_WORDS_TEXT = """
    the of and to in is was for on are with as at be by this have from or one had not but what all were
    when we there can an your which their said if do will each about how up out them then she many some so
    these would other into has more her two like him see time could no make than first been its who now
    people my made over did down only way find use may water long little very after words called just where
    most know get through back much before go good new write our used me man too any day same right look
    think also around another came come work three word must because does part even place well such here
    take why things help put years different away again off went old number great tell men say small every
    found still between name should home big give air line set own under read last never us left end along
    while might next sound below saw something thought both few those always looked show large often
    together asked house world going want school important until form food keep children feet land side
    without boy once animals life enough took sometimes four head above kind began almost live page got
    earth need far hand high year mother light parts country father let night following picture being study
    second eyes soon times story boys since white days ever paper hard near sentence better best across
    during today others sure means knew its try told young miles sun ways thing whole hear example heard
    several change answer room sea against top turned learn point city play toward five using himself usually
"""

GENERATION_WORDS: tuple[str, ...] = tuple(dict.fromkeys(_WORDS_TEXT.split()))
"""Plain lower-case English words; every generated piece is ``" " + one of these``."""


class ChatFormatError(ValueError):
    """A chat message list is not ``[{"role": str, "content": str | [{"type": "text", "text": str}]}]``."""


def pieces(text: str) -> list[str]:
    """Split ``text`` into pieces; joining them gives back ``text`` exactly."""
    return _PIECE.findall(text)


def count(text: str) -> int:
    """Number of tokens in ``text`` (``len(encode(text))``, without computing the ids).

    Counted with ``subn`` so that huge prompts cost neither a Python-level loop nor a list of pieces.
    """
    return _PIECE.subn("", text)[1]


def encode(text: str) -> list[int]:
    """Token ids of ``text``: one id per piece, each in ``[FIRST_ID, VOCAB_SIZE)``, stable across runs."""
    return [_piece_id(p) for p in pieces(text)]


def generated_piece(seed: int, index: int) -> str:
    """The ``index``-th generated piece of a request whose generation seed is ``seed``.

    Deterministic: the same ``(seed, index)`` always gives the same ``" word"``.
    """
    return " " + GENERATION_WORDS[(seed + index * 7919) % len(GENERATION_WORDS)]


def _piece_id(piece: str) -> int:
    return FIRST_ID + zlib.crc32(piece.encode("utf-8", "surrogatepass")) % (VOCAB_SIZE - FIRST_ID)


_GENERATED_IDS: tuple[int, ...] = tuple(_piece_id(" " + word) for word in GENERATION_WORDS)


def generated_id(seed: int, index: int) -> int:
    """The token id of :func:`generated_piece` ``(seed, index)`` (``encode(piece) == [id]``)."""
    return _GENERATED_IDS[(seed + index * 7919) % len(GENERATION_WORDS)]


def synthetic_ids(count: int, salt: int) -> list[int]:
    """``count`` pseudo-random ids for a prompt given only by its length; different salts give
    different first tokens, so such prompts never share a cached prefix."""
    span = VOCAB_SIZE - FIRST_ID
    state = (salt * 2_654_435_761 + 1) & 0xFFFFFFFF
    out: list[int] = []
    for _ in range(count):
        state = (state * 1_103_515_245 + 12_345) & 0x7FFFFFFF
        out.append(FIRST_ID + state % span)
    return out


def _content_text(content: object) -> str:
    if isinstance(content, str):
        return content
    if content is None:
        return ""
    if isinstance(content, list):
        return "".join(text_blocks(content))
    raise ChatFormatError("message content must be a string or a list of text blocks")


def text_blocks(content: Sequence[object]) -> list[str]:
    """The texts of a message's content blocks (``[{"type": "text", "text": ...}]``), validated."""
    texts: list[str] = []
    for block in content:
        if not isinstance(block, Mapping) or block.get("type") != "text":
            raise ChatFormatError("content blocks must be objects with type 'text'")
        text = block.get("text")
        if not isinstance(text, str):
            raise ChatFormatError("a text content block needs a string 'text'")
        texts.append(text)
    return texts


def render_chat(messages: Sequence[object], *, add_generation_prompt: bool = True) -> str:
    """Render chat messages into the prompt text that is tokenized.

    Raises :class:`ChatFormatError` when a message is not an object with a string ``role`` and a string
    (or list of text blocks, concatenated) ``content``.
    """
    out: list[str] = []
    for message in messages:
        if not isinstance(message, Mapping):
            raise ChatFormatError("each message must be an object")
        role = message.get("role")
        if not isinstance(role, str):
            raise ChatFormatError("each message needs a string 'role'")
        out.append(f"<|{role}|>\n{_content_text(message.get('content'))}\n")
    if add_generation_prompt:
        out.append("<|assistant|>\n")
    return "".join(out)


def seed_of(text: str) -> int:
    """A generation seed derived from the prompt text (stable across runs)."""
    return zlib.crc32(text.encode("utf-8", "surrogatepass"))


class SimTokenizer(Protocol):
    """What the simulated server and engine need from a tokenizer.

    Contract:

    * ``encode`` and ``count`` are pure and deterministic; ``count(t, ...) == len(encode(t, ...))``.
      ``add_special_tokens`` follows vLLM: true for completion prompts (a BOS, when the model adds one),
      false for a rendered chat (the template already wrote its special tokens).
    * ``render_chat`` raises :class:`ChatFormatError` for messages or template inputs it cannot render
      (the server answers 400).
    * ``generated_piece(seed, i)`` is the text of the token ``generated_id(seed, i)``, and any
      concatenation of generated pieces re-tokenizes (without special tokens) to exactly their ids.
    * ``max_token_id`` bounds the ids a prompt given as token ids may carry (``None``: no check).
    * Implementations are immutable and shared by every engine that uses them.
    """

    @property
    def path(self) -> str | None:
        """The tokenizer directory (``None`` for the toy tokenizer)."""
        ...

    @property
    def max_token_id(self) -> int | None: ...

    def encode(self, text: str, *, add_special_tokens: bool) -> list[int]: ...

    def count(self, text: str, *, add_special_tokens: bool) -> int: ...

    def render_chat(
        self,
        messages: Sequence[object],
        *,
        add_generation_prompt: bool = True,
        template_kwargs: Mapping[str, object] | None = None,
    ) -> str: ...

    def generated_id(self, seed: int, index: int) -> int: ...

    def generated_piece(self, seed: int, index: int) -> str: ...


class ToyTokenizer:
    """:class:`SimTokenizer` over this module's functions (no special tokens, no chat template).

    ``generated_id`` and ``generated_piece`` are the module functions themselves, so the engine's hot
    path pays no extra call for going through the interface.
    """

    __slots__ = ()

    path: str | None = None
    max_token_id: int | None = None
    generated_id = staticmethod(generated_id)
    generated_piece = staticmethod(generated_piece)

    def encode(self, text: str, *, add_special_tokens: bool) -> list[int]:
        return encode(text)

    def count(self, text: str, *, add_special_tokens: bool) -> int:
        return count(text)

    def render_chat(
        self,
        messages: Sequence[object],
        *,
        add_generation_prompt: bool = True,
        template_kwargs: Mapping[str, object] | None = None,
    ) -> str:
        return render_chat(messages, add_generation_prompt=add_generation_prompt)

    def __repr__(self) -> str:
        return "ToyTokenizer()"


TOY: SimTokenizer = ToyTokenizer()
"""The default tokenizer of every engine."""
