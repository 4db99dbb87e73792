"""The seams between the core and the protocol adapters.

An adapter package (``adapters/<kind>/``) exports ``ADAPTER: AdapterSpec``. The composition root
(``mediator.registry``) is the only place that names adapter packages; nothing else under ``mediator/``
imports them, and adapters never import each other.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Annotated, Any, ClassVar, Literal, Protocol, runtime_checkable

from pydantic import BaseModel, ConfigDict, Field, PlainSerializer, PlainValidator, model_validator

from mediator.core.envelope import Envelope
from mediator.core.errors import Rejected
from mediator.core.health import Health
from mediator.core.ingress import Origin, Principal
from mediator.core.patterns import Template
from mediator.core.tap import TailFilter, Watcher
from mediator.core.transform import TransformConfig


class Sink(Protocol):
    """Where inbound adapters hand events. Shared by every inbound; safe to call concurrently."""

    async def authenticate(self, origin: Origin) -> Principal:
        """Who ``origin`` is, per the authenticators its inbound names (cached on ``origin.principal``,
        so a stream or a request authenticates once). An adapter may call it before it reads a body or a
        stream, to refuse early; ``accept`` calls it anyway. Raises ``Rejected(UNAUTHENTICATED)``."""
        ...

    async def accept(self, events: Sequence[Envelope], origin: Origin) -> Collection[str] | None:
        """Run the ingress stages, route, and commit ``events`` (all from ``origin``) as one unit.

        Returns only when every event is safe (committed, or recognised as a duplicate); only then may the
        adapter acknowledge its sender. Returns the ids of the duplicates (events whose source and id were
        committed within the dedup window: safe, and not delivered again), so the adapter can tell its
        sender; None or empty when there were none. (Ids rather than positions: a stage may reshape the
        batch.) Raises ``Rejected`` (the sender's fault: answer with the mapped
        refusal and never retry) or ``NotReady`` (draining, overloaded or unable to commit: answer 503 /
        UNAVAILABLE, or withhold the ack so the broker redelivers). Cancellation abandons the commit
        wait; the events may or may not be committed, so the adapter must not acknowledge.
        """
        ...

    def refused(self, origin: Origin, exc: Rejected) -> None:
        """Report a refusal the inbound made itself, before ``authenticate`` or ``accept`` (a body over the
        size limit, a media type it does not take, bytes that do not decode), so that it is logged and
        counted like every other. Never raises."""
        ...

    async def dead_letter(self, event: Envelope, reason: str) -> None:
        """Commit a message the inbound could not decode (``event`` wraps its raw bytes) as a dead
        letter with ``reason``; returns when it is safe, after which the adapter acknowledges it so it
        never loops. Raises ``NotReady`` like ``accept``."""
        ...


@dataclass(frozen=True, slots=True)
class Reply:
    """A consumer's answer to a request: its body and content type, and whether the consumer marked it an
    error (AMQP header / MQTT 5 user property ``mediator-error: true``)."""

    body: bytes
    content_type: str | None = None
    error: bool = False


class Replies(Protocol):
    """Where outbounds hand the replies they receive (the daemon's correlator, ``mediator.correlator``)."""

    def resolve(self, correlation_id: str, reply: Reply) -> bool:
        """Answer the request waiting for ``correlation_id``. Returns False when none waits (late,
        duplicate or unknown: counted and logged, the reply dropped). Never raises; matched by the
        correlation id only."""
        ...


class Requests(Protocol):
    """Request-reply for inbounds in request mode (the pipeline)."""

    async def request(self, event: Envelope, origin: Origin, timeout_s: float) -> Reply:
        """Run the ingress stages on ``event``, route it to exactly one request-capable destination, publish
        it there with a reply address, a correlation id and an expiry of ``timeout_s``, and return the
        consumer's reply. Not committed to the outbox. Raises ``Rejected`` (a stage refused), ``NotReady``
        (draining), ``RequestUndeliverable`` or ``RequestTimeout``; nothing is left waiting after it
        returns or raises (cancellation included)."""
        ...


@runtime_checkable
class RequestOutbound(Protocol):
    """The optional capability of an outbound that can carry requests (AMQP, MQTT 5)."""

    name: str

    def request_refusal(self) -> str | None:
        """Why this outbound cannot carry requests (MQTT 3.1.1, requests not enabled), or None."""
        ...

    async def send_request(
        self, event: Envelope, address: str, format: str, correlation_id: str, timeout_s: float
    ) -> None:
        """Publish ``event`` to ``address`` with this outbound's reply address and ``correlation_id``, set to
        expire (AMQP ``expiration``, MQTT Message Expiry Interval) after ``timeout_s``; return once the
        broker confirmed it. The reply, when it comes, goes to ``Runtime.replies``. Raises
        ``RetryableDeliveryError`` / ``TerminalDeliveryError`` like ``Outbound.send``."""
        ...


class Admission(Protocol):
    """Shedding by priority for broker inbounds (the daemon's overload manager, mediator/overload.py)."""

    async def admitted(self, inbound: str) -> None:
        """Return once publishes of ``inbound``'s priority are admitted (at once when they are). A broker
        inbound awaits it before handing messages to the sink, holding them unacknowledged meanwhile, so
        its broker sends no more (paused). Cancellation stops the wait; it never raises otherwise."""
        ...


class Service(Protocol):
    """A long-lived part of an adapter: a listener, a consumer, a broker connection."""

    name: str

    async def run(self) -> None:
        """Run until cancelled. Connects (and reconnects with backoff) by itself and never raises on a
        broker outage: it reports its state to ``Health`` instead. Cancellation closes everything it
        opened before returning; only a bug or a bind failure at start-up may escape as an exception."""
        ...


class Outbound(Protocol):
    """A destination protocol endpoint. The dispatcher calls ``send`` up to ``max_in_flight`` times
    concurrently and classifies the outcome."""

    name: str
    max_in_flight: int

    async def send(self, event: Envelope, address: str, format: str) -> None:
        """Deliver one event to ``address`` in ``format`` (see ``mediator.core.formats.FORMATS``).

        Returns only when the peer confirmed (MQTT PUBACK, AMQP publisher confirm, HTTP 2xx, gRPC stream
        write). Raises ``RetryableDeliveryError`` (not connected, timeout, broker nack, 5xx) or
        ``TerminalDeliveryError`` (unroutable, 4xx, too large). Must itself be bounded in time.
        """
        ...


class Admin(Protocol):
    """Operator actions a listener may expose (the HTTP listener serves them under /admin/)."""

    async def dead_letters(self, limit: int) -> list[dict[str, object]]:
        """The oldest ``limit`` dead letters as JSON-ready dicts (ids, reason, attempts; never payloads)."""
        ...

    async def replay(self, ids: Sequence[int] | None, who: str = "") -> int:
        """Queue dead letters (all when ``ids`` is None) for delivery again; returns how many. ``who``
        (the caller, for the audit log) is recorded with every change to the dead letters."""
        ...

    async def dead_letter(self, id: int) -> dict[str, object] | None:
        """One dead letter whole: what ``dead_letters`` lists plus its attributes and data (text, JSON
        pretty-printed, or base64), or None."""
        ...

    async def edit_replay(
        self, id: int, data: bytes | None, attributes: Mapping[str, str] | None, who: str = ""
    ) -> int:
        """Replace a dead letter's data and/or attributes (an empty value removes one), then replay it;
        returns 1, or 0 when there is none. Raises ValueError for an edit that cannot be made."""
        ...

    async def delete(self, ids: Sequence[int], who: str = "") -> int:
        """Forget these dead letters; returns how many there were."""
        ...

    async def audit(self, limit: int) -> list[dict[str, object]]:
        """The latest changes to the dead letters, newest first: id, at, who, action, detail."""
        ...

    async def status(self) -> dict[str, object]:
        """The daemon's state as JSON-ready dicts: listeners, brokers, inbounds, outbounds (state, counters,
        backlog, breaker), the outbox (size, oldest pending delivery) and the config's version."""
        ...

    async def routes(self) -> dict[str, object]:
        """The translation table as written and as resolved, with each route's count of matched events."""
        ...

    async def rates(self) -> dict[str, object]:
        """Events per second of each inbound and outbound over the last minutes (``mediator.rates``)."""
        ...

    @property
    def payload_roles(self) -> frozenset[str]:
        """Roles whose holders see event data in the live tail (none by default)."""
        ...

    def tail(self, wanted: TailFilter) -> Watcher:
        """Watch the events passing from now on that ``wanted`` matches (``mediator.core.tap``); ``untail``
        it when done. Raises ValueError (a bad CEL expression) or TooManyWatchers."""
        ...

    def untail(self, watcher: Watcher) -> None: ...

    async def history(self, method: str, path: str, query: Mapping[str, str], body: object) -> tuple[int, object]:
        """The event store's query and the replays (``path``: what follows ``/admin/``, e.g. ``events``,
        ``replays/ID``): (HTTP status, JSON-ready answer). ``body``: the parsed JSON body, or None."""
        ...


@dataclass(frozen=True, slots=True)
class StatusLookup:
    """The answer to a delivery-status read: ``found`` ("known", "expired" or "unknown") and, for a known
    event, its status document (JSON-ready), the inbound that took it (whose authenticators guard the
    read) and its verified publisher (``principal``, "" for an anonymous one)."""

    found: Literal["known", "expired", "unknown"]
    document: dict[str, object] | None = None
    inbound: str = ""
    principal: str = ""


WaitOutcome = Literal["final", "timeout", "unknown", "busy", "gone"]


class StatusReader(Protocol):
    """Delivery status (``mediator/status.py``), for listeners: what became of an event, and waiting for it.
    ``window_s``: how long a status is kept after the event settled."""

    @property
    def window_s(self) -> float: ...

    async def lookup(self, event_id: str) -> StatusLookup: ...

    async def wait(self, event_id: str, timeout_s: float, gone: asyncio.Future[None] | None = None) -> WaitOutcome:
        """Wait until the event is final (every destination settled, or one dead-lettered), at most
        ``timeout_s``: "final", "timeout", "unknown" (no such event here), "busy" (too many wait
        already: not waited at all) or "gone" (``gone`` resolved first: the caller disconnected)."""
        ...


@dataclass(frozen=True, slots=True)
class MetricsEndpoint:
    """How HTTP listeners serve the Prometheus metrics (``[metrics]``): ``render`` gives the exposition
    (``content_type``) at ``path``, on ``listener`` only or on every HTTP listener when None; ``public``
    serves them without the admin credential on a listener with ``auth``."""

    render: Callable[[], bytes]
    content_type: str
    path: str = "/metrics"
    listener: str | None = None
    public: bool = False


def _template(value: object) -> Template:
    if isinstance(value, Template):
        return value
    if not isinstance(value, str):
        raise ValueError("a template must be a string such as 'com.example.{topic.1}'")
    if not value:
        raise ValueError("a template must not be empty")
    return Template.compile(value)  # its ValueError says which placeholder or brace is wrong


TemplateField = Annotated[Template, PlainValidator(_template), PlainSerializer(lambda t: t.text, return_type=str)]
"""A config value compiled to a ``Template`` (inbound ``type`` and ``source``, for instance)."""


class ConfigModel(BaseModel):
    """Base of every config model: unknown keys are errors and values are immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class RetryConfig(ConfigModel):
    """Dispatch policy of one outbound."""

    max_attempts: int = Field(default=10, ge=1, description="sends tried before the delivery is dead-lettered")
    backoff_initial_s: float = Field(default=0.2, gt=0, description="first retry delay (doubled each time, jittered)")
    backoff_max_s: float = Field(default=30.0, gt=0, description="longest retry delay")


LOOPBACK_HOSTS = frozenset({"127.0.0.1", "::1", "localhost"})


class TlsConfig(ConfigModel):
    """TLS on a listener we run. The files are read at start and again on SIGHUP (established
    connections keep the certificate they began with)."""

    cert_file: str = Field(min_length=1, description="PEM certificate chain, the server's certificate first")
    key_file: str = Field(min_length=1, description="PEM private key of the certificate")
    client_ca_file: str | None = Field(default=None, description="PEM CA bundle client certificates must chain to")
    client_cert: Literal["none", "optional", "required"] = Field(
        default="none", description="ask for a client certificate (mTLS); 'required' refuses a handshake without one"
    )
    min_version: Literal["1.2", "1.3"] = "1.2"

    @model_validator(mode="after")
    def _ca_for_clients(self) -> TlsConfig:
        if self.client_cert != "none" and not self.client_ca_file:
            raise ValueError(f"client_cert = {self.client_cert!r} needs client_ca_file")
        return self


class ListenerConfigBase(ConfigModel):
    """A server we run. ``auth`` names the authenticators (``[auth.NAME]``) its inbounds use unless they
    name their own; off loopback, a listener without any refuses to start unless ``allow_anonymous``."""

    kind: str
    host: str = Field(
        default="127.0.0.1", description="address to bind; off loopback, auth or allow_anonymous is needed"
    )
    tls: TlsConfig | None = Field(default=None, description="serve TLS (and mTLS with client_cert)")
    auth: list[str] = Field(default_factory=list, description="authenticators ([auth.NAME]) its inbounds use")
    allow_anonymous: bool = Field(default=False, description="let callers no authenticator vouches for through")

    @property
    def loopback(self) -> bool:
        return self.host in LOOPBACK_HOSTS


class BrokerTlsConfig(ConfigModel):
    """TLS to a broker (``mqtts``, ``amqps``): the CA that signed its certificate, and our own
    certificate when the broker asks for one."""

    ca_file: str | None = Field(default=None, description="PEM CA bundle; None: the system's trust store")
    cert_file: str | None = None
    key_file: str | None = None
    server_hostname: str | None = Field(default=None, description="name to verify instead of the host")
    verify: bool = True

    @model_validator(mode="after")
    def _pair(self) -> BrokerTlsConfig:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("cert_file and key_file go together")
        return self


class InboundConfigBase(ConfigModel):
    """An inbound section. ``connection()`` names the listener or broker it uses, if any; a section whose
    listener belongs to another adapter kind (a WebSocket inbound on an HTTP listener) says which in
    ``connection_kind``.

    ``auth`` names authenticators (``[auth.NAME]``); None takes the listener's. With authenticators,
    a caller none of them vouches for is refused unless ``allow_anonymous``. ``priority``: which of its
    publishes are shed first under overload (mediator/overload.py).
    """

    connection_kind: ClassVar[str | None] = None  # None: a listener or broker of its own kind
    kind: str
    auth: list[str] | None = None
    allow_anonymous: bool | None = None
    transform: TransformConfig | None = None  # the ingress transform (mediator/stages/transform.py)
    priority: Literal["critical", "normal", "low"] = Field(
        default="normal",
        description="under overload ([overload]) low publishes are shed first, then normal ones; critical ones "
        "are taken up to [outbox] max_pending. A shed MQTT or AMQP inbound pauses",
    )

    def connection(self) -> str | None:
        return None

    @property
    def request_mode(self) -> bool:
        """Whether its calls are requests answered with a consumer's reply (request-reply)."""
        return False


class OutboundConfigBase(ConfigModel):
    connection_kind: ClassVar[str | None] = None  # as InboundConfigBase's (a push outbound: "http")
    kind: str
    max_in_flight: int = Field(default=256, ge=1, le=65536, description="sends awaiting confirmation at once")
    send_timeout_s: float = Field(default=10.0, gt=0, description="a send not confirmed within it is retried")
    retry: RetryConfig = RetryConfig()

    def connection(self) -> str | None:
        return None

    def request_refusal(self) -> str | None:
        """Why a route from a request-mode inbound cannot end here (None: it can carry requests)."""
        return f"a {self.kind} outbound cannot carry requests (AMQP outbounds and MQTT 5 ones with requests = true can)"


@dataclass(frozen=True, slots=True)
class AdapterConfig:
    """The sections of the whole config that belong to one adapter kind, by admin-chosen name."""

    listeners: Mapping[str, ConfigModel] = field(default_factory=dict)
    brokers: Mapping[str, ConfigModel] = field(default_factory=dict)
    inbounds: Mapping[str, InboundConfigBase] = field(default_factory=dict)
    outbounds: Mapping[str, OutboundConfigBase] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class MountRequest:
    """What an HTTP listener hands a mounted handler with each request it routes to it.

    ``request`` is the listener's request object (an aiohttp ``web.BaseRequest``; ``Any`` because the core
    names no network library), ``origin`` who is calling as the stages see it (``inbound`` is
    ``listener:NAME``, so ``Sink.authenticate`` applies the listener's authenticators). ``auth``: the
    listener names authenticators (a mount that reads events out then refuses anonymous callers).
    ``cors_headers`` are the ``Access-Control-*`` headers the answer to this request's ``Origin`` must
    carry (empty when there is none or it is not allowed); ``origin_allowed`` is False when the request
    names an ``Origin`` that is neither the listener's own nor one its CORS settings allow (a WebSocket
    upgrade from such a page is cross-site WebSocket hijacking). ``disconnected`` is resolved when the
    client's connection is lost (a streamed answer that only writes would otherwise notice at its next
    write).
    """

    request: Any
    origin: Origin
    listener: str
    auth: bool
    cors_headers: Mapping[str, str]
    origin_allowed: bool
    disconnected: asyncio.Future[None]


class HttpMount(Protocol):
    """Paths an adapter other than the HTTP adapter serves on an HTTP listener (``Mounts``)."""

    component: str  # the health component that owns it, e.g. "outbound:browsers"
    prefix: str  # serves GET requests for ``prefix`` + "/" + anything; "" never

    async def handle(self, call: MountRequest) -> Any:
        """Answer one request (returns the listener's response object, a streamed one included: it may
        run as long as the client stays). Never raises for a client's fault: it answers it."""
        ...


class Mounts:
    """Which ``HttpMount`` serves which path prefix on which HTTP listener, shared by the daemon's units.

    A mount is added by the service that owns it when it starts and removed when it stops, so a reload
    that restarts the listener, or the mount's own unit, needs no coordination between the two. Loop
    thread only."""

    def __init__(self) -> None:
        self._by_listener: dict[str, dict[str, HttpMount]] = {}

    def add(self, listener: str, mount: HttpMount) -> None:
        """Raises ``ValueError`` when another mount already serves the prefix on the listener."""
        table = self._by_listener.setdefault(listener, {})
        other = table.get(mount.prefix)
        if other is not None and other is not mount:
            raise ValueError(f"{other.component} already serves {mount.prefix}/ on listener {listener!r}")
        table[mount.prefix] = mount

    def remove(self, listener: str, mount: HttpMount) -> None:
        table = self._by_listener.get(listener, {})
        if table.get(mount.prefix) is mount:
            del table[mount.prefix]

    def find(self, listener: str, path: str) -> HttpMount | None:
        """The mount serving ``path`` (``/subscribe/orders`` for prefix ``/subscribe``), if any."""
        table = self._by_listener.get(listener)
        if not table:
            return None
        for prefix, mount in table.items():
            if path.startswith(prefix) and (len(path) == len(prefix) or path[len(prefix)] == "/"):
                return mount
        return None

    def prefixes(self, listener: str) -> list[str]:
        return sorted(self._by_listener.get(listener, {}))

    def served(self, listener: str) -> list[HttpMount]:
        """The mounts on ``listener`` now, by prefix."""
        table = self._by_listener.get(listener, {})
        return [table[p] for p in sorted(table)]


@dataclass(frozen=True, slots=True)
class Sample:
    """One value an adapter reports for the metrics: ``mediator_<name>`` with ``labels``."""

    name: str
    help: str
    kind: Literal["gauge", "counter"]
    labels: tuple[tuple[str, str], ...]
    value: float


class Reporter(Protocol):
    """Counts an adapter keeps of its own (a push outbound's subscribers), read at scrape and status time."""

    def samples(self) -> Iterable[Sample]: ...

    def status(self) -> dict[str, object]:
        """JSON-ready; shown under its component in ``/admin/status``."""
        ...


class Reports:
    """The ``Reporter`` of each component that has one; added when its service starts, removed when it stops."""

    def __init__(self) -> None:
        self.by_component: dict[str, Reporter] = {}

    def add(self, component: str, reporter: Reporter) -> None:
        self.by_component[component] = reporter

    def remove(self, component: str, reporter: Reporter) -> None:
        if self.by_component.get(component) is reporter:
            del self.by_component[component]


@dataclass(frozen=True, slots=True)
class Runtime:
    """What the daemon lends to adapters.

    ``credential_headers``: the lower-case header / metadata names an inbound copies into
    ``Origin.credentials``. ``reload_hooks``: callables an adapter adds (re-read its TLS certificates, say)
    that the daemon calls on SIGHUP; each must be quick or schedule its own work, and must not raise.
    ``admin_roles``: a principal with one of these may use admin endpoints when authentication is on.
    ``metrics``: what HTTP listeners serve at ``/metrics`` (None: nothing).
    ``status``: delivery status for listeners (None: none served).
    ``replies`` / ``requests``: the correlator and the pipeline's request path (request-reply).
    ``max_pending``: the outbox's back-pressure threshold (``[outbox] max_pending``; None: unbounded), which
    bounds what a broker inbound asks its broker for (``window``).
    ``mounts``: paths adapters serve on HTTP listeners (shared by every unit of the daemon).
    ``reports``: adapters' own counts for the metrics and the status.
    ``outbox_path``: the SQLite outbox file, beside which an adapter keeps durable state of its own
    (None: the outbox is in memory, and so is that state).
    ``admission``: what a broker inbound waits on while its priority is shed (None: never paused).
    """

    sink: Sink
    health: Health
    admin: Admin | None = None
    credential_headers: frozenset[str] = frozenset({"authorization"})
    reload_hooks: list[Callable[[], None]] = field(default_factory=list)
    admin_roles: frozenset[str] = frozenset({"admin"})
    metrics: MetricsEndpoint | None = None
    max_pending: int | None = None
    status: StatusReader | None = None
    replies: Replies | None = None  # the correlator outbounds hand replies to (None: no request-reply)
    requests: Requests | None = None  # what request-mode inbounds call (None: request mode refused)
    mounts: Mounts = field(default_factory=Mounts)
    reports: Reports = field(default_factory=Reports)
    outbox_path: str | None = None
    admission: Admission | None = None

    def window(self, asked: int, protocol_max: int = 65535) -> int:
        """How many unacknowledged messages a broker inbound should let its broker send (MQTT 5 Receive
        Maximum, AMQP prefetch): what its config asks for, but no more than the outbox takes
        (``max_pending``: past it the sink refuses with NotReady, so a larger window only moves the wait
        from the broker into our memory) nor than the protocol allows."""
        return min(asked, protocol_max, asked if self.max_pending is None else self.max_pending)


@dataclass(slots=True)
class Built:
    """What an adapter built from its config: services to run and outbounds to dispatch to."""

    services: list[Service] = field(default_factory=list)
    outbounds: dict[str, Outbound] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class AdapterSpec:
    """One protocol's entry in the registry. A model is None when the protocol has no such section."""

    kind: str
    build: Callable[[AdapterConfig, Runtime], Built]
    listener_model: type[ConfigModel] | None = None
    broker_model: type[ConfigModel] | None = None
    inbound_model: type[InboundConfigBase] | None = None
    outbound_model: type[OutboundConfigBase] | None = None
