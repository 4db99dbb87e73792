"""Config models of the gRPC adapter: ``[listeners.X] kind = "grpc"``, gRPC inbounds and outbounds."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from mediator.core.seams import ConfigModel, InboundConfigBase, OutboundConfigBase


class GrpcListenerConfig(ConfigModel):
    """A gRPC server we run: the Mediator service, standard health checking and (optionally) reflection."""

    kind: Literal["grpc"]
    host: str = "127.0.0.1"
    port: int = Field(default=50051, ge=0, le=65535)  # 0 = any free port (tests)
    max_message_bytes: int = Field(default=4 * 1024 * 1024, ge=1024, le=2**31 - 1)
    reflection: bool = True
    stream_max_in_flight: int = Field(default=256, ge=1, le=65536)
    """Events of one PublishStream accepted but not yet acknowledged; reading pauses when full."""
    grace_s: float = Field(default=5.0, ge=0)
    """On stop: time in-flight calls get to finish before they are cancelled."""


class GrpcInboundConfig(InboundConfigBase):
    """Publish and PublishStream on ``listener`` (at most one gRPC inbound per listener)."""

    kind: Literal["grpc"]
    listener: str = Field(min_length=1)

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
