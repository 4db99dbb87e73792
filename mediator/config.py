"""config.toml: parsed, validated strictly, cross-checked. Every error names its file and key path."""

from __future__ import annotations

import copy
import dataclasses
import difflib
import hashlib
import json
import tomllib
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator

from mediator.core.convert import ConvertConfig, Converter
from mediator.core.egress import Egress
from mediator.core.errors import ConfigError
from mediator.core.formats import FORMATS
from mediator.core.jwe import KeyRing
from mediator.core.patterns import Template, TopicPattern, validate_topic_pattern
from mediator.core.predicate import Predicate
from mediator.core.router import DestinationSpec, RouteSpec
from mediator.core.seams import (
    AdapterConfig,
    AdapterSpec,
    ConfigModel,
    InboundConfigBase,
    OutboundConfigBase,
)
from mediator.core.transform import Transform, TransformConfig, resolve_keyring
from mediator.history.config import StoreConfig
from mediator.observability.metrics_config import MetricsConfig
from mediator.observability.tracing_config import TracingConfig
from mediator.overload import OverloadConfig
from mediator.schemaregistry.config import RegistryConfig
from mediator.stages import problems as stage_problems
from mediator.stages.aggregate import AggregateConfig
from mediator.stages.aggregate import problems as aggregate_problems
from mediator.stages.config import (
    AUTH_KINDS,
    AuthenticatorConfig,
    AuthorizationRuleConfig,
    RateLimitConfig,
    SecurityConfig,
)
from mediator.stages.content_config import EncryptionConfig, SchemaConfig, ValidationConfig
from mediator.stages.content_schema import CompiledSchema, load_schemas
from mediator.stages.enrich import EnrichConfig
from mediator.stages.enrich import problems as enrich_problems
from mediator.stages.keyring import load_keyrings


class DaemonConfig(ConfigModel):
    log_level: Literal["debug", "info", "warning", "error"] = Field(
        default="info", description="our events at this level and above; libraries' at warning and above"
    )
    log_format: Literal["auto", "json", "console"] = Field(
        default="auto", description="console: readable lines; json: one object per line; auto: console on a terminal"
    )
    drain_timeout_s: float = Field(
        default=10.0, gt=0, description="on SIGTERM: time allowed to finish in-flight work before exiting"
    )
    removed_outbound: Literal["keep", "dead_letter"] = Field(
        default="dead_letter",
        description="deliveries pending for an outbound a reload removed: keep them until it returns, "
        "or dead-letter them after removed_outbound_grace_s",
    )
    removed_outbound_grace_s: float = Field(
        default=60.0, ge=0, description="with removed_outbound = 'dead_letter': how long a removed outbound may return"
    )
    workers: Annotated[int, Field(ge=1, le=999)] | Literal["auto"] = Field(
        default=1,
        description='worker processes sharing the load, each with its own outbox file (README "Scaling out"); '
        '"auto": one per core. A change needs a restart',
    )


class OutboxConfig(ConfigModel):
    kind: Literal["sqlite", "memory"] = Field(
        default="sqlite",
        description="sqlite: durable (WAL, group commit); memory: fast, everything pending lost on crash",
    )
    path: str = Field(default="var/outbox.sqlite", description="the SQLite file, relative to the working directory")
    synchronous: Literal["full", "normal"] = Field(
        default="full", description="full: fsync before acknowledging; normal: faster, the last commits may be lost"
    )
    # Each pending delivery keeps its event in memory (its payload plus about 1 KiB), so this bounds memory.
    max_pending: int = Field(default=20_000, ge=1)
    max_batch: int = Field(default=512, ge=1, description="operations grouped into one transaction at most")
    dedup_window_s: float = Field(default=300.0, ge=0)  # 0 disables; key = event source + id
    # Delivery status (GET /events/{id}/status, GetStatus, `mediator status ID`): mediator/status.py.
    status_window_s: float = Field(
        default=3600.0, ge=0, description="how long an event's delivery status is kept once every destination settled"
    )
    # About 0.65 KiB per settled single-destination event, 0.95 KiB with three destinations (measured).
    status_max_events: int = Field(
        default=50_000, ge=1, description="settled events whose status is kept at most (the oldest expire first)"
    )
    status_max_waiters: int = Field(
        default=10_000, ge=1, description="requests waiting for delivery (Prefer: wait) at once; more answer at once"
    )


