"""Plugin types by kebab-case name. The configuration file instantiates plugins through it."""

from __future__ import annotations

from typing import Any, TypeVar

from igw.framework.scheduling import Plugin

P = TypeVar("P", bound=type[Plugin])

_REGISTRY: dict[str, type[Plugin]] = {}


def register(cls: P) -> P:
    """Class decorator: make ``cls`` available under ``cls.type_name``."""
    name = cls.type_name
    if not name or name != name.lower() or " " in name:
        raise ValueError(f"{cls.__name__}: type_name must be a kebab-case string, got {name!r}")
    existing = _REGISTRY.get(name)
    if existing is not None and existing is not cls:
        raise ValueError(f"plugin type {name!r} is registered twice ({existing.__name__}, {cls.__name__})")
    _REGISTRY[name] = cls
    return cls


def create(type_name: str, name: str | None = None, **params: Any) -> Plugin:
    """Instantiate a registered plugin type; unknown types get an error listing the known ones."""
    cls = _REGISTRY.get(type_name)
    if cls is None:
        known = ", ".join(sorted(_REGISTRY)) or "(none)"
        raise KeyError(f"unknown plugin type {type_name!r}; known types: {known}")
    return cls(name, **params)


def known_types() -> list[str]:
    return sorted(_REGISTRY)
