"""AMQP 0-9-1 (RabbitMQ) adapter: consume queues into envelopes, publish envelopes to exchanges."""

from __future__ import annotations

from adapters.amqp.config import (
    AmqpBindingConfig,
    AmqpBrokerConfig,
    AmqpInboundConfig,
    AmqpOutboundConfig,
)
from adapters.amqp.inbound import AmqpInbound
from adapters.amqp.outbound import AmqpOutbound
from mediator.core.errors import ConfigError
from mediator.core.seams import AdapterConfig, AdapterSpec, Built, Runtime


def _broker(cfg: AdapterConfig, section: str, broker: str) -> tuple[AmqpBrokerConfig, str]:
    model = cfg.brokers.get(broker)
    if not isinstance(model, AmqpBrokerConfig):
        raise ConfigError("config", [f"{section}.broker: no [brokers.{broker}] with kind = 'amqp'"])
    return model, model.resolved_url(broker)


def build(cfg: AdapterConfig, rt: Runtime) -> Built:
    """One connection per inbound and per outbound; raises ConfigError for a missing broker or url_env."""
    built = Built()
    for name, section in cfg.inbounds.items():
        assert isinstance(section, AmqpInboundConfig)
        broker, url = _broker(cfg, f"inbound.{name}", section.broker)
        built.services.append(AmqpInbound(name, section, broker, url, rt))
    for name, out_section in cfg.outbounds.items():
        assert isinstance(out_section, AmqpOutboundConfig)
        broker, url = _broker(cfg, f"outbound.{name}", out_section.broker)
        outbound = AmqpOutbound(name, out_section, broker, url, rt.health, rt.replies)
        built.services.append(outbound.link)
        built.outbounds[name] = outbound
    return built


ADAPTER = AdapterSpec(
    kind="amqp",
    build=build,
    broker_model=AmqpBrokerConfig,
    inbound_model=AmqpInboundConfig,
    outbound_model=AmqpOutboundConfig,
)

__all__ = [
    "ADAPTER",
    "AmqpBindingConfig",
    "AmqpBrokerConfig",
    "AmqpInbound",
    "AmqpInboundConfig",
    "AmqpOutbound",
    "AmqpOutboundConfig",
    "build",
]
