"""Estimated tokens per request and a ledger of the tokens in flight per endpoint.

Shared by the plugins that balance or limit by tokens (``inflight-load-producer``,
``concurrency-detector`` in tokens mode). No tokenizer runs on the request path; as in the
reference, a token is about 4 characters::

    input  = ceil(len(prompt_text) / 4)   or ceil(body_size / 4) when the prompt is unknown
    output = ceil(1.5 * input)            (the reference's guess; max_tokens is not used)
    charge = max(1, input + output)
"""

from __future__ import annotations

from collections.abc import Iterable

from igw.api.types import InferenceRequest

CHARS_PER_TOKEN = 4


def estimate_tokens(request: InferenceRequest) -> int:
    """Input plus expected output tokens of ``request``."""
    size = len(request.prompt_text) if request.prompt_text is not None else request.body_size
    tokens_in = (size + CHARS_PER_TOKEN - 1) // CHARS_PER_TOKEN
    tokens_out = (3 * tokens_in + 1) // 2
    return max(1, tokens_in + tokens_out)


class InflightLedger:
    """Tokens charged per endpoint, released exactly once per request.

    A charge is remembered under the request's unique ``key`` (client-chosen request ids may
    repeat) and released from the endpoint it was charged
    to, even if the request was served elsewhere (a fallback): releasing from the other
    endpoint would leave the charge stuck. Releasing an unknown key does nothing; counts
    never go below zero. Charging the same key twice replaces the first charge.
    """

    __slots__ = ("_charges", "load")

    def __init__(self) -> None:
        self.load: dict[str, int] = {}
        """Tokens in flight per endpoint address (only addresses with a load)."""
        self._charges: dict[int, tuple[str, int]] = {}

    def charge(self, key: int, address: str, tokens: int) -> None:
        self.release(key)
        self.load[address] = self.load.get(address, 0) + tokens
        self._charges[key] = (address, tokens)

    def move(self, key: int, address: str) -> None:
        """The request is served by ``address`` (a fallback): its charge moves there."""
        charge = self._charges.get(key)
        if charge is None or charge[0] == address:
            return
        tokens = charge[1]
        self.release(key)
        self.charge(key, address, tokens)

    def release(self, key: int) -> None:
        charge = self._charges.pop(key, None)
        if charge is None:
            return
        address, tokens = charge
        left = self.load.get(address, 0) - tokens
        if left > 0:
            self.load[address] = left
        else:
            self.load.pop(address, None)

    def retain(self, addresses: Iterable[str]) -> None:
        """Forget every endpoint not in ``addresses`` (the pool changed)."""
        keep = set(addresses)
        self.load = {a: t for a, t in self.load.items() if a in keep}
        self._charges = {r: c for r, c in self._charges.items() if c[0] in keep}
