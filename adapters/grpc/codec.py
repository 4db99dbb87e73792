"""The gRPC binding: the wire message *is* the envelope (CloudEvents Protobuf field numbers).

Pure functions, no I/O. Inbound, a request becomes a validated envelope carrying the gateway's provenance
(the sender's own is discarded: it cannot forge gateway facts). Outbound, a subscriber gets the envelope
without provenance.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import TypeVar

import grpc
from google.protobuf.message import DecodeError, Message

from mediator.core.envelope import Envelope, validate
from mediator.core.errors import RejectCode, Rejected

PROTOCOL = "grpc"
TOPIC_SEPARATOR = "/"

REJECT_STATUS: Mapping[RejectCode, grpc.StatusCode] = MappingProxyType(
    {
        RejectCode.INVALID: grpc.StatusCode.INVALID_ARGUMENT,
        RejectCode.UNAUTHENTICATED: grpc.StatusCode.UNAUTHENTICATED,
        RejectCode.FORBIDDEN: grpc.StatusCode.PERMISSION_DENIED,
        # Not RESOURCE_EXHAUSTED: clients read that as "retry later", and a too large event never fits.
        RejectCode.TOO_LARGE: grpc.StatusCode.INVALID_ARGUMENT,
        RejectCode.UNSUPPORTED_MEDIA: grpc.StatusCode.INVALID_ARGUMENT,
        RejectCode.RATE_LIMITED: grpc.StatusCode.RESOURCE_EXHAUSTED,
        RejectCode.UNPROCESSABLE: grpc.StatusCode.INVALID_ARGUMENT,
    }
)
"""How each refusal answers a gRPC caller."""


def status_for(code: RejectCode) -> grpc.StatusCode:
    return REJECT_STATUS[code]


def code_number(status: grpc.StatusCode) -> int:
    """The google.rpc.Code number of a status (what PublishAck.code carries)."""
    number: int = status.value[0]
    return number


# grpc-core reads this trailer as the server's retry pushback when a client has a retry policy (gRFC A6).
PUSHBACK = "grpc-retry-pushback-ms"


def pushback(retry_after_s: float) -> tuple[str, str]:
    """The ``grpc-retry-pushback-ms`` trailer for a retry after ``retry_after_s`` seconds."""
    return (PUSHBACK, str(max(0, round(retry_after_s * 1000))))


def _seconds(value: float) -> int:
    """Whole seconds, rounded up (never sooner than asked), ignoring float noise (0.1 * 3 is 0.3)."""
    return max(0, math.ceil(round(value, 6)))


def _sf_string(text: str) -> str:
    """An RFC 8941 sf-string (as the HTTP adapter writes it): printable ASCII only, since grpc refuses a
    trailer that is not (the whole abort would fail), with ``\\`` and ``"`` escaped."""
    kept = "".join(c for c in text if " " <= c <= "~")
    return '"' + kept.replace("\\", "\\\\").replace('"', '\\"') + '"'


def rejected_trailers(exc: Rejected) -> tuple[tuple[str, str], ...]:
    """The trailing metadata of a refusal. A rate limit says when to retry: ``grpc-retry-pushback-ms``
    (read by grpc-core's retry policy) and ``retry-after`` (whole seconds, at least 1, like HTTP's
    header), from ``retry_after_s``, else the limit's reset, else 1 s; with its limit, the IETF httpapi
    ``ratelimit-policy`` and ``ratelimit`` fields as the HTTP adapter writes them. UNAUTHENTICATED
    carries the stage's challenge as ``www-authenticate``. Never a credential: only what the refusing
    stage chose to say."""
    trailers: list[tuple[str, str]] = []
    if exc.code is RejectCode.RATE_LIMITED:
        limit = exc.limit
        delay = exc.retry_after_s if exc.retry_after_s is not None else limit.reset_s if limit else 1.0
        trailers.append(pushback(delay))
        trailers.append(("retry-after", str(max(1, _seconds(delay)))))
        if limit is not None:
            policy = _sf_string(limit.policy)
            trailers.append(
                ("ratelimit-policy", f"{policy};q={max(0, limit.quota)};w={max(1, _seconds(limit.window_s))}")
            )
            trailers.append(("ratelimit", f"{policy};r={max(0, limit.remaining)};t={_seconds(limit.reset_s)}"))
    elif exc.code is RejectCode.UNAUTHENTICATED and (
        challenge := "".join(c for c in exc.challenge or "" if " " <= c <= "~")
    ):
        trailers.append(("www-authenticate", challenge))
    return tuple(trailers)


class Undecodable:
    """A request whose bytes are no message of the method's type: what ``lenient`` hands the handler
    instead of letting grpcio answer UNKNOWN ("Unexpected DecodeError") before our code runs."""

    __slots__ = ("reason",)
    id = ""  # for logs and stream acks, like a request's

    def __init__(self, reason: str) -> None:
        self.reason = reason


M = TypeVar("M", bound=Message)


def lenient(cls: type[M]) -> Callable[[bytes], M | Undecodable]:
    """A request deserializer that parses as grpcio's generated one does (same cost) but turns a
    ``DecodeError`` into an ``Undecodable`` for the handler to refuse with INVALID_ARGUMENT."""
    name = cls.DESCRIPTOR.full_name
    parse = cls.FromString

    def deserialize(data: bytes) -> M | Undecodable:
        try:
            return parse(data)
        except DecodeError:
            return Undecodable(
                f"the request ({len(data)} bytes) is not a {name} message: the Protobuf wire format is corrupt"
            )

    return deserialize


def to_envelope(request: Envelope | Undecodable, *, inbound: str, method: str, received_ns: int) -> Envelope:
    """The validated inbound envelope for one Publish / PublishStream request.

    Takes ownership of ``request`` and returns it, modified: the gRPC runtime deserialised it for this call
    alone, and a copy per event is measurable at stream rates. The sender's provenance is cleared, the
    envelope validated (raises ``Rejected``; so does an ``Undecodable``), then provenance is set:
    ``inbound``, protocol "grpc", the method name as topic, "/" as separator and ``received_ns`` (Unix
    time in ns) as received time.
    """
    if isinstance(request, Undecodable):
        raise Rejected(RejectCode.INVALID, request.reason)
    request.ClearField("provenance")
    validate(request)
    prov = request.provenance
    prov.inbound = inbound
    prov.protocol = PROTOCOL
    prov.topic = method
    prov.topic_separator = TOPIC_SEPARATOR
    prov.received.FromNanoseconds(received_ns)
    return request


def from_envelope(event: Envelope) -> Envelope:
    """What a subscriber gets: the envelope without the gateway-only provenance.

    ``event`` is never modified (the dispatcher may retry it); a copy is made only when it has provenance.
    """
    if not event.HasField("provenance"):
        return event
    out = Envelope()
    out.CopyFrom(event)
    out.ClearField("provenance")
    return out
