"""Model rewrites by incoming model name: InferenceModelRewrite (and legacy InferenceModel) rules.

Written by the controllers (Kubernetes mode), read by the director for every request:

* :meth:`RewriteStore.decide` picks the model the server gets: the rule for the request's
  model (an exact match beats a rule that matches every model; among rules of the same kind
  the first one given wins), then one of its targets at random, in proportion to the
  weights (all weights zero: uniform). ``None``: no rule, the model goes through unchanged.
  The response must carry the model name the client asked for (``Rewrite.model``).
* :meth:`RewriteStore.objective_for` is the objective a request for a model gets when it
  names none (legacy InferenceModel ``criticality``; see ``docs/kubernetes.md``).

Everything runs on one event loop: a writer replaces the whole rule table in one assignment,
so a reader never sees half of an update. The random draw comes from an injectable
``random.Random`` so tests (and simulations) are deterministic.
"""

from __future__ import annotations

import bisect
import random
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from itertools import accumulate


@dataclass(frozen=True, slots=True)
class RewriteTarget:
    """A model to send the request to, with its share of the traffic."""

    model: str
    weight: int = 1
    """Relative weight (the reference allows 1-1,000,000; 0 counts only if all are 0)."""


@dataclass(frozen=True, slots=True)
class RewriteRule:
    """One rule: which incoming models it matches, and the weighted targets."""

    name: str
    """Where the rule comes from, e.g. ``InferenceModelRewrite/ns/name`` (the metric's
    ``model_rewrite_name`` label and log lines)."""
    models: frozenset[str]
    """Exact incoming model names; empty: every model (a generic rule)."""
    targets: tuple[RewriteTarget, ...]
    _cumulative: tuple[int, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not self.targets:
            raise ValueError(f"rewrite rule {self.name!r} has no targets")
        if any(t.weight < 0 for t in self.targets):
            raise ValueError(f"rewrite rule {self.name!r}: weights must not be negative")
        weights = [t.weight for t in self.targets]
        if not any(weights):  # all zero (or unset upstream): uniform
            weights = [1] * len(weights)
        object.__setattr__(self, "_cumulative", tuple(accumulate(weights)))

    def choose(self, rng: random.Random) -> str:
        """One target model, drawn in proportion to the weights."""
        if len(self.targets) == 1:
            return self.targets[0].model
        point = rng.random() * self._cumulative[-1]
        return self.targets[bisect.bisect_right(self._cumulative, point)].model


@dataclass(frozen=True, slots=True)
class Rewrite:
    """A decision for one request."""

    rule: str
    """The rule's name (metric label ``model_rewrite_name``)."""
    model: str
    """The model the client asked for (put back into the response)."""
    target: str
    """The model the server gets (may equal ``model``)."""


class RewriteStore:
    """Rewrite rules by incoming model, plus the legacy per-model default objective."""

    def __init__(
        self,
        rules: Iterable[RewriteRule] = (),
        *,
        model_objectives: Mapping[str, str] | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self._rng = rng or random.Random()
        self._rules: tuple[RewriteRule, ...] = ()
        self._exact: dict[str, RewriteRule] = {}
        self._generic: RewriteRule | None = None
        self._model_objectives: dict[str, str] = dict(model_objectives or {})
        self.set_rules(rules)

    # -- writers (controllers; level-triggered: every call replaces everything) ---------------
    def set_rules(self, rules: Iterable[RewriteRule]) -> None:
        """Replace every rule. ``rules`` come in precedence order (the first match wins)."""
        ordered = tuple(rules)
        exact: dict[str, RewriteRule] = {}
        generic: RewriteRule | None = None
        for rule in ordered:
            if not rule.models:
                generic = generic or rule
            for model in rule.models:
                exact.setdefault(model, rule)
        self._rules, self._exact, self._generic = ordered, exact, generic

    def set_model_objectives(self, mapping: Mapping[str, str]) -> None:
        """Replace the model -> default objective table (legacy InferenceModel)."""
        self._model_objectives = dict(mapping)

    # -- readers (director, per request) ------------------------------------------------------
    def rule_for(self, model: str | None) -> RewriteRule | None:
        """The rule that applies to ``model``: an exact match, else the generic rule, else None."""
        if model is None:
            return None
        return self._exact.get(model) or self._generic

    def decide(self, model: str | None) -> Rewrite | None:
        """The rewrite for a request for ``model`` (a fresh random draw per call), or None."""
        rule = self.rule_for(model)
        if rule is None or model is None:
            return None
        return Rewrite(rule=rule.name, model=model, target=rule.choose(self._rng))

    def rewrite(self, model: str | None) -> str | None:
        """The target model for ``model``, or None when no rule applies."""
        decision = self.decide(model)
        return decision.target if decision is not None else None

    def objective_for(self, model: str | None) -> str | None:
        """The objective for a request that names none (legacy InferenceModel), or None."""
        return self._model_objectives.get(model) if model is not None else None

    def rules(self) -> tuple[RewriteRule, ...]:
        return self._rules

    def model_objectives(self) -> dict[str, str]:
        return dict(self._model_objectives)
