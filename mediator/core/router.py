"""The translation table: which destinations an event goes to, and at what address. Pure; no I/O."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from mediator.core.envelope import Envelope, attribute
from mediator.core.patterns import Template, TemplateError, TopicPattern, compile_glob


@dataclass(frozen=True, slots=True)
class DestinationSpec:
    outbound: str
    address: Template
    format: str = "binary"


@dataclass(frozen=True, slots=True)
class RouteSpec:
    """One compiled route. Empty match lists mean "any"; all given conditions must hold."""

    name: str
    destinations: tuple[DestinationSpec, ...]
    inbounds: frozenset[str] = frozenset()
    types: tuple[str, ...] = ()
    sources: tuple[str, ...] = ()
    topics: tuple[TopicPattern, ...] = ()
    attributes: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Delivery:
    """One destination of one event: committed to the outbox with the event."""

    route: str
    outbound: str
    address: str
    format: str


@dataclass(frozen=True, slots=True)
class Unroutable:
    """A destination whose address could not be rendered: dead-lettered at commit, with the reason."""

    route: str
    outbound: str
    reason: str


class _Matcher:
    """Exact values by set lookup, globs by regex: most tables name exact types."""

    __slots__ = ("exact", "globs")

    def __init__(self, patterns: Sequence[str]) -> None:
        self.exact = frozenset(p for p in patterns if not any(c in p for c in "*?["))
        self.globs: tuple[Callable[[str], bool], ...] = tuple(
            compile_glob(p) for p in patterns if any(c in p for c in "*?[")
        )

    def __call__(self, value: str) -> bool:
        return value in self.exact or (bool(self.globs) and any(glob(value) for glob in self.globs))


class _CompiledRoute:
    __slots__ = ("attrs", "inbounds", "sources", "spec", "topics", "types")

    def __init__(self, spec: RouteSpec) -> None:
        self.spec = spec
        self.inbounds = spec.inbounds
        self.types = _Matcher(spec.types) if spec.types else None
        self.sources = _Matcher(spec.sources) if spec.sources else None
        self.topics = spec.topics
        self.attrs = [(k, compile_glob(v)) for k, v in spec.attributes.items()]

    def matches(self, env: Envelope) -> bool:
        if self.inbounds and env.provenance.inbound not in self.inbounds:
            return False
        if self.types is not None and not self.types(env.type):
            return False
        if self.sources is not None and not self.sources(env.source):
            return False
        if self.topics:
            prov = env.provenance
            sep = prov.topic_separator or "/"
            topic = prov.topic
            for pattern in self.topics:
                if pattern.matches(topic, sep):
                    break
            else:
                return False
        for name, match in self.attrs:
            value = attribute(env, name)
            if value is None or not match(value):
                return False
        return True


class Router:
    """Every matching route contributes its destinations; the same (outbound, address) is delivered once."""

    def __init__(self, routes: Sequence[RouteSpec]) -> None:
        self._routes = [_CompiledRoute(r) for r in routes]

    def route(self, env: Envelope) -> tuple[list[Delivery], list[Unroutable]]:
        deliveries: list[Delivery] = []
        failures: list[Unroutable] = []
        seen: set[tuple[str, str, str]] = set()
        for route in self._routes:
            if not route.matches(env):
                continue
            for dest in route.spec.destinations:
                try:
                    address = dest.address.render(env)
                except TemplateError as exc:
                    failures.append(Unroutable(route.spec.name, dest.outbound, str(exc)))
                    continue
                key = (dest.outbound, address, dest.format)
                if key in seen:
                    continue
                seen.add(key)
                deliveries.append(Delivery(route.spec.name, dest.outbound, address, dest.format))
        return deliveries, failures
