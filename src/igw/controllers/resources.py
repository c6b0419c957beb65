"""What the controllers read from Kubernetes objects: pure functions over the wire dicts.

* :func:`parse_pool`: an InferencePool (``inference.networking.k8s.io/v1``, or the pre-GA
  ``inference.networking.x-k8s.io/v1alpha2`` shape) -> :class:`PoolInfo` (selector, ports).
* :func:`pod_endpoints`: the pool's Pods -> endpoints, one per target port of every Pod that is
  Ready, not terminating and has an IP; the ``inference.networking.k8s.io/active-ports``
  annotation (comma-separated port numbers) narrows the target ports of that Pod. Pod labels
  become endpoint labels, so the data layer reads the engine from
  ``inference.networking.k8s.io/engine-type`` (the extractor's ``engineLabelKey``).
* :func:`objective_priorities`, :func:`rewrite_rules`, :func:`legacy_models`: the
  InferenceObjective, InferenceModelRewrite and legacy InferenceModel objects that reference
  the pool -> priorities, rewrite rules in precedence order, per-model default objectives.

Objects are the JSON dicts the API server sends (``TypedDict`` would add nothing: every field
is optional on the wire and checked here). Invalid objects raise :class:`InvalidObject` or are
skipped with a log line; the CRDs' validation makes both rare.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from igw.api.types import Endpoint, format_address
from igw.datalayer.rewrites import RewriteRule, RewriteTarget

log = logging.getLogger("igw.controllers")

Obj = dict[str, Any]

POOL_GROUP = "inference.networking.k8s.io"
"""The GA InferencePool group (``v1``)."""
X_GROUP = "inference.networking.x-k8s.io"
"""InferenceObjective, InferenceModelRewrite, legacy InferenceModel and the pre-GA pool."""
ACTIVE_PORTS_ANNOTATION = "inference.networking.k8s.io/active-ports"
ENGINE_TYPE_LABEL = "inference.networking.k8s.io/engine-type"
CRITICALITY_PRIORITY: Mapping[str, int] = {"Critical": 1, "Standard": 0, "Sheddable": -1}
"""Legacy InferenceModel ``criticality`` -> InferenceObjective ``priority`` (unset: Standard)."""


class InvalidObject(ValueError):
    """An object the controllers cannot use; the message names it and says why."""


@dataclass(frozen=True, slots=True)
class PoolInfo:
    """What the EPP needs of an InferencePool (or of the selector flags in standalone mode)."""

    name: str
    namespace: str
    selector: tuple[tuple[str, str], ...]
    """``matchLabels``, sorted."""
    target_ports: tuple[int, ...]

    def label_selector(self) -> str:
        """The selector as the API's ``labelSelector`` query (``k=v,k2=v2``)."""
        return ",".join(f"{k}={v}" for k, v in self.selector)


def _meta(obj: Obj) -> Obj:
    meta = obj.get("metadata")
    return meta if isinstance(meta, dict) else {}


def _name(obj: Obj) -> str:
    meta = _meta(obj)
    return f"{meta.get('namespace', '')}/{meta.get('name', '')}"


def _ports(values: Iterable[Any], where: str) -> tuple[int, ...]:
    ports: list[int] = []
    for value in values:
        if not isinstance(value, int) or isinstance(value, bool) or not 0 < value < 65536:
            raise InvalidObject(f"{where}: port {value!r} is not a number in 1-65535")
        if value in ports:
            raise InvalidObject(f"{where}: port {value} is listed twice")
        ports.append(value)
    if not 1 <= len(ports) <= 8:
        raise InvalidObject(f"{where}: give 1 to 8 target ports, not {len(ports)}")
    return tuple(ports)


def _labels(value: Any, where: str) -> tuple[tuple[str, str], ...]:
    if not isinstance(value, dict) or not value:
        raise InvalidObject(f"{where}: the selector needs at least one label")
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        raise InvalidObject(f"{where}: selector labels must be strings")
    return tuple(sorted(value.items()))


def parse_pool(obj: Obj) -> PoolInfo:
    """The pool's selector and target ports (GA ``v1`` shape, or the pre-GA ``v1alpha2`` one)."""
    meta, where = _meta(obj), f"InferencePool {_name(obj)}"
    spec = obj.get("spec")
    if not isinstance(spec, dict):
        raise InvalidObject(f"{where}: no spec")
    selector = spec.get("selector")
    if "targetPorts" in spec:  # v1: selector.matchLabels, targetPorts[].number
        if not isinstance(selector, dict):
            raise InvalidObject(f"{where}: spec.selector must be an object with matchLabels")
        labels = _labels(selector.get("matchLabels"), where)
        raw_ports = spec.get("targetPorts")
        if not isinstance(raw_ports, list) or not all(isinstance(p, dict) for p in raw_ports):
            raise InvalidObject(f"{where}: spec.targetPorts must be a list of {{number: port}}")
        ports = _ports((p.get("number") for p in raw_ports), where)
    elif "targetPortNumber" in spec:  # v1alpha2: selector is the label map, one targetPortNumber
        labels = _labels(selector, where)
        ports = _ports([spec.get("targetPortNumber")], where)
    else:
        raise InvalidObject(f"{where}: spec has no targetPorts")
    return PoolInfo(str(meta.get("name", "")), str(meta.get("namespace", "")), labels, ports)


