"""Failure injection for one simulated endpoint.

* **Errors**: a fraction ``error_rate`` of generation requests is answered at once with an OpenAI-style
  error of one of ``error_kinds`` (picked uniformly; names and statuses as llm-d-inference-sim's
  ``failure-types``). The draw uses a seeded generator, so a run is reproducible.
* **Stall**: the engine computes nothing for a while (a hung GPU): requests keep being accepted and
  queue up, ``/metrics`` keeps answering (see :meth:`igw_sim.engine.Engine.stall`).
* **Unhealthy**: ``/health`` answers 503; everything else still works.
* **Crash**: every in-flight request is cut (connections closed without a final chunk), and the endpoint
  stops listening when its fleet owns it; a crashed endpoint never comes back.

Faults can be set at start-up (CLI flags) or at run time with ``POST /sim/faults``.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

__all__ = ["ERROR_KINDS", "Faults"]

ERROR_KINDS: dict[str, tuple[int, str]] = {
    "rate_limit": (429, "Rate limit reached for the simulated model."),
    "invalid_api_key": (401, "Incorrect API key provided."),
    "context_length": (400, "This model's maximum context length has been exceeded (injected)."),
    "server_error": (500, "The server had an error while processing your request (injected)."),
    "invalid_request": (400, "Invalid request (injected)."),
    "model_not_found": (404, "The model does not exist (injected)."),
}
"""Injectable error kinds: ``name -> (HTTP status, message)``."""


@dataclass(slots=True)
class Faults:
    """The mutable fault state of one endpoint."""

    error_rate: float = 0.0
    """Fraction of generation requests answered with an injected error, in ``[0, 1]``."""
    error_kinds: tuple[str, ...] = ("server_error",)
    unhealthy: bool = False
    crashed: bool = False
    seed: int = 0
    _rng: random.Random = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.validate()
        self._rng = random.Random(self.seed)

    def validate(self) -> None:
        if not 0.0 <= self.error_rate <= 1.0:
            raise ValueError("error_rate must be in [0, 1]")
        if not self.error_kinds:
            raise ValueError("error_kinds must not be empty")
        unknown = [k for k in self.error_kinds if k not in ERROR_KINDS]
        if unknown:
            raise ValueError(f"unknown error kinds {unknown} (choose from {', '.join(ERROR_KINDS)})")

    def draw_error(self) -> tuple[int, str] | None:
        """``(status, message)`` when this request must fail, else ``None``."""
        if self.error_rate <= 0.0 or self._rng.random() >= self.error_rate:
            return None
        return ERROR_KINDS[self._rng.choice(self.error_kinds)]

    def as_json(self) -> dict[str, object]:
        return {
            "error_rate": self.error_rate,
            "error_kinds": list(self.error_kinds),
            "unhealthy": self.unhealthy,
            "crashed": self.crashed,
        }
