"""Plugin types by kebab-case name. The configuration file instantiates plugins through it."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

from pydantic import ValidationError

from igw.api.types import EndpointState
from igw.framework.plugin import Handle, Plugin

P = TypeVar("P", bound=type[Plugin])

_REGISTRY: dict[str, type[Plugin]] = {}


class PluginError(ValueError):
    """A plugin cannot be built: unknown type or bad parameters. The message names both."""


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


def plugin_class(type_name: str) -> type[Plugin]:
    """The class registered under ``type_name``; unknown types get an error listing the known ones."""
    cls = _REGISTRY.get(type_name)
    if cls is None:
        known = ", ".join(sorted(_REGISTRY)) or "(none)"
        raise PluginError(f"unknown plugin type {type_name!r}; known types: {known}")
    return cls


def create(
    type_name: str,
    name: str | None = None,
    params: Mapping[str, Any] | None = None,
    handle: Handle | None = None,
) -> Plugin:
    """Validate ``params`` against the type's ``Params`` model and build a named instance."""
    cls = plugin_class(type_name)
    instance = name or type_name
    try:
        validated = cls.Params.model_validate(dict(params or {}))
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or '(parameters)'}: {err['msg']}" for err in exc.errors()
        )
        raise PluginError(f"plugin {instance!r} (type {type_name}): invalid parameters: {problems}") from None
    try:
        return cls.from_params(instance, validated, handle or StaticHandle())
    except (ValueError, TypeError) as exc:
        raise PluginError(f"plugin {instance!r} (type {type_name}): {exc}") from None


def known_types() -> list[str]:
    return sorted(_REGISTRY)


class StaticHandle:
    """A :class:`Handle` over a fixed endpoint list (tests, ``igw config validate``)."""

    def __init__(
        self,
        endpoints: Sequence[EndpointState] = (),
        plugins: Mapping[str, Plugin] | None = None,
        clock: Callable[[], float] | None = None,
    ) -> None:
        self._endpoints = endpoints
        self._plugins = dict(plugins or {})
        self._clock = clock or time.monotonic
        self.listeners: list[Callable[[], None]] = []

    @property
    def clock(self) -> Callable[[], float]:
        return self._clock

    def endpoints(self) -> Sequence[EndpointState]:
        return self._endpoints

    def on_endpoints_change(self, listener: Callable[[], None]) -> None:
        self.listeners.append(listener)

    def plugin(self, name: str) -> Plugin | None:
        return self._plugins.get(name)
