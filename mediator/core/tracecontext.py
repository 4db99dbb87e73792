"""W3C Trace Context at the protocol edges, protocol-neutral (no OpenTelemetry import here).

Inbound adapters only *extract* a hop's ``traceparent`` and ``tracestate`` (HTTP headers and gRPC
metadata into ``Origin``, a broker message's into its event's ``provenance``); ``mediator.observability``
decides what they mean. Outbound adapters write ``outgoing()`` into their carrier: set by the tracing
wrapper around ``Outbound.send`` to the send span's context, so the send span is the parent a consumer
sees. With tracing off it is None and adapters write what they always wrote.
"""

from __future__ import annotations

import re
from contextvars import ContextVar, Token

TRACEPARENT = "traceparent"
TRACESTATE = "tracestate"

# version-traceid-parentid-flags (W3C Trace Context level 1, section 3.2); version ff is invalid.
_TRACEPARENT = re.compile(r"[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}")

_OUTGOING: ContextVar[tuple[str, str] | None] = ContextVar("mediator_outgoing_trace", default=None)


def outgoing() -> tuple[str, str] | None:
    """(traceparent, tracestate) an outbound writes into the carrier of the send under way ("" for no
    tracestate), or None: then nothing is written beyond what the event's own attributes say."""
    return _OUTGOING.get()


def set_outgoing(value: tuple[str, str] | None) -> Token[tuple[str, str] | None]:
    """Set ``outgoing()`` for the current task; returns the token ``reset_outgoing`` takes."""
    return _OUTGOING.set(value)


def reset_outgoing(token: Token[tuple[str, str] | None]) -> None:
    _OUTGOING.reset(token)


def valid_traceparent(value: str | None) -> str | None:
    """``value`` trimmed and lower-cased when it is a well-formed traceparent, else None (the spec: an
    invalid one is ignored)."""
    if not value:
        return None
    value = value.strip().lower()
    if _TRACEPARENT.fullmatch(value) is None or value.startswith("ff"):
        return None
    return value
