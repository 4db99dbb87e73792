"""gRPC adapter: the Mediator service (Publish, PublishStream, Subscribe, GetStatus), health checking and reflection."""

from __future__ import annotations

from adapters.grpc.config import GrpcInboundConfig, GrpcListenerConfig, GrpcOutboundConfig
from adapters.grpc.inbound import GrpcInbound
from adapters.grpc.outbound import GrpcOutbound, SubscriberHub
from adapters.grpc.server import GrpcListener
from mediator.core.errors import ConfigError
from mediator.core.seams import AdapterConfig, AdapterSpec, Built, Outbound, Runtime

__all__ = [
    "ADAPTER",
    "GrpcInbound",
    "GrpcInboundConfig",
    "GrpcListener",
    "GrpcListenerConfig",
    "GrpcOutbound",
    "GrpcOutboundConfig",
    "SubscriberHub",
    "build",
]


def build(cfg: AdapterConfig, rt: Runtime) -> Built:
    """One ``GrpcListener`` service per gRPC listener, carrying its inbound (at most one) and the
    subscriber hub its outbounds feed. Raises ``ConfigError`` on a dangling or shared listener."""
    problems: list[str] = []
    listeners: dict[str, GrpcListener] = {}
    for name, lcfg in cfg.listeners.items():
        if not isinstance(lcfg, GrpcListenerConfig):
            raise TypeError(f"listeners.{name}: expected GrpcListenerConfig, got {type(lcfg).__name__}")
        listeners[name] = GrpcListener(name, lcfg, rt)

    for name, icfg in cfg.inbounds.items():
        if not isinstance(icfg, GrpcInboundConfig):
            raise TypeError(f"inbound.{name}: expected GrpcInboundConfig, got {type(icfg).__name__}")
        listener = listeners.get(icfg.listener)
        if listener is None:
            problems.append(f"inbound.{name}.listener: no gRPC listener named {icfg.listener!r}")
        elif listener.inbound is not None:
            problems.append(
                f"inbound.{name}.listener: listener {icfg.listener!r} already serves gRPC inbound "
                f"{listener.inbound.name!r} (at most one gRPC inbound per listener)"
            )
        else:
            listener.inbound = GrpcInbound(
                name,
                rt.sink,
                stream_max_in_flight=listener.cfg.stream_max_in_flight,
                credential_headers=rt.credential_headers,
                certificates=listener.cfg.tls is not None and listener.cfg.tls.client_cert != "none",
                status=rt.status,
                max_wait_s=listener.cfg.max_wait_s,
                requests=rt.requests,
                request_timeout_s=icfg.request_timeout_s,
                max_request_timeout_s=icfg.max_request_timeout_s,
            )
            rt.health.register(f"inbound:{name}")

    outbounds: dict[str, Outbound] = {}
    for name, ocfg in cfg.outbounds.items():
        if not isinstance(ocfg, GrpcOutboundConfig):
            raise TypeError(f"outbound.{name}: expected GrpcOutboundConfig, got {type(ocfg).__name__}")
        listener = listeners.get(ocfg.listener)
        if listener is None:
            problems.append(f"outbound.{name}.listener: no gRPC listener named {ocfg.listener!r}")
            continue
        listener.hub.add_outbound(name, ocfg.subscriber_queue)
        outbounds[name] = GrpcOutbound(name, ocfg, listener.hub)
        rt.health.register(f"outbound:{name}")

    if problems:
        raise ConfigError("config", problems)
    return Built(services=list(listeners.values()), outbounds=outbounds)


ADAPTER = AdapterSpec(
    kind="grpc",
    build=build,
    listener_model=GrpcListenerConfig,
    inbound_model=GrpcInboundConfig,
    outbound_model=GrpcOutboundConfig,
)