def _as_list(value: object) -> object:
    return [value] if isinstance(value, str) else value


class MatchConfig(ConfigModel):
    inbound: list[str] = []
    type: list[str] = []
    source: list[str] = []
    topic: list[str] = []
    attributes: dict[str, str] = {}

    _lists = field_validator("inbound", "type", "source", "topic", mode="before")(_as_list)

    @field_validator("topic")
    @classmethod
    def _topics(cls, value: list[str]) -> list[str]:
        for pattern in value:
            problem = validate_topic_pattern(pattern)
            if problem:
                raise ValueError(f"topic pattern {pattern!r}: {problem}")
        return value


class DestinationConfig(ConfigModel):
    outbound: str
    address: str = ""
    format: str | None = None  # None: the outbound's own `format`, else "binary"
    transform: TransformConfig | None = None  # egress: applied when the event is committed (core/egress.py)
    convert: ConvertConfig | None = None  # after the transform: JSON to Protobuf or Avro and back

    @field_validator("address")
    @classmethod
    def _template(cls, value: str) -> str:
        Template.compile(value)
        return value

    @field_validator("format")
    @classmethod
    def _format(cls, value: str | None) -> str | None:
        if value is not None and value not in FORMATS:
            raise ValueError(f"format must be one of {', '.join(FORMATS)}")
        return value


class RouteConfig(ConfigModel):
    name: str = Field(min_length=1)
    match: MatchConfig = MatchConfig()
    when: str | None = None  # CEL over attributes, data, inbound, topic (core/predicate.py)
    final: bool = False  # when this route matched, later routes are not evaluated
    to: list[DestinationConfig] = Field(min_length=1)

    @field_validator("when")
    @classmethod
    def _when(cls, value: str | None) -> str | None:
        if value is not None:
            Predicate.compile(value)  # compiled again into the RouteSpec; a few microseconds
        return value


class RoutingConfig(ConfigModel):
    """``mode = "first"``: every route is ``final`` (ordered first-match); "all": each matching route
    contributes its destinations, unless one marked ``final`` ends the walk."""

    mode: Literal["all", "first"] = "all"


class DeadLettersConfig(ConfigModel):
    """Dead letters are always kept in the outbox (list and replay them); ``forward`` also sends a copy
    to a destination, e.g. an AMQP dead-letter exchange: ``forward = { outbound = "dlx", address =
    "dead.{deadletterroute}", format = "structured" }``."""

    forward: DestinationConfig | None = None


class RootConfig(ConfigModel):
    daemon: DaemonConfig = DaemonConfig()
    outbox: OutboxConfig = OutboxConfig()
    store: StoreConfig = StoreConfig()
    dead_letters: DeadLettersConfig = DeadLettersConfig()
    routing: RoutingConfig = RoutingConfig()
    security: SecurityConfig = SecurityConfig()
    auth: dict[str, AuthenticatorConfig] = {}
    authorization: list[AuthorizationRuleConfig] = []
    rate_limits: list[RateLimitConfig] = []
    validation: ValidationConfig = ValidationConfig()
    schemas: list[SchemaConfig] = []
    enrich: list[EnrichConfig] = []
    aggregate: list[AggregateConfig] = []
    encryption: dict[str, EncryptionConfig] = {}
    tracing: TracingConfig = TracingConfig()
    metrics: MetricsConfig = MetricsConfig()
    registry: RegistryConfig = RegistryConfig()
    overload: OverloadConfig = OverloadConfig()
    listeners: dict[str, dict[str, Any]] = {}
    brokers: dict[str, dict[str, Any]] = {}
    inbound: dict[str, dict[str, Any]] = {}
    outbound: dict[str, dict[str, Any]] = {}
    routes: list[RouteConfig] = []

    @model_validator(mode="after")
    def _unique_routes(self) -> RootConfig:
        names = [r.name for r in self.routes]
        if "dead-letter" in names:
            raise ValueError("the route name 'dead-letter' is reserved for forwarded dead letters")
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"route names must be unique: {', '.join(dupes)}")
        return self


