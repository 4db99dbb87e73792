"""The translation table: which destinations an event goes to, and at what address. Pure; no I/O."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from mediator.core.content import NOT_JSON, parsed
from mediator.core.deadletter import TRANSFORM_PREFIX, UNROUTABLE_PREFIX
from mediator.core.egress import Egress
from mediator.core.envelope import Envelope, attribute, value_to_str
from mediator.core.errors import Rejected
from mediator.core.patterns import Template, TemplateError, TopicPattern, compile_glob
from mediator.core.predicate import Predicate, PredicateError
from mediator.core.transform import DataGetter, TransformError

PredicateFailed = Callable[[str, Envelope, str], None]
"""Told (route name, event, reason) when a route's ``when`` could not be evaluated for an event."""


@dataclass(frozen=True, slots=True)
class DestinationSpec:
    outbound: str
    address: Template
    format: str = "binary"
    egress: Egress | None = None  # transform and format conversion, applied at commit (see egress.py)


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
    when: Predicate | None = None  # CEL over attributes and data; an error counts as no match
    final: bool = False  # once this route matched, later routes are not evaluated


@dataclass(frozen=True, slots=True)
class Delivery:
    """One destination of one event: committed to the outbox with the event (``event`` when the
    destination transformed or converted it: that is what is stored and sent)."""

    route: str
    outbound: str
    address: str
    format: str
    event: Envelope | None = field(default=None, compare=False, hash=False)


@dataclass(frozen=True, slots=True)
class Unroutable:
    """A destination whose address could not be rendered, or whose egress failed: dead-lettered at commit,
    with the reason (and the rendered address, when there is one, so the dead letter says which
    destination; never a format: the event stored is the original, so it is not replayed as is)."""

    route: str
    outbound: str
    reason: str
    address: str = ""


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
    __slots__ = ("attrs", "final", "inbounds", "sources", "spec", "topics", "types", "when")

    def __init__(self, spec: RouteSpec) -> None:
        self.spec = spec
        self.when = spec.when
        self.final = spec.final
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


class _Variables:
    """The CEL variables of one event, looked up when a ``when`` first needs them, data parsed once."""

    __slots__ = ("_data", "_env", "_getter")

    def __init__(self, env: Envelope, getter: DataGetter) -> None:
        self._env = env
        self._getter = getter
        self._data: Any = _UNSET

    def data(self) -> Any:
        if self._data is _UNSET:
            try:
                self._data = self._getter(self._env)
            except Rejected as exc:  # data that says JSON and is not (no well-formedness stage refused it)
                self._data = _Broken(exc.reason)
        return self._data

    def for_(self, pred: Predicate) -> dict[str, Any]:
        env = self._env
        out: dict[str, Any] = {}
        for name in pred.variables:
            if name == "data":
                value = self.data()
                if isinstance(value, _Broken):
                    raise PredicateError(value.reason)
                if value is NOT_JSON:
                    continue  # undefined: an expression that reads it fails
                fields = pred.fields
                if fields is not None and isinstance(value, dict):
                    # Only the fields it reads: converting values into CEL is what costs (predicate.py).
                    value = {k: value[k] for k in fields if k in value}
                out["data"] = value
            elif name == "inbound":
                out[name] = env.provenance.inbound
            elif name == "topic":
                out[name] = env.provenance.topic
            elif name in env.attributes:
                attr = env.attributes[name]
                kind = attr.WhichOneof("attr")
                out[name] = (
                    attr.ce_integer
                    if kind == "ce_integer"
                    else attr.ce_boolean
                    if kind == "ce_boolean"
                    else value_to_str(attr)
                )
            else:
                value = attribute(env, name)
                if value:  # the required four (an empty one is absent); comprehension variables are not
                    out[name] = value
        return out


class _Broken:
    __slots__ = ("reason",)

    def __init__(self, reason: str) -> None:
        self.reason = reason


_UNSET: Any = object()


class Router:
    """Every matching route contributes its destinations, in table order; a matching route marked
    ``final`` ends the walk (ordered first-match, as Dapr's routing rules and Knative's triggers with
    filters do it). The same (outbound, address, format, egress) is delivered once."""

    def __init__(self, routes: Sequence[RouteSpec]) -> None:
        self._routes = [_CompiledRoute(r) for r in routes]

    @property
    def specs(self) -> tuple[RouteSpec, ...]:
        """The routes in table order, as compiled."""
        return tuple(r.spec for r in self._routes)

    def route(
        self, env: Envelope, data: DataGetter | None = None, on_predicate_failed: PredicateFailed | None = None
    ) -> tuple[list[Delivery], list[Unroutable]]:
        """Where ``env`` goes. ``data`` gives its parsed data (default: ``content.parsed``), called only
        when a ``when`` or a destination's egress reads the data; a ``when`` that fails on this event
        counts as no match and is reported to ``on_predicate_failed``. A destination whose address cannot
        be rendered, or whose egress fails, is returned as ``Unroutable`` with the reason."""
        getter = data if data is not None else parsed
        deliveries: list[Delivery] = []
        failures: list[Unroutable] = []
        seen: set[tuple[str, str, str, Egress | None]] = set()
        variables: _Variables | None = None
        for route in self._routes:
            if not route.matches(env):
                continue
            when = route.when
            if when is not None:
                if variables is None:
                    variables = _Variables(env, getter)
                try:
                    matched = when.evaluate(variables.for_(when))
                except PredicateError as exc:
                    matched = False
                    if on_predicate_failed is not None:
                        on_predicate_failed(route.spec.name, env, str(exc))
                if not matched:
                    continue
            for dest in route.spec.destinations:
                try:
                    address = dest.address.render(env)
                except TemplateError as exc:
                    failures.append(Unroutable(route.spec.name, dest.outbound, f"{UNROUTABLE_PREFIX}{exc}"))
                    continue
                key = (dest.outbound, address, dest.format, dest.egress)
                if key in seen:
                    continue
                seen.add(key)
                if dest.egress is None:
                    deliveries.append(Delivery(route.spec.name, dest.outbound, address, dest.format))
                    continue
                try:
                    out = dest.egress.apply(env, getter)
                except TransformError as exc:
                    failures.append(Unroutable(route.spec.name, dest.outbound, f"{TRANSFORM_PREFIX}{exc}", address))
                    continue
                deliveries.append(Delivery(route.spec.name, dest.outbound, address, dest.format, out))
            if route.final:
                break
        return deliveries, failures


def variables_for(env: Envelope, pred: Predicate) -> dict[str, Any]:
    """The CEL variables ``pred`` reads of ``env`` (its data parsed from the envelope), as a route's ``when``
    sees them: for a filter outside the table (the dashboard's live tail). Raises PredicateError when the
    data says JSON and is not."""
    return _Variables(env, parsed).for_(pred)


def event_variables(env: Envelope, data: DataGetter, pred: Predicate) -> dict[str, Any]:
    """The CEL variables ``pred`` reads of ``env``, as a route's ``when`` sees them (the event store's
    ``where`` evaluates with these too). Raises PredicateError when the data it reads is broken."""
    return _Variables(env, data).for_(pred)
