"""Config models of the push adapter: ``[outbound.X] kind = "push"`` (SSE and WebSocket subscribers on an
HTTP listener) and ``[inbound.X] kind = "websocket"`` (events published over a WebSocket)."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field, field_validator

from mediator.core.seams import ConfigModel, InboundConfigBase, OutboundConfigBase

SUBPROTOCOLS = ("cloudevents.json", "cloudevents.proto")
"""The CloudEvents WebSocket binding's subprotocols we speak: structured JSON in text frames, the
CloudEvents Protobuf format in binary frames."""


def validate_address_pattern(pattern: str) -> str | None:
    """None when ``pattern`` is a subscription address, else what is wrong with it.

    Segments are separated by ``.``; ``*`` stands for exactly one segment and ``#`` for zero or more
    trailing ones, as AMQP topic bindings write them: ``orders`` is that address only, ``orders.*`` is
    ``orders.eu`` but neither ``orders`` nor ``orders.eu.paid``, ``orders.#`` is all of them.
    """
    if not pattern:
        return "an address must not be empty"
    segments = pattern.split(".")
    for i, seg in enumerate(segments):
        if not seg:
            return "an address has no empty segments (no leading, trailing or doubled '.')"
        if "#" in seg and (seg != "#" or i != len(segments) - 1):
            return "'#' stands alone as the last segment"
        if "*" in seg and seg != "*":
            return "'*' stands alone as a whole segment"
    return None


def _patterns(values: list[str]) -> list[str]:
    for value in values:
        problem = validate_address_pattern(value)
        if problem:
            raise ValueError(f"address pattern {value!r}: {problem}")
    return values


class SubscribeRuleConfig(ConfigModel):
    """Who may subscribe to which addresses of a push outbound. On a listener with authenticators, what no
    ``allow`` rule allows is refused (403) and an anonymous caller is refused (401); a matching ``deny``
    rule refuses first. Without authenticators, no rules means anyone may subscribe."""

    name: str = Field(min_length=1)
    effect: Literal["allow", "deny"] = "allow"
    principals: list[str] = Field(default_factory=list, description="principal ids (globs); empty: any")
    roles: list[str] = Field(default_factory=list, description="any one of these roles; empty: any")
    anonymous: bool = Field(default=False, description="also match callers no authenticator vouched for")
    addresses: list[str] = Field(
        default_factory=lambda: ["#"],
        description="address patterns ('.' segments, '*' one, '#' the rest); a subscription must fall within one",
    )

    @field_validator("addresses")
    @classmethod
    def _addresses(cls, value: list[str]) -> list[str]:
        return _patterns(value)


class PushOutboundConfig(OutboundConfigBase):
    """Browsers, ``curl`` and WebSocket clients subscribe at ``GET {prefix}/{address}`` on ``listener``:
    Server-Sent Events (``Accept: text/event-stream``, or any GET that is not an upgrade) or a WebSocket
    upgrade (subprotocols ``cloudevents.json`` and ``cloudevents.proto``). A delivery is confirmed once the
    event is in the outbound's ring (durable beside the outbox); subscribers read the ring at their own
    pace and resume by cursor (``Last-Event-ID``, ``?lastEventId=``, ``?after=``)."""

    connection_kind: ClassVar[str | None] = "http"
    kind: Literal["push"]
    listener: str = Field(min_length=1, description="the http listener that serves the subscriptions")
    prefix: str = Field(default="/subscribe", description="subscriptions are GET {prefix}/{address}")
    max_events: int = Field(default=10_000, ge=1, le=10_000_000, description="events the ring keeps at most")
    max_age_s: float = Field(default=3600.0, gt=0, description="events older than this leave the ring")
    subscriber_buffer: int = Field(
        default=1000,
        ge=1,
        le=1_000_000,
        description="live events queued for one subscriber; one that lets it fill is disconnected (it may resume)",
    )
    send_buffer_bytes: int = Field(
        default=65536,
        ge=4096,
        description="the kernel send buffer of a subscriber's socket (SO_SNDBUF): how much a stalled reader holds",
    )
    coalesce_ms: float = Field(
        default=20.0,
        ge=0,
        le=1000,
        description=(
            "SSE: the longest a live event waits to be written with the ones that follow it, one write per"
            " subscriber for all of them; the wait after a fan-out is three times what writing it took, so it"
            " matters with many subscribers (1,000: about one write per 20 ms instead of one per event), not few;"
            " 0: every event written at once"
        ),
    )
    heartbeat_s: float = Field(default=15.0, gt=0, description="SSE comment / WebSocket ping interval")
    retry_ms: int = Field(default=3000, ge=0, description="the SSE retry: hint sent on connect")
    max_subscribers: int = Field(default=10_000, ge=1, description="subscribers at once (more: 503 / close 1013)")
    max_subscribers_per_principal: int = Field(
        default=100, ge=1, description="subscribers at once per principal (per client address when anonymous)"
    )
    subscribe: list[SubscribeRuleConfig] = Field(default_factory=list, description="who may subscribe to what")
    format: Literal["structured"] = Field(
        default="structured", description="what subscribers get: always the whole event (CloudEvents JSON or Protobuf)"
    )

    @field_validator("prefix")
    @classmethod
    def _prefix(cls, value: str) -> str:
        if not value.startswith("/") or value.endswith("/") or "{" in value or len(value) < 2:
            raise ValueError("a prefix starts with '/', does not end with '/' and has no '{' (e.g. '/subscribe')")
        return value

    def connection(self) -> str | None:
        return self.listener


class WebSocketInboundConfig(InboundConfigBase):
    """Clients publish over a WebSocket at ``GET {path}`` on ``listener`` (subprotocol ``cloudevents.json``:
    one structured CloudEvent per text frame; ``cloudevents.proto``: one CloudEvents Protobuf message per
    binary frame). Each event passes the same ingress stages as an HTTP POST; each frame is answered with
    ``{"ack": id}`` once committed, or ``{"error": code, "reason": ..., "id": ...}``."""

    connection_kind: ClassVar[str | None] = "http"
    kind: Literal["websocket"]
    listener: str = Field(min_length=1)
    path: str = Field(default="/ws", description="where the upgrade is served")
    max_frame_bytes: int = Field(default=1_048_576, ge=64, description="a larger frame closes the socket (1009)")
    max_in_flight: int = Field(default=64, ge=1, le=65536, description="frames of one socket awaiting their commit")
    heartbeat_s: float = Field(default=15.0, gt=0, description="ping interval; a peer that does not answer is closed")

    @field_validator("path")
    @classmethod
    def _path(cls, value: str) -> str:
        if not value.startswith("/") or "{" in value or (len(value) > 1 and value.endswith("/")):
            raise ValueError("a path starts with '/', has no '{' and does not end with '/'")
        return value

    def connection(self) -> str | None:
        return self.listener