@dataclass(frozen=True, slots=True)
class Config:
    """A validated config: the root sections, each adapter's typed sections, and the compiled routes."""

    file: str
    root: RootConfig
    adapters: Mapping[str, AdapterConfig]
    routes: tuple[RouteSpec, ...] = field(default_factory=tuple)
    dead_letter_forward: DestinationSpec | None = None
    # [[schemas]], read and compiled by ``load`` (in the reload's thread on a reload, never on the loop).
    schemas: tuple[CompiledSchema, ...] = ()
    sha256: str = ""  # of the file's text, as loaded (the config's version: its first 12 hex digits)
    # [encryption.NAME] key rings, read by ``load`` like the schemas; ``environment``: the variables they
    # name that are not set (``mediator check`` warns, ``mediator run`` refuses: mediator/daemon.py).
    keyrings: Mapping[str, KeyRing] = field(default_factory=dict)
    environment: tuple[str, ...] = ()

    @property
    def daemon(self) -> DaemonConfig:
        return self.root.daemon

    @property
    def outbox(self) -> OutboxConfig:
        return self.root.outbox

    def outbound_configs(self) -> dict[str, OutboundConfigBase]:
        return {n: c for a in self.adapters.values() for n, c in a.outbounds.items()}


def route_key(i: int, name: object) -> str:
    """A route as the admin knows it: ``routes["orders"]`` when it has a name, else ``routes[0]``."""
    return f"routes[{json.dumps(name)}]" if isinstance(name, str) and name else f"routes[{i}]"


def _loc(parts: tuple[int | str, ...], raw: object = None) -> str:
    out = ""
    node = raw
    for part in parts:
        child = None
        if isinstance(part, int):
            child = node[part] if isinstance(node, list) and 0 <= part < len(node) else None
            name = child.get("name") if isinstance(child, dict) and out == "routes" else None
            out = route_key(part, name) if name is not None else f"{out}[{part}]"
        else:
            child = node.get(part) if isinstance(node, dict) else None
            out += f".{part}" if out else str(part)
        node = child
    return out


def _field_names(model: type[BaseModel]) -> list[str]:
    return [info.alias or name for name, info in model.model_fields.items()]


def _step(tp: object, part: int | str) -> object:
    """The annotation one key (or index, or union tag) below ``tp``; None when it cannot be told."""
    while typing.get_origin(tp) is typing.Annotated:
        tp = typing.get_args(tp)[0]
    origin = typing.get_origin(tp)
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        for name, info in tp.model_fields.items():
            if part in (name, info.alias):
                return info.annotation
        return None
    if origin in (list, tuple) and isinstance(part, int):
        return typing.get_args(tp)[0]
    if origin is dict and isinstance(part, str):
        return typing.get_args(tp)[1]
    if origin in (typing.Union, types.UnionType):
        members = [m for m in typing.get_args(tp) if m is not type(None)]
        if len(members) == 1:
            return _step(members[0], part)
        for member in members:  # a discriminated union: pydantic puts the tag in the path
            kind = getattr(member, "model_fields", {}).get("kind")
            if kind is not None and part in typing.get_args(kind.annotation):
                return member
    return None


def _suggestion(model: type[BaseModel], parts: tuple[int | str, ...]) -> str:
    """``"; did you mean `drain_timeout_s`?"`` for an unknown key close to one the model has, else ''."""
    tp: object = model
    for part in parts[:-1]:
        tp = _step(tp, part)
    while typing.get_origin(tp) in (typing.Union, types.UnionType):
        members = [m for m in typing.get_args(tp) if m is not type(None)]
        tp = members[0] if len(members) == 1 else None
    if not (isinstance(tp, type) and issubclass(tp, BaseModel)) or not parts:
        return ""
    close = difflib.get_close_matches(str(parts[-1]), _field_names(tp), n=1, cutoff=0.6)
    return f"; did you mean `{close[0]}`?" if close else ""


def _problems(
    exc: ValidationError, prefix: str = "", model: type[BaseModel] | None = None, raw: object = None
) -> list[str]:
    out = []
    for err in exc.errors():
        parts = tuple(err["loc"])
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden" and model is not None:
            msg += _suggestion(model, parts)
        if len(parts) > 2 and parts[0] == "auth" and parts[2] in AUTH_KINDS:
            parts = parts[:2] + parts[3:]  # the discriminated union's tag is not a key the admin wrote
        loc = _loc(parts, raw)
        path = f"{prefix}.{loc}" if prefix and loc else (prefix or loc)
        out.append(f"{path}: {msg}" if path else msg)
    return out


def _article(kind: str) -> str:
    """'a' or 'an' before a protocol name read letter by letter (an amqp, an mqtt, an http, a grpc)."""
    return "an" if kind[:1].lower() in "aefhilmnorsx" else "a"