def parse_selector_flag(text: str) -> tuple[tuple[str, str], ...]:
    """``--endpoint-selector`` (``k=v,k2=v2``) -> sorted label pairs; ValueError when malformed."""
    pairs: dict[str, str] = {}
    for term in (t.strip() for t in text.split(",")):
        if not term:
            continue
        key, sep, value = term.partition("=")
        key, value = key.strip(), value.strip()
        if not sep or not key or value.startswith("="):
            raise ValueError(f"endpoint selector term {term!r} is not key=value")
        pairs[key] = value
    if not pairs:
        raise ValueError("the endpoint selector is empty")
    return tuple(sorted(pairs.items()))


# -- pods ----------------------------------------------------------------------------------------


def pod_ready(pod: Obj) -> bool:
    """Ready condition True and not being deleted (as the reference)."""
    if _meta(pod).get("deletionTimestamp"):
        return False
    for condition in (pod.get("status") or {}).get("conditions") or ():
        if isinstance(condition, dict) and condition.get("type") == "Ready":
            return condition.get("status") == "True"
    return False


def active_ports(pod: Obj) -> frozenset[int] | None:
    """The ports the ``active-ports`` annotation lists (bad entries skipped); None: no annotation."""
    text = (_meta(pod).get("annotations") or {}).get(ACTIVE_PORTS_ANNOTATION)
    if text is None:
        return None
    ports: set[int] = set()
    for part in str(text).split(","):
        part = part.strip()
        if part.isdigit() and 0 < int(part) < 65536:
            ports.add(int(part))
    return frozenset(ports)


def pod_endpoints(pods: Iterable[Obj], pool: PoolInfo) -> list[Endpoint]:
    """Endpoints of the Ready pods, ordered by pod name then target port; duplicates dropped."""
    selector = dict(pool.selector)
    out: list[Endpoint] = []
    seen: set[str] = set()
    for pod in sorted(pods, key=lambda p: str(_meta(p).get("name", ""))):
        meta = _meta(pod)
        labels = meta.get("labels") or {}
        if any(labels.get(k) != v for k, v in selector.items()):
            continue  # the server filters too; a stale cache entry must not slip through
        ip = (pod.get("status") or {}).get("podIP")
        if not ip or not pod_ready(pod):
            continue
        allowed = active_ports(pod)
        label_pairs = tuple(sorted((str(k), str(v)) for k, v in labels.items()))
        for port in pool.target_ports:
            if allowed is not None and port not in allowed:
                continue
            address = format_address(str(ip), port)
            if address in seen:
                continue
            seen.add(address)
            out.append(Endpoint(address=address, host=str(ip), port=port, labels=label_pairs))
    return out


# -- objectives and rewrites --------------------------------------------------------------------


def references_pool(obj: Obj, pool_name: str, pool_group: str = POOL_GROUP) -> bool:
    """``spec.poolRef`` names this pool (group defaults to the GA group, kind to InferencePool)."""
    ref = (obj.get("spec") or {}).get("poolRef")
    if not isinstance(ref, dict) or ref.get("name") != pool_name:
        return False
    return (ref.get("group") or POOL_GROUP) == pool_group and (ref.get("kind") or "InferencePool") == "InferencePool"


def _created(obj: Obj) -> tuple[str, str]:
    """Sort key: oldest first, then by name (RFC 3339 timestamps sort as text)."""
    meta = _meta(obj)
    return (str(meta.get("creationTimestamp") or ""), str(meta.get("name") or ""))


def objective_priorities(objects: Iterable[Obj], pool_name: str, pool_group: str = POOL_GROUP) -> dict[str, int]:
    """InferenceObjective name -> priority (unset: 0), for the objectives of this pool."""
    out: dict[str, int] = {}
    for obj in sorted(objects, key=_created):
        if not references_pool(obj, pool_name, pool_group):
            continue
        priority = (obj.get("spec") or {}).get("priority", 0)
        if priority is None:
            priority = 0
        if not isinstance(priority, int) or isinstance(priority, bool):
            log.warning("InferenceObjective %s: priority %r is not an integer; ignored", _name(obj), priority)
            continue
        out.setdefault(str(_meta(obj).get("name")), priority)
    return out


