"""The ingress seam: who is calling (``Origin``), who they turned out to be (``Principal``), and the
ordered ``Stage`` list every inbound event passes before routing and commit.

An adapter only *extracts* what its protocol carries (the credentials in its headers or metadata, the
client certificate the TLS layer verified, the peer address, the identity a broker vouches for) and never
decides anything about it; the stages (``mediator.stages``) decide. Protocol-neutral: no network library.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Protocol

from mediator.core.content import DataCache
from mediator.core.envelope import Envelope
from mediator.core.patterns import compile_glob

ANONYMOUS = "unauthenticated"
"""The CloudEvents ``authtype`` of a caller no authenticator vouched for."""

AUTH_ATTRIBUTES = ("authtype", "authid", "authclaims")
"""The CloudEvents authcontext extension: set only from a verified principal, stripped when it arrives."""

_NO_CLAIMS: Mapping[str, str] = MappingProxyType({})


@dataclass(frozen=True, slots=True)
class PeerCertificate:
    """The identity in a client certificate that the TLS layer verified against the listener's client CA."""

    uris: tuple[str, ...] = ()
    dns: tuple[str, ...] = ()
    common_name: str | None = None


@dataclass(frozen=True, slots=True)
class Principal:
    """A verified caller. ``id`` is "" for an anonymous one."""

    id: str
    authtype: str  # CloudEvents authcontext: user, app_user, service_account, api_key, system, unauthenticated
    mechanism: str  # the authenticator's config name, "anonymous" for none
    roles: frozenset[str] = frozenset()
    claims: Mapping[str, str] = field(default_factory=lambda: _NO_CLAIMS)  # copied into authclaims
    expires_at: float | None = None  # Unix time after which the credential is no longer valid

    @property
    def anonymous(self) -> bool:
        return not self.id


@dataclass(frozen=True, slots=True)
class Who:
    """Whom a rule names (an authorization rule, a push outbound's subscribe rule): principal globs, roles,
    anonymous callers. Empty ``principals`` and ``roles`` name every authenticated principal, and
    ``anonymous`` adds anonymous callers without narrowing the rule to them."""

    principals: tuple[Callable[[str], bool], ...]
    roles: frozenset[str]
    anonymous: bool

    @classmethod
    def compile(cls, principals: Sequence[str], roles: Sequence[str], anonymous: bool) -> Who:
        return cls(tuple(compile_glob(p) for p in principals), frozenset(roles), anonymous)

    def admits(self, principal: Principal) -> bool:
        if principal.anonymous:
            return self.anonymous
        if self.principals and not any(m(principal.id) for m in self.principals):
            return False
        return not self.roles or not self.roles.isdisjoint(principal.roles)


@dataclass(slots=True)
class Origin:
    """What one call (an HTTP request, a gRPC call or stream, a batch of broker deliveries) carries.

    ``credentials`` are (lower-case header or metadata name, value) pairs for the names the stages asked
    for (``Runtime.credential_headers``), in the order they came, duplicates included. ``broker`` is
    True for broker inbounds: nobody can be answered there, so a refusal becomes a dead letter and a rate
    limit waits (withholding the acks) instead of refusing. ``principal`` is set by authentication and
    kept for the rest of the call (a gRPC stream authenticates once). Broker-vouched identities are per
    message and travel in ``provenance.vouched_user``.
    """

    inbound: str
    protocol: str
    peer: str = ""
    credentials: tuple[tuple[str, str], ...] = ()
    certificate: PeerCertificate | None = None
    broker: bool = False
    principal: Principal | None = None
    trusted: bool = False  # the gateway's own events (aggregation composites): the stages are skipped
    # W3C Trace Context of the call (HTTP headers, gRPC metadata), as it came; "" when absent. Broker
    # inbounds put each message's in its event's provenance instead (a batch mixes senders).
    traceparent: str = ""
    tracestate: str = ""
    # The request body exactly as received, once the adapter read it (HTTP): what a webhook signature is
    # computed over. None before it is read, and on protocols that carry no signed body.
    body: bytes | None = None


@dataclass(slots=True)
class Batch:
    """The events of one ``Sink.accept`` on their way through the stages.

    ``principals`` holds one entry per event once authentication ran (the same object for every event
    of an HTTP or gRPC call). A stage may replace ``events`` (a transform) but keeps the two aligned, and
    calls ``data.forget(env)`` after changing an event's data. A stage that takes an event out (an
    aggregation keeps it, an enrichment lookup failed) may put it in ``dead_letters`` with the reason:
    it is committed as a dead letter with the rest of the batch, and the sender acknowledged.
    """

    origin: Origin
    events: list[Envelope]
    principals: list[Principal] = field(default_factory=list)
    data: DataCache = field(default_factory=DataCache)  # each event's data parsed once (``content.py``)
    dead_letters: list[tuple[Envelope, str]] = field(default_factory=list)  # (event, reason)


class Stage(Protocol):
    """One ingress stage. Stages run in order before routing and commit."""

    name: str

    async def run(self, batch: Batch) -> None:
        """Pass the batch on (returning) or raise ``Rejected`` with a code; the whole batch is refused
        then (inbounds retry a refused batch event by event where each event has its own answer). May
        modify ``batch`` in place. Must be bounded in time; cancellation abandons the batch."""
        ...