def _egress(
    dest: DestinationConfig, base_dir: Path, where: str, problems: list[str], keyrings: Mapping[str, KeyRing]
) -> Egress | None:
    """A destination's transform and conversion, compiled; a file that cannot be used is a problem."""
    if dest.transform is None and dest.convert is None:
        return None
    converter = None
    if dest.convert is not None:
        try:
            converter = Converter(dest.convert, base_dir)
        except ValueError as exc:
            problems.append(f"{where}.convert: {exc}")
    transform = None
    if dest.transform is not None:
        try:
            transform = Transform(dest.transform, keyrings)
        except ValueError as exc:
            problems.append(f"{where}.transform.{exc}")
    return Egress(transform, converter)


def load(path: str | Path, specs: Mapping[str, AdapterSpec]) -> Config:
    """Read and validate ``path``; raise ConfigError listing every problem found."""
    file = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(file, [f"cannot read: {exc.strerror or exc}"]) from exc
    except UnicodeDecodeError as exc:  # as a reload says it (mediator.units.settled_text), not a traceback
        raise ConfigError(file, [f"not UTF-8: {exc}"]) from exc
    return loads(text, specs, file)


def loads(text: str, specs: Mapping[str, AdapterSpec], file: str = "<config>") -> Config:
    """Validate the text of a config file (a reload reads it itself, to load exactly what it checked)."""
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(file, [f"TOML syntax error: {exc}"]) from exc
    config = parse(raw, specs, file)
    return dataclasses.replace(config, sha256=hashlib.sha256(text.encode()).hexdigest())


raw_view: Callable[[Mapping[str, Any]], Mapping[str, Any]] | None = None
"""Set once by a worker of ``workers = N`` (``mediator.supervisor.enter_worker``): every config that process
parses, reloads included, is seen through it (the worker's own outbox file, shared ports, shared
subscriptions), so a reload compares like with like."""


