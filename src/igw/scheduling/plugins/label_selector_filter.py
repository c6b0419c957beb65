"""``label-selector-filter``: keep the endpoints whose labels match a Kubernetes LabelSelector.

Consumes ``Endpoint.labels``. Parameters, with the semantics of ``metav1.LabelSelector``
(every requirement must hold; an empty selector matches every endpoint):

* ``matchLabels``: ``{key: value}``; the label must be present with exactly that value.
* ``matchExpressions``: ``[{key, operator, values}]`` with ``operator`` one of
  ``In`` (present, value in ``values``), ``NotIn`` (absent, or value not in ``values``),
  ``Exists`` (present), ``DoesNotExist`` (absent). ``In``/``NotIn`` need a non-empty
  ``values``; ``Exists``/``DoesNotExist`` take none.

This is a hard filter: when nothing matches it returns no endpoint (the request fails with
"no endpoint"), rather than passing everything through as the availability filter does. That
is the point of selecting by label (for example a role or a hardware class).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal, Self

from pydantic import Field, model_validator

from igw.api.types import Endpoint, EndpointState, InferenceRequest
from igw.framework.plugin import Handle, PluginParams
from igw.framework.registry import register
from igw.framework.scheduling import Filter

Operator = Literal["In", "NotIn", "Exists", "DoesNotExist"]


class LabelSelectorRequirement(PluginParams):
    key: str = Field(min_length=1)
    operator: Operator
    values: tuple[str, ...] = ()

    @model_validator(mode="after")
    def _check_values(self) -> Self:
        if self.operator in ("In", "NotIn") and not self.values:
            raise ValueError(f"operator {self.operator} on key {self.key!r} needs a non-empty values list")
        if self.operator in ("Exists", "DoesNotExist") and self.values:
            raise ValueError(f"operator {self.operator} on key {self.key!r} takes no values")
        return self


class LabelSelectorParams(PluginParams):
    match_labels: dict[str, str] = Field(default_factory=dict)
    match_expressions: tuple[LabelSelectorRequirement, ...] = ()


Check = Callable[[Mapping[str, str]], bool]


def _compile(req: LabelSelectorRequirement) -> Check:
    key, values = req.key, frozenset(req.values)
    if req.operator == "In":
        return lambda labels: labels.get(key) in values
    if req.operator == "NotIn":
        return lambda labels: key not in labels or labels[key] not in values
    if req.operator == "Exists":
        return lambda labels: key in labels
    return lambda labels: key not in labels


@register
class LabelSelectorFilter(Filter):
    type_name = "label-selector-filter"
    Params = LabelSelectorParams

    def __init__(
        self,
        name: str | None = None,
        *,
        match_labels: Mapping[str, str] | None = None,
        match_expressions: Sequence[LabelSelectorRequirement] = (),
    ) -> None:
        super().__init__(name)
        self.match_labels = dict(match_labels or {})
        self.match_expressions = tuple(match_expressions)
        self._checks: list[Check] = [_compile(r) for r in self.match_expressions]
        self._verdicts: dict[int, tuple[Endpoint, bool]] = {}
        """Match result per endpoint (labels only change when the pool redefines an endpoint,
        which makes a new ``Endpoint`` object), keyed by identity and checked against reuse."""

    @classmethod
    def from_params(cls, name: str, params: LabelSelectorParams, handle: Handle) -> LabelSelectorFilter:
        return cls(name, match_labels=params.match_labels, match_expressions=params.match_expressions)

    def describe(self) -> Mapping[str, Any]:
        return {
            "matchLabels": dict(self.match_labels),
            "matchExpressions": [
                {"key": r.key, "operator": r.operator, "values": list(r.values)} for r in self.match_expressions
            ],
        }

    def matches(self, labels: Mapping[str, str]) -> bool:
        return all(labels.get(k) == v for k, v in self.match_labels.items()) and all(
            check(labels) for check in self._checks
        )

    def filter(self, request: InferenceRequest, candidates: Sequence[EndpointState]) -> Sequence[EndpointState]:
        if not self.match_labels and not self._checks:
            return candidates
        verdicts = self._verdicts
        if len(verdicts) > 4 * len(candidates) + 1024:  # endpoints came and went: start over
            verdicts.clear()
        kept = []
        for c in candidates:
            endpoint = c.endpoint
            seen = verdicts.get(id(endpoint))
            if seen is None or seen[0] is not endpoint:
                seen = verdicts[id(endpoint)] = (endpoint, self.matches(dict(endpoint.labels)))
            if seen[1]:
                kept.append(c)
        return kept
