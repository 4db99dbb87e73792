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


class _CompiledRoute:
    __slots__ = ("attrs", "inbounds", "sources", "spec", "topics", "types")

    def __init__(self, spec: RouteSpec) -> None:
        self.spec = spec
        self.inbounds = spec.inbounds
        self.types: list[Callable[[str], bool]] = [compile_glob(t) for t in spec.types]
        self.sources: list[Callable[[str], bool]] = [compile_glob(s) for s in spec.sources]
        self.topics = spec.topics
        self.attrs = [(k, compile_glob(v)) for k, v in spec.attributes.items()]

    def matches(self, env: Envelope) -> bool:
        prov = env.provenance
        if self.inbounds and prov.inbound not in self.inbounds:
            return False
        if self.types and not any(m(env.type) for m in self.types):
            return False
        if self.sources and not any(m(env.source) for m in self.sources):
            return False
        if self.topics:
            sep = prov.topic_separator or "/"
            if not any(p.matches(prov.topic, sep) for p in self.topics):
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