def parse(raw: Mapping[str, Any], specs: Mapping[str, AdapterSpec], file: str = "<config>") -> Config:
    if raw_view is not None:
        raw = raw_view(raw)
    root, problems, hidden = _validate_root(raw)
    if root is None:
        raise ConfigError(file, problems)
    first = len(problems)

    sections: dict[str, dict[str, dict[str, Any]]] = {
        "listeners": {},
        "brokers": {},
        "inbound": {},
        "outbound": {},
    }
    typed: dict[str, dict[str, dict[str, Any]]] = {k: {} for k in specs}
    for section in sections:
        for name, body in getattr(root, section).items():
            where = f"{section}.{name}"
            kind = body.get("kind")
            if kind is None:
                problems.append(f"{where}.kind: required ({' | '.join(sorted(specs))})")
                continue
            if not isinstance(kind, str):  # `kind = [...]` was a TypeError (unhashable), found by atheris
                problems.append(f"{where}.kind: must be a string ({' | '.join(sorted(specs))})")
                continue
            spec = specs.get(kind)
            model = _model_for(spec, section) if spec else None
            if spec is None or model is None:
                allowed = sorted(k for k, s in specs.items() if _model_for(s, section) is not None)
                problems.append(f"{where}.kind: {kind!r} is not one of {', '.join(allowed)}")
                continue
            try:
                typed[kind].setdefault(section, {})[name] = model.model_validate(body)
            except ValidationError as exc:
                problems.extend(_problems(exc, where, model, body))

    conn_kind = {
        **{n: b.get("kind") for n, b in root.listeners.items()},
        **{n: b.get("kind") for n, b in root.brokers.items()},
    }
    for section in ("inbound", "outbound"):
        for kind, by_section in typed.items():
            for name, model in by_section.get(section, {}).items():
                assert isinstance(model, InboundConfigBase | OutboundConfigBase)
                ref = model.connection()
                if ref is None:
                    continue
                want = model.connection_kind or kind  # a push outbound attaches to an http listener
                key = "listener" if want in specs and specs[want].listener_model is not None else "broker"
                if ref not in conn_kind:
                    problems.append(f"{section}.{name}.{key}: no {key} named {ref!r}")
                elif conn_kind[ref] != want:
                    other = str(conn_kind[ref])
                    problems.append(f"{section}.{name}.{key}: {ref!r} is {_article(other)} {other} {key}, not {want}")

    outbound_models = {n: m for by_section in typed.values() for n, m in by_section.get("outbound", {}).items()}
    inbound_models = {n: m for by_section in typed.values() for n, m in by_section.get("inbound", {}).items()}
    outbound_names = set(root.outbound)
    inbound_names = set(root.inbound)
    keys = load_keyrings(root.encryption, Path(file).parent)
    problems += keys.problems
    for name, model in inbound_models.items():
        transform = getattr(model, "transform", None)
        if isinstance(transform, TransformConfig) and transform.crypto:
            try:
                resolve_keyring(transform, keys.rings)
            except ValueError as exc:
                problems.append(f"inbound.{name}.transform.{exc}")
    routes: list[RouteSpec] = []
    for i, route in enumerate(root.routes):
        where = route_key(i, route.name)
        for name in route.match.inbound:
            if name not in inbound_names:
                problems.append(f"{where}.match.inbound: no inbound named {name!r}")
        requesting = [n for n in route.match.inbound if getattr(inbound_models.get(n), "request_mode", False)]
        if requesting:  # request-reply: exactly one destination, and one that can carry a reply address
            if len(route.to) != 1:
                problems.append(
                    f"{where}.to: a route from the request-mode inbound {requesting[0]!r} needs exactly one "
                    f"destination (a request gets one reply), not {len(route.to)}"
                )
            for j, dest in enumerate(route.to):
                out = outbound_models.get(dest.outbound)
                refusal = out.request_refusal() if isinstance(out, OutboundConfigBase) else None
                if refusal is not None:
                    problems.append(
                        f"{where}.to[{j}].outbound: {dest.outbound!r} serves requests from "
                        f"{requesting[0]!r}, but {refusal}"
                    )
        dests = []
        for j, dest in enumerate(route.to):
            if dest.outbound not in outbound_names:
                problems.append(f"{where}.to[{j}].outbound: no outbound named {dest.outbound!r}")
            fmt = dest.format or str(getattr(outbound_models.get(dest.outbound), "format", "binary"))
            egress = _egress(dest, Path(file).parent, f"{where}.to[{j}]", problems, keys.rings)
            dests.append(DestinationSpec(dest.outbound, Template.compile(dest.address), fmt, egress))
        routes.append(
            RouteSpec(
                name=route.name,
                destinations=tuple(dests),
                inbounds=frozenset(route.match.inbound),
                types=tuple(route.match.type),
                sources=tuple(route.match.source),
                topics=tuple(TopicPattern(t) for t in route.match.topic),
                attributes=dict(route.match.attributes),
                when=Predicate.compile(route.when) if route.when is not None else None,
                final=route.final or root.routing.mode == "first",
            )
        )
    dead_forward: DestinationSpec | None = None
    fwd = root.dead_letters.forward
    if fwd is not None:
        if fwd.outbound not in outbound_names:
            problems.append(f"dead_letters.forward.outbound: no outbound named {fwd.outbound!r}")
        fmt = fwd.format or str(getattr(outbound_models.get(fwd.outbound), "format", "binary"))
        dead_forward = DestinationSpec(fwd.outbound, Template.compile(fwd.address), fmt)
    served_by = root.metrics.listener
    if served_by is not None and conn_kind.get(served_by) != "http":
        problems.append(f"metrics.listener: no http listener named {served_by!r}")
    for compiled in routes:
        for j, target in enumerate(compiled.destinations):
            convert = target.egress.convert if target.egress is not None else None
            if convert is not None and convert.config.subject is not None and not root.registry.enabled:
                problems.append(
                    f"routes[{compiled.name!r}].to[{j}].convert.subject: names a registry subject, but [registry] "
                    "is not enabled"
                )
    if root.registry.enabled and conn_kind.get(root.registry.listener) != "http":
        problems.append(f"registry.listener: no http listener named {root.registry.listener!r}")
    for i, schema in enumerate(root.schemas):
        if schema.registry is not None and not root.registry.enabled:
            problems.append(f"schemas[{i}].schema: names a registry subject, but [registry] is not enabled")
    adapters = {
        kind: AdapterConfig(
            listeners=by_section.get("listeners", {}),
            brokers=by_section.get("brokers", {}),
            inbounds=by_section.get("inbound", {}),
            outbounds=by_section.get("outbound", {}),
        )
        for kind, by_section in typed.items()
    }
    problems += stage_problems(adapters, root.auth, root.authorization, root.rate_limits)
    for i, schema in enumerate(root.schemas):
        missing = [n for n in schema.inbounds if n not in inbound_names]
        problems += [f"schemas[{i}].inbounds: no inbound named {n!r}" for n in missing]
    schemas: list[CompiledSchema] = []
    try:
        schemas = load_schemas(root.schemas, Path(file).parent, file)
    except ConfigError as exc:
        problems += exc.problems
    problems += enrich_problems(root.enrich, inbound_names) + aggregate_problems(root.aggregate, inbound_names)
    if hidden:
        problems[first:] = [p for p in problems[first:] if not _follows_from(p, hidden)]
    if problems:
        raise ConfigError(file, problems)
    return Config(
        file=file,
        root=root,
        adapters=adapters,
        routes=tuple(routes),
        dead_letter_forward=dead_forward,
        schemas=tuple(schemas),
        keyrings=keys.rings,
        environment=tuple(keys.environment),
    )


