"""MQTT adapter (aiomqtt over paho): subscriptions as inbounds, publishing as outbounds.

Each inbound and each outbound holds its own connection, client id ``<broker client_id>-<name>``.
"""

from __future__ import annotations

import os

from adapters.mqtt.config import MqttBrokerConfig, MqttInboundConfig, MqttOutboundConfig
from adapters.mqtt.connection import BrokerAccess
from adapters.mqtt.inbound import MqttInbound
from adapters.mqtt.outbound import MqttOutbound
from mediator.core.errors import ConfigError
from mediator.core.seams import AdapterConfig, AdapterSpec, Built, Runtime

__all__ = [
    "ADAPTER",
    "MqttBrokerConfig",
    "MqttInbound",
    "MqttInboundConfig",
    "MqttOutbound",
    "MqttOutboundConfig",
    "build",
]


def broker_access(name: str, cfg: MqttBrokerConfig) -> BrokerAccess:
    """The broker config plus its password, read from the environment variable ``password_env`` names."""
    password: str | None = None
    if cfg.password_env is not None:
        password = os.environ.get(cfg.password_env)
        if password is None:
            raise ConfigError(
                "environment",
                [f"brokers.{name}.password_env: environment variable {cfg.password_env!r} is not set"],
            )
    return BrokerAccess(name=name, config=cfg, password=password)


def build(cfg: AdapterConfig, rt: Runtime) -> Built:
    problems: list[str] = []
    brokers: dict[str, BrokerAccess] = {}

    def access(section: str, broker: str) -> BrokerAccess | None:
        if broker not in brokers:
            model = cfg.brokers.get(broker)
            if not isinstance(model, MqttBrokerConfig):
                problems.append(f"{section}.broker: no MQTT broker named {broker!r} in [brokers]")
                return None
            brokers[broker] = broker_access(broker, model)
        return brokers[broker]

    built = Built()
    client_ids: dict[tuple[str, str], str] = {}

    def claim(section: str, broker: BrokerAccess, client_id: str) -> None:
        # Two connections with one client id would take the session from each other in a loop.
        key = (broker.name, client_id)
        if key in client_ids:
            problems.append(f"{section}: client id {client_id!r} is also used by {client_ids[key]}; rename one")
        client_ids[key] = section

    for name, inbound_cfg in cfg.inbounds.items():
        assert isinstance(inbound_cfg, MqttInboundConfig)
        broker = access(f"inbound.{name}", inbound_cfg.broker)
        if broker is not None:
            if inbound_cfg.request and not broker.v5:
                problems.append(
                    f"inbound.{name}.request: MQTT 3.1.1 (brokers.{broker.name}.protocol) has no Response Topic "
                    "or Correlation Data; request mode needs protocol = '5'"
                )
            inbound = MqttInbound(name, inbound_cfg, broker, rt)
            claim(f"inbound.{name}", broker, inbound.client_id)
            for i, session in enumerate(inbound_cfg.drain_sessions):  # each drained by its own connection
                claim(f"inbound.{name}.drain_sessions[{i}]", broker, session.client_id)
            built.services.append(inbound)
    for name, outbound_cfg in cfg.outbounds.items():
        assert isinstance(outbound_cfg, MqttOutboundConfig)
        broker = access(f"outbound.{name}", outbound_cfg.broker)
        if broker is not None:
            if outbound_cfg.requests and not broker.v5:
                problems.append(
                    f"outbound.{name}.requests: MQTT 3.1.1 (brokers.{broker.name}.protocol) has no Response Topic "
                    "or Correlation Data; request-reply needs protocol = '5'"
                )
            outbound = MqttOutbound(name, outbound_cfg, broker, rt.health, rt.replies)
            claim(f"outbound.{name}", broker, outbound.client_id)
            built.services.append(outbound.service)
            built.outbounds[name] = outbound
    if problems:
        raise ConfigError("config", problems)
    return built


ADAPTER = AdapterSpec(
    kind="mqtt",
    build=build,
    broker_model=MqttBrokerConfig,
    inbound_model=MqttInboundConfig,
    outbound_model=MqttOutboundConfig,
)
