"""``token-producer``: the prompt's token ids exactly as the model server will compute them.

Writes a :class:`~igw.api.types.TokenizedPrompt` into ``request.data`` for the consumers that
need real token ids (``precise-prefix-cache-scorer`` recomputes the engines' KV block keys from
them). Tokenization is the engine's own (:mod:`igw.parsing.tokenizer`: the model's
``tokenizer.json`` and chat template, vLLM's rules for completions and chats), configured per
model; LoRA adapters use their base model's tokenizer and are named in the result, since the
engine folds the adapter into every block hash.

Parameters::

    tokenizers:            # served model name -> directory with tokenizer.json (+ tokenizer_config.json)
      meta-llama/Llama-3.1-8B-Instruct: /models/llama-3.1-8b
    tokenizer: /models/x   # shorthand: one directory for every model (names it as "*")
    loraAdapters:          # adapter name -> base model (its tokenizer)
      sql-lora: meta-llama/Llama-3.1-8B-Instruct
    prefixCacheMaxTokens: 4000000

A request for a model without a tokenizer, or whose body cannot be tokenized (a batch of
prompts, a template error), gets no data: its consumers fall back (the precise scorer to the
approximate index) and count why. The first time a model has no tokenizer an error is logged
naming the parameter to set.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

from pydantic import Field

from igw.api.types import TOKENIZED_PROMPT_KEY, EndpointState, InferenceRequest, TokenizedPrompt
from igw.framework.plugin import Handle, PluginParams
from igw.framework.registry import register
from igw.framework.requestcontrol import DataProducer
from igw.parsing.chat_template import chat_template_kwargs
from igw.parsing.errors import TokenizerError, TokenizerUnavailable
from igw.parsing.tokenizer import Tokenizer, TokenizerSet, TokenizerSettings

log = logging.getLogger("igw.parsing")

ANY_MODEL = "*"


class TokenProducerParams(PluginParams):
    tokenizers: dict[str, str] = Field(default_factory=dict)
    tokenizer: str | None = None
    lora_adapters: dict[str, str] = Field(default_factory=dict)
    prefix_cache_max_tokens: int = Field(default=4_000_000, ge=0)


@register
class TokenProducer(DataProducer):
    type_name = "token-producer"
    Params = TokenProducerParams
    produces = frozenset({TOKENIZED_PROMPT_KEY})

    def __init__(
        self,
        name: str | None = None,
        *,
        tokenizers: TokenizerSet | None = None,
        described: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(name)
        self.tokenizers = tokenizers or TokenizerSet({})
        self._described = dict(described or {})
        self.missing: dict[str, int] = {}
        """Requests left without tokens, by reason (``no-tokenizer``, ``unsupported``, ``error``)."""
        self._reported: set[tuple[str, str]] = set()

    @classmethod
    def from_params(cls, name: str, params: TokenProducerParams, handle: Handle) -> TokenProducer:
        directories = dict(params.tokenizers)
        if params.tokenizer is not None:
            directories.setdefault(ANY_MODEL, params.tokenizer)
        settings = TokenizerSettings(prefix_cache_max_tokens=params.prefix_cache_max_tokens)
        try:
            tokenizers = TokenizerSet(directories, adapters=params.lora_adapters, settings=settings)
            tokenizers.load_all()
        except TokenizerError as exc:
            raise ValueError(str(exc)) from None
        return cls(name, tokenizers=tokenizers, described=params.model_dump(by_alias=True, exclude_defaults=True))

    def describe(self) -> Mapping[str, Any]:
        return self._described

    def prepare(self, request: InferenceRequest, candidates: Sequence[EndpointState]) -> None:
        model = request.target_model or request.model or ""
        lookup = model if model in self.tokenizers else ANY_MODEL
        try:
            tokenizer = self.tokenizers.get(lookup)
        except TokenizerUnavailable:
            self._miss("no-tokenizer", model)
            return
        except TokenizerError as exc:
            self._miss("error", model, str(exc))
            return
        body = request.body or {}
        try:
            ids = self._encode(tokenizer, body)
        except (TokenizerError, ValueError, TypeError) as exc:
            self._miss("error", model, str(exc))
            return
        if ids is None:
            self._miss("unsupported", model)
            return
        base = self.tokenizers.resolve(lookup) if lookup != ANY_MODEL else model
        salt = body.get("cache_salt")
        request.data[TOKENIZED_PROMPT_KEY] = TokenizedPrompt(
            token_ids=ids,
            model=model,
            lora=model if lookup != ANY_MODEL and base != model else None,
            cache_salt=salt if isinstance(salt, str) else None,
        )

    @staticmethod
    def _encode(tokenizer: Tokenizer, body: Mapping[str, Any]) -> list[int] | None:
        messages = body.get("messages")
        if isinstance(messages, list):
            return list(
                tokenizer.encode_chat(
                    messages,
                    add_generation_prompt=bool(body.get("add_generation_prompt", True)),
                    continue_final_message=bool(body.get("continue_final_message", False)),
                    tools=body.get("tools"),
                    chat_template_kwargs=chat_template_kwargs(body),
                )
            )
        prompt = body.get("prompt")
        if isinstance(prompt, str):
            return list(tokenizer.encode_completion(prompt))
        if isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt):
            return list(prompt)  # already token ids
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            return list(tokenizer.encode_completion(prompt[0]))
        return None  # a batch of prompts, or no prompt: nothing one engine key chain describes

    def _miss(self, reason: str, model: str, detail: str = "") -> None:
        self.missing[reason] = self.missing.get(reason, 0) + 1
        if (reason, model) in self._reported:
            return
        self._reported.add((reason, model))
        if reason == "no-tokenizer":
            log.error(
                "%s: no tokenizer for model %r: set parameters.tokenizers[%r] (a directory with tokenizer.json) "
                "or parameters.tokenizer; its requests fall back to approximate prefix routing",
                self.name, model, model,
            )  # fmt: skip
        elif reason == "error":
            log.error("%s: cannot tokenize a request for %r: %s", self.name, model, detail)
