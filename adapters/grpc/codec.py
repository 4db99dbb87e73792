"""The gRPC binding: the wire message *is* the envelope (CloudEvents Protobuf field numbers).

Pure functions, no I/O. Inbound, a request becomes a validated envelope carrying the gateway's provenance
(the sender's own is discarded: it cannot forge gateway facts). Outbound, a subscriber gets the envelope
without provenance.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

import grpc

from mediator.core.envelope import Envelope, validate
from mediator.core.errors import RejectCode

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
    }
)
"""How each refusal answers a gRPC caller."""


def status_for(code: RejectCode) -> grpc.StatusCode:
    return REJECT_STATUS[code]


def code_number(status: grpc.StatusCode) -> int:
    """The google.rpc.Code number of a status (what PublishAck.code carries)."""
    number: int = status.value[0]
    return number


def to_envelope(request: Envelope, *, inbound: str, method: str, received_ns: int) -> Envelope:
    """The validated inbound envelope for one Publish / PublishStream request.

    Takes ownership of ``request`` and returns it, modified: the gRPC runtime deserialised it for this call
    alone, and a copy per event is measurable at stream rates. The sender's provenance is cleared, the
    envelope validated (raises ``Rejected``), then provenance is set: ``inbound``, protocol "grpc", the
    method name as topic, "/" as separator and ``received_ns`` (Unix time in ns) as received time.
    """
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
