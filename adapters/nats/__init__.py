"""NATS adapter (nats-py): core subjects and JetStream, as inbounds and outbounds.

Each inbound and each outbound holds its own connection, named ``<broker name> <inbound|outbound>:<name>``.
See docs/nats.md.
"""

from __future__ import annotations

from adapters.nats.config import NatsBrokerConfig, NatsInboundConfig, NatsOutboundConfig, NatsStreamConfig
from adapters.nats.connection import BrokerAccess, broker_access
from adapters.nats.inbound import NatsInbound
from adapters.nats.outbound import NatsOutbound
from mediator.core.errors import ConfigError
from mediator.core.seams import AdapterConfig, AdapterSpec, Built, Runtime

__all__ = [
    "ADAPTER",
    "NatsBrokerConfig",
    "NatsInbound",
    "NatsInboundConfig",
    "NatsOutbound",
    "NatsOutboundConfig",
    "NatsStreamConfig",
    "build",
]


def build(cfg: AdapterConfig, rt: Runtime) -> Built:
    """One connection per inbound and per outbound; raises ConfigError for a missing broker, an unset
    secret variable or an unreadable TLS file (every problem at once)."""
    problems: list[str] = []
    brokers: dict[str, BrokerAccess] = {}

    def access(section: str, broker: str) -> BrokerAccess | None:
        if broker not in brokers:
            model = cfg.brokers.get(broker)
            if not isinstance(model, NatsBrokerConfig):
                problems.append(f"{section}.broker: no [brokers.{broker}] with kind = 'nats'")
                return None
            try:
                brokers[broker] = broker_access(broker, model)
            except ConfigError as exc:
                problems.extend(exc.problems)
                return None
        return brokers[broker]

    built = Built()
    for name, section in cfg.inbounds.items():
        assert isinstance(section, NatsInboundConfig)
        broker = access(f"inbound.{name}", section.broker)
        if broker is not None:
            built.services.append(NatsInbound(name, section, broker, rt))
    for name, out_section in cfg.outbounds.items():
        assert isinstance(out_section, NatsOutboundConfig)
        broker = access(f"outbound.{name}", out_section.broker)
        if broker is not None:
            outbound = NatsOutbound(name, out_section, broker, rt.health, rt.replies)
            built.services.append(outbound.link)
            built.outbounds[name] = outbound
    if problems:
        raise ConfigError("config", problems)
    return built


ADAPTER = AdapterSpec(
    kind="nats",
    build=build,
    broker_model=NatsBrokerConfig,
    inbound_model=NatsInboundConfig,
    outbound_model=NatsOutboundConfig,
)
