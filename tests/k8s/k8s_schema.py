"""Validate objects against a CRD's ``openAPIV3Schema``.

Uses ``jsonschema`` when it is installed; a small built-in checker of the structural-schema
keywords the CRDs use always runs too (type, required, properties, additionalProperties, enum,
pattern, lengths, bounds, item and property counts, ``x-kubernetes-list-type: map`` keys). It is
stricter than the API server in one way on purpose: a field the schema does not declare is an
error (the server would prune it silently, hiding a typo in an example). CEL rules
(``x-kubernetes-validations``) are not evaluated.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

try:  # optional: the built-in checker covers what the CRDs use
    import jsonschema
except ImportError:  # pragma: no cover - depends on the environment
    jsonschema = None

CRD_DIR = Path(__file__).resolve().parents[2] / "config" / "crd"

_TYPES: dict[str, tuple[type, ...]] = {
    "object": (dict,),
    "array": (list,),
    "string": (str,),
    "integer": (int,),
    "number": (int, float),
    "boolean": (bool,),
}


def load_crds() -> dict[tuple[str, str], dict[str, Any]]:
    """``(apiVersion, kind)`` -> the version's openAPIV3Schema, for every CRD in config/crd."""
    out: dict[tuple[str, str], dict[str, Any]] = {}
    for path in sorted(CRD_DIR.glob("*_*.yaml")):
        crd = yaml.safe_load(path.read_text())
        spec = crd["spec"]
        for version in spec["versions"]:
            out[(f"{spec['group']}/{version['name']}", spec["names"]["kind"])] = version["schema"]["openAPIV3Schema"]
    return out


def check(schema: dict[str, Any], value: Any, path: str = "") -> list[str]:
    where = path or "(root)"
    expected = schema.get("type")
    if expected:
        ok = isinstance(value, _TYPES[expected]) and not (expected in ("integer", "number") and isinstance(value, bool))
        if not ok:
            return [f"{where}: expected {expected}, got {type(value).__name__}"]
    errors: list[str] = []
    if "enum" in schema and value not in schema["enum"]:
        errors.append(f"{where}: {value!r} is not one of {schema['enum']}")
    if isinstance(value, str):
        if "pattern" in schema and not re.search(schema["pattern"], value):
            errors.append(f"{where}: {value!r} does not match {schema['pattern']}")
        if len(value) < schema.get("minLength", 0) or len(value) > schema.get("maxLength", 1 << 30):
            errors.append(f"{where}: length {len(value)} out of bounds")
    number = isinstance(value, int | float) and not isinstance(value, bool)
    if number and not schema.get("minimum", float("-inf")) <= value <= schema.get("maximum", float("inf")):
        errors.append(f"{where}: {value} out of bounds")
    if isinstance(value, list):
        if len(value) < schema.get("minItems", 0) or len(value) > schema.get("maxItems", 1 << 30):
            errors.append(f"{where}: {len(value)} items out of bounds")
        if schema.get("x-kubernetes-list-type") == "map":
            keys = [tuple(item.get(k) for k in schema["x-kubernetes-list-map-keys"]) for item in value]
            if len(keys) != len(set(keys)):
                errors.append(f"{where}: duplicate list-map keys {keys}")
        for i, item in enumerate(value):
            errors += check(schema.get("items", {}), item, f"{path}[{i}]")
    if isinstance(value, dict):
        if len(value) < schema.get("minProperties", 0) or len(value) > schema.get("maxProperties", 1 << 30):
            errors.append(f"{where}: {len(value)} properties out of bounds")
        errors += [f"{where}: missing required {name!r}" for name in schema.get("required", ()) if name not in value]
        props = schema.get("properties")
        extra = schema.get("additionalProperties")
        for key, item in value.items():
            sub = f"{path}.{key}" if path else key
            if props is not None and key in props:
                errors += check(props[key], item, sub)
            elif isinstance(extra, dict):
                errors += check(extra, item, sub)
            elif props is not None and not schema.get("x-kubernetes-preserve-unknown-fields"):
                errors.append(f"{where}: unknown field {key!r}")
    return errors


def validate(obj: dict[str, Any], crds: dict[tuple[str, str], dict[str, Any]] | None = None) -> list[str]:
    """Problems with ``obj`` (empty: valid) against the CRD of its apiVersion and kind."""
    crds = crds if crds is not None else load_crds()
    schema = crds.get((obj.get("apiVersion", ""), obj.get("kind", "")))
    if schema is None:
        return [f"no CRD for {obj.get('apiVersion')} {obj.get('kind')}"]
    errors = check(schema, obj)
    if jsonschema is not None:
        validator = jsonschema.Draft7Validator(schema)
        errors += [f"jsonschema: {e.json_path}: {e.message}" for e in validator.iter_errors(obj)]
    return errors
