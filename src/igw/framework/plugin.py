"""What every plugin is: a named instance of a kebab-case type, built from validated parameters.

A plugin type is a class with a ``type_name`` and a ``Params`` model. The configuration file
names an instance (``name``, default: the type) and gives free-form ``parameters``; the
registry validates them against ``Params`` (unknown keys are errors, keys are camelCase as in
the reference files) and calls :meth:`Plugin.from_params` with a :class:`Handle` to the
running EPP. A plugin's *roles* (Filter, Scorer, DataProducer, PreRequest, ...) are the base
classes it derives from; one instance may play several (a saturation detector is also a
filter).

Failure policy, per kind of hook (a plugin that raises never takes the EPP down; every
failure is logged and counted in ``igw_plugin_errors_total``):

* **Filter** - fails open: the candidates pass through unchanged.
* **Scorer** - scores 0 for every candidate in that pass.
* **Picker** - the highest total score is taken instead (ties: first).
* **ProfileHandler** - the request fails with 500 (nothing sensible to fall back to).
* **DataProducer** - its data is missing for that request; consumers must treat missing data
  as "no signal" (a prefix scorer scores 0).
* **Admitter** - fails open: the request is admitted.
* **PreRequest / response hooks** - the request proceeds unchanged.
* **Parser** - a :class:`~igw.api.errors.BadRequest` is the client's fault (400); anything
  else fails the request with 500.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from typing import Annotated, Any, ClassVar, Protocol, Self

from prometheus_client import CollectorRegistry
from pydantic import BaseModel, BeforeValidator, ConfigDict
from pydantic.alias_generators import to_camel

from igw.aio import Service
from igw.api.types import EndpointState

_DURATION = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")
_UNIT_SECONDS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration(value: Any) -> Any:
    """A Go-style duration (``"200ms"``, ``"1m30s"``) or a number of seconds -> seconds."""
    if isinstance(value, str):
        text = value.strip()
        if not text:
            raise ValueError("empty duration")
        pos, total = 0, 0.0
        for match in _DURATION.finditer(text):
            if match.start() != pos:
                break
            total += float(match.group(1)) * _UNIT_SECONDS[match.group(2)]
            pos = match.end()
        if pos != len(text):
            try:
                return float(text)
            except ValueError:
                raise ValueError(f"{value!r} is not a duration (like 200ms, 2s, 1m30s)") from None
        return total
    return value


Duration = Annotated[float, BeforeValidator(parse_duration)]
"""Seconds, written in a file as a number or a Go-style duration string."""


class PluginParams(BaseModel):
    """Base of every plugin's parameters: camelCase keys, unknown keys rejected, immutable."""

    model_config = ConfigDict(extra="forbid", alias_generator=to_camel, populate_by_name=True, frozen=True)


class NoParams(PluginParams):
    """For plugin types that take no parameters."""


class Handle(Protocol):
    """What a plugin may ask of the running EPP when it is built."""

    @property
    def clock(self) -> Callable[[], float]:
        """``time.monotonic``, or a test clock."""
        ...

    def endpoints(self) -> Sequence[EndpointState]:
        """The pool's endpoints right now."""
        ...

    def on_endpoints_change(self, listener: Callable[[], None]) -> None:
        """Call ``listener`` after every pool change (to drop state about removed endpoints)."""
        ...

    def plugin(self, name: str) -> Plugin | None:
        """Another configured plugin instance, by name (built before this one if referenced)."""
        ...


class Plugin:
    """A named instance of a plugin type. ``type_name`` is the kebab-case registry key."""

    type_name: ClassVar[str] = ""
    Params: ClassVar[type[PluginParams]] = NoParams
    consumes: ClassVar[Mapping[str, str]] = {}
    """Request data this plugin reads (``request.data`` key -> type of its default producer).

    The loader adds the default producer when no configured DataProducer makes that key."""
    producer_params: Mapping[str, Any] = {}
    """Parameters for the default producers this plugin makes the loader add (old reference
    files set the prefix producer's parameters on ``prefix-cache-scorer``)."""

    def __init__(self, name: str | None = None) -> None:
        self.name = name or self.type_name

    def params_for_producer(self, producer_type: str) -> Mapping[str, Any]:
        """The parameters of the default producer of type ``producer_type`` this plugin makes the
        loader add (default: :attr:`producer_params`, whatever the type)."""
        return self.producer_params

    @classmethod
    def from_params(cls, name: str, params: Any, handle: Handle) -> Self:
        """Build an instance from validated ``params`` (an instance of ``cls.Params``).

        The default suits types without parameters; types with parameters override it.
        """
        return cls(name)

    def describe(self) -> Mapping[str, Any]:
        """The effective parameters (for the start-up log and ``igw config validate``)."""
        return {}

    def register_metrics(self, registry: CollectorRegistry) -> None:
        """Add this plugin's own metrics to the EPP's registry (called once, before services start)."""

    def services(self) -> Sequence[Service]:
        """Background services this plugin needs running (a KV-event subscriber, say).

        The EPP starts them, in order, after the metrics collector and before it serves, and
        stops them in reverse order at shutdown. Building a plugin never starts anything.
        """
        return ()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"
