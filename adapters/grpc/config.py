"""Config models of the gRPC adapter: ``[listeners.X] kind = "grpc"``, gRPC inbounds and outbounds."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from mediator.core.seams import InboundConfigBase, ListenerConfigBase, OutboundConfigBase

_INT32 = 2**31 - 1
_MAX_S = _INT32 / 1000  # grpc's channel arguments are int32 milliseconds


class GrpcListenerConfig(ListenerConfigBase):
    """A gRPC server we run: the Mediator service, standard health checking and (optionally) reflection.

    ``host``, ``tls``, ``auth`` and ``allow_anonymous`` come from ``ListenerConfigBase``. The limits below
    are grpc-core's HTTP/2 channel arguments; they bound what one client connection can hold or cost.
    """

    kind: Literal["grpc"]
    port: int = Field(default=50051, ge=0, le=65535, description="TCP port; 0 = any free port (tests)")
    max_message_bytes: int = Field(
        default=4 * 1024 * 1024,
        ge=1024,
        le=_INT32,
        description="largest request or response message; a larger request fails with RESOURCE_EXHAUSTED",
    )
    reflection: bool = Field(default=True, description="serve gRPC server reflection (grpcurl, grpcui)")
    stream_max_in_flight: int = Field(
        default=256,
        ge=1,
        le=65536,
        description="events of one PublishStream accepted but not yet acknowledged; reading pauses when full",
    )
    grace_s: float = Field(default=5.0, ge=0, description="on stop: time in-flight calls get before cancellation")
    max_wait_s: float = Field(
        default=30.0, ge=0, description="the longest a Publish with metadata 'prefer: wait=N' waits for delivery"
    )
    max_concurrent_streams: int = Field(
        default=100,
        ge=1,
        le=_INT32,
        description=(
            "calls one connection may have open at once (HTTP/2 SETTINGS_MAX_CONCURRENT_STREAMS, "
            "grpc.max_concurrent_streams); a client's further calls wait in its own queue until one ends"
        ),
    )
    keepalive_time_s: float = Field(
        default=60.0,
        gt=0,
        le=_MAX_S,
        description="the server pings a connection after this long without reads (grpc.keepalive_time_ms)",
    )
    keepalive_timeout_s: float = Field(
        default=20.0,
        gt=0,
        le=_MAX_S,
        description="a ping unanswered this long closes the connection (grpc.keepalive_timeout_ms)",
    )
    min_ping_interval_s: float = Field(
        default=10.0,
        ge=0,
        le=_MAX_S,
        description=(
            "a client ping sooner than this after the previous one is a strike "
            "(grpc.http2.min_ping_interval_without_data_ms); grpc's default of 5 min would strike clients "
            "that follow the usual 10-60 s keepalive advice"
        ),
    )
    max_ping_strikes: int = Field(
        default=2,
        ge=0,
        le=_INT32,
        description="strikes before GOAWAY(too_many_pings); 0 = unlimited (grpc.http2.max_ping_strikes)",
    )
    max_connection_idle_s: float | None = Field(
        default=300.0,
        gt=0,
        le=_MAX_S,
        description="close a connection with no call open for this long (grpc.max_connection_idle_ms); None = never",
    )
    max_connection_age_s: float | None = Field(
        default=None,
        gt=0,
        le=_MAX_S,
        description=(
            "send GOAWAY to a connection this old, so clients reconnect and spread over workers "
            "(grpc.max_connection_age_ms); None = never"
        ),
    )
    max_connection_age_grace_s: float | None = Field(
        default=None,
        ge=0,
        le=_MAX_S,
        description=(
            "after that GOAWAY, how long open calls (a PublishStream, a Subscribe) may go on before the "
            "connection is closed (grpc.max_connection_age_grace_ms); None = until they end"
        ),
    )

    @model_validator(mode="after")
    def _grpc_tls(self) -> GrpcListenerConfig:
        # grpcio's server credentials either require and verify a client certificate or never ask for
        # one (GRPC_SSL_REQUEST_AND_REQUIRE_CLIENT_CERTIFICATE_AND_VERIFY or _DONT_REQUEST_): with
        # "optional" no client would ever present one, so refuse it rather than silently turn mTLS off.
        # Nor can grpcio set a minimum TLS version: grpc-core always accepts TLS 1.2 and 1.3.
        if self.tls is not None and self.tls.client_cert == "optional":
            raise ValueError(
                "tls.client_cert = 'optional' is not possible on a gRPC listener (grpcio either requires a "
                "client certificate or never asks for one): use 'required' or 'none'"
            )
        if self.tls is not None and self.tls.min_version != "1.2":
            raise ValueError(
                f"tls.min_version = {self.tls.min_version!r} is not possible on a gRPC listener "
                "(grpcio always accepts TLS 1.2 and 1.3): use '1.2'"
            )
        return self

    def server_options(self) -> list[tuple[str, int]]:
        """The grpc channel arguments of this listener's server."""

        def ms(seconds: float) -> int:
            return int(seconds * 1000)

        options = [
            ("grpc.max_receive_message_length", self.max_message_bytes),
            ("grpc.max_send_message_length", self.max_message_bytes),
            ("grpc.max_concurrent_streams", self.max_concurrent_streams),
            ("grpc.keepalive_time_ms", ms(self.keepalive_time_s)),
            ("grpc.keepalive_timeout_ms", ms(self.keepalive_timeout_s)),
            # Clients may keep an idle connection alive with pings (within min_ping_interval_s), and the
            # server's own keepalive pings go on while no call is open (max_connection_idle_s ends that).
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.max_pings_without_data", 0),
            ("grpc.http2.min_ping_interval_without_data_ms", ms(self.min_ping_interval_s)),
            ("grpc.http2.max_ping_strikes", self.max_ping_strikes),
        ]
        if self.max_connection_idle_s is not None:
            options.append(("grpc.max_connection_idle_ms", ms(self.max_connection_idle_s)))
        if self.max_connection_age_s is not None:
            options.append(("grpc.max_connection_age_ms", ms(self.max_connection_age_s)))
        if self.max_connection_age_grace_s is not None:
            options.append(("grpc.max_connection_age_grace_ms", ms(self.max_connection_age_grace_s)))
        return options


class GrpcInboundConfig(InboundConfigBase):
    """Publish and PublishStream on ``listener`` (at most one gRPC inbound per listener)."""

    kind: Literal["grpc"]
    listener: str = Field(min_length=1)
    request_timeout_s: float = Field(
        default=5.0, gt=0, le=300, description="Request RPC: how long a call without a deadline waits for its reply"
    )
    max_request_timeout_s: float = Field(
        default=30.0, gt=0, le=300, description="Request RPC: the longest a call's own deadline is honoured"
    )

    def connection(self) -> str | None:
        return self.listener


class GrpcOutboundConfig(OutboundConfigBase):
    """Subscribe streams on ``listener``: each subscriber gets a queue of ``subscriber_queue`` events;
    a subscriber that lets it fill up is disconnected (RESOURCE_EXHAUSTED)."""

    kind: Literal["grpc"]
    listener: str = Field(min_length=1)
    subscriber_queue: int = Field(default=1024, ge=1, le=1_000_000)

    def connection(self) -> str | None:
        return self.listener
