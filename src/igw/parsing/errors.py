"""The tokenizer's and the chat template's errors (one hierarchy, so callers catch the base)."""

from __future__ import annotations

__all__ = ["ChatTemplateError", "TokenizerError", "TokenizerUnavailable"]


class TokenizerError(Exception):
    """The tokenizer directory is broken: the message names the file and the problem.

    Base of the tokenizer's errors, so a caller that can route without ids catches just this::

        TokenizerError            broken directory (missing/invalid tokenizer.json, bad config)
        ├── TokenizerUnavailable  no tokenizer configured for the model
        └── ChatTemplateError     no chat template, or the template rejected the messages
                                  (the engine answers 400 to such a request)
    """


class ChatTemplateError(TokenizerError):
    """The model has no chat template, or rendering it failed for these messages."""


class TokenizerUnavailable(TokenizerError):
    """No tokenizer directory is configured for ``model`` (nor for its base model)."""

    def __init__(self, model: str) -> None:
        super().__init__(f"no tokenizer is configured for model {model!r}")
        self.model = model