def _targets(raw: Any, where: str, *, name_key: str) -> tuple[RewriteTarget, ...]:
    if not isinstance(raw, list) or not raw:
        raise InvalidObject(f"{where}: no targets")
    weighted = sum(1 for item in raw if isinstance(item, dict) and item.get("weight") is not None)
    if name_key == "modelRewrite" and 0 < weighted < len(raw):  # InferenceModelRewrite: all or none
        raise InvalidObject(f"{where}: give a weight to every target or to none")
    targets: list[RewriteTarget] = []
    for item in raw:
        model = item.get(name_key) if isinstance(item, dict) else None
        if not isinstance(model, str) or not model:
            raise InvalidObject(f"{where}: a target has no {name_key}")
        weight = item.get("weight", 1)
        if weight is None:
            weight = 1
        if not isinstance(weight, int) or isinstance(weight, bool) or weight < 0:
            raise InvalidObject(f"{where}: weight {weight!r} of {model!r} is not a non-negative integer")
        targets.append(RewriteTarget(model, weight))
    return tuple(targets)


def rewrite_rules(objects: Iterable[Obj], pool_name: str, pool_group: str = POOL_GROUP) -> list[RewriteRule]:
    """The rules of this pool's InferenceModelRewrites, oldest resource first, rules in order."""
    rules: list[RewriteRule] = []
    for obj in sorted(objects, key=_created):
        if not references_pool(obj, pool_name, pool_group):
            continue
        name = f"InferenceModelRewrite/{_name(obj)}"
        raw_rules = (obj.get("spec") or {}).get("rules") or []
        for index, raw in enumerate(raw_rules if isinstance(raw_rules, list) else []):
            where = f"{name} rule {index}"
            try:
                if not isinstance(raw, dict):
                    raise InvalidObject(f"{where}: not an object")
                models: set[str] = set()
                for match in raw.get("matches") or ():
                    model = (match or {}).get("model") or {}
                    if (model.get("type") or "Exact") != "Exact" or not isinstance(model.get("value"), str):
                        raise InvalidObject(f"{where}: only Exact model matches with a value are supported")
                    models.add(model["value"])
                rules.append(
                    RewriteRule(name, frozenset(models), _targets(raw.get("targets"), where, name_key="modelRewrite"))
                )
            except InvalidObject as exc:
                log.warning("%s; rule skipped", exc)
    return rules


@dataclass(slots=True)
class LegacyModels:
    """What the legacy InferenceModels of a pool amount to."""

    priorities: dict[str, int] = field(default_factory=dict)
    """An objective per InferenceModel, named like it, with the criticality's priority."""
    model_objectives: dict[str, str] = field(default_factory=dict)
    """``spec.modelName`` -> that objective (requests for the model that name no objective)."""
    rules: list[RewriteRule] = field(default_factory=list)
    """``targetModels`` as weighted rewrites of ``spec.modelName``."""


def legacy_models(objects: Iterable[Obj], pool_name: str) -> LegacyModels:
    """Legacy ``InferenceModel`` (v1alpha2, up to GIE v0.5) -> objectives and rewrites.

    The pool reference is matched by name only: seed users' models still name the pre-GA
    pool group. When two models claim one ``modelName``, the oldest wins (as the reference).
    """
    out = LegacyModels()
    for obj in sorted(objects, key=_created):
        ref = (obj.get("spec") or {}).get("poolRef")
        if not isinstance(ref, dict) or ref.get("name") != pool_name:
            continue
        spec, name, where = obj.get("spec") or {}, str(_meta(obj).get("name")), f"InferenceModel {_name(obj)}"
        model = spec.get("modelName")
        if not isinstance(model, str) or not model:
            log.warning("%s: no spec.modelName; ignored", where)
            continue
        if model in out.model_objectives:
            log.warning("%s: modelName %r is already claimed by an older InferenceModel; ignored", where, model)
            continue
        criticality = spec.get("criticality") or "Standard"
        if criticality not in CRITICALITY_PRIORITY:
            log.warning("%s: unknown criticality %r; treated as Standard", where, criticality)
        out.priorities[name] = CRITICALITY_PRIORITY.get(criticality, 0)
        out.model_objectives[model] = name
        if spec.get("targetModels"):
            try:
                targets = _targets(spec["targetModels"], where, name_key="name")
            except InvalidObject as exc:
                log.warning("%s; targetModels ignored", exc)
                continue
            out.rules.append(RewriteRule(f"InferenceModel/{_name(obj)}", frozenset({model}), targets))
    return out