# Rounds of pruning before the later checks give up on a root that still does not validate.
_PRUNE_ROUNDS = 5


def _validate_root(raw: Mapping[str, Any]) -> tuple[RootConfig | None, list[str], list[str]]:
    """The root sections, and the problems of the first validation with their key paths.

    When the root does not validate, the keys in error are removed from a copy of ``raw`` (a key whose own
    value is wrong, else the table or array element holding it) and the copy is validated again, so that the
    later checks (references, adapters, authenticators, schemas) still run on everything that parsed: a CEL
    syntax error in one route does not hide a missing outbound in another. Returns the root (None when even
    the pruned copy fails), the problems to report, and what later checks must not report again
    (``_follows_from``)."""
    try:
        return RootConfig.model_validate(raw), [], []
    except ValidationError as exc:
        problems = _problems(exc, model=RootConfig, raw=raw)
        error = exc
    work: Any = copy.deepcopy(dict(raw))
    hidden: list[str] = []
    for _ in range(_PRUNE_ROUNDS):
        chains = [c for err in error.errors() if (c := _locate(work, tuple(err["loc"])))]
        if not chains:
            return None, problems, hidden
        # Array elements last and from the highest index down, so that each removal leaves the others' indices.
        chains.sort(key=lambda c: (isinstance(c[-1][0], list), -c[-1][1] if isinstance(c[-1][1], int) else 0))
        for chain in chains:
            container, key, value = chain[-1]
            path = tuple(k for _, k, _ in chain)
            if isinstance(container, list):
                if key < len(container) and container[key] is value:
                    del container[key]
                    hidden.append(f"{_loc(path[:-1], raw)}[#")  # its later siblings moved up one index
            elif key in container:
                del container[key]
                if path[0] == "auth" and len(path) == 2:
                    hidden.append(f"[auth.{key}]")  # "no authenticator [auth.X]" would repeat its error
        try:
            return RootConfig.model_validate(work), problems, hidden
        except ValidationError as exc:
            error = exc
    return None, problems, hidden


def _locate(node: Any, loc: tuple[int | str, ...]) -> list[tuple[Any, Any, Any]]:
    """What a pydantic error location points at in the document, as (container, key, value) from the top
    down, ending at the key itself when the document has it, else (a required key missing, an error of a
    whole entry) at the entry that should hold it. Parts that are not keys of the document (a discriminated
    union's tag) are skipped."""
    chain: list[tuple[Any, Any, Any]] = []
    for i, part in enumerate(loc):
        in_dict = isinstance(node, dict) and part in node
        if in_dict or (isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node)):
            value = node[part]
        elif isinstance(node, dict) and isinstance(part, str) and i < len(loc) - 1:
            continue
        else:
            break
        chain.append((node, part, value))
        node = value
    return chain


def _follows_from(problem: str, hidden: list[str]) -> bool:
    """Whether a later check's problem only follows from what ``_validate_root`` removed."""
    for h in hidden:
        if h.startswith("[auth.") and h in problem:
            return True
        if h.endswith("[#") and problem.startswith(h[:-1]) and problem[len(h) - 1 : len(h)].isdigit():
            return True  # an element addressed by index, which may now be another's
    return False


def _model_for(spec: AdapterSpec, section: str) -> type[ConfigModel] | None:
    return {
        "listeners": spec.listener_model,
        "brokers": spec.broker_model,
        "inbound": spec.inbound_model,
        "outbound": spec.outbound_model,
    }[section]
