"""What the inbound and the outbound share: building an aiomqtt client and the reconnect backoff."""

from __future__ import annotations

import random
import socket
from dataclasses import dataclass

import aiomqtt
import paho.mqtt.client as paho
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from adapters.mqtt.config import MqttBrokerConfig


@dataclass(frozen=True, slots=True)
class BrokerAccess:
    """A broker's config plus the secret read from the environment at build time."""

    name: str
    config: MqttBrokerConfig
    password: str | None

    @property
    def v5(self) -> bool:
        return self.config.protocol == "5"


def make_client(
    access: BrokerAccess,
    client_id: str,
    *,
    persistent: bool,
    receive_maximum: int,
    max_inflight: int,
) -> aiomqtt.Client:
    """An unconnected client (must be created inside the running loop).

    ``persistent``: keep the session (subscriptions and unacknowledged messages) across disconnects:
    MQTT 5 ``clean_start=False`` with a Session Expiry Interval, MQTT 3.1.1 ``clean_session=False``.
    ``receive_maximum`` (MQTT 5) caps the QoS 1/2 messages the broker sends us unacknowledged;
    ``max_inflight`` caps our own unacknowledged publishes (paho's default is 20).
    """
    cfg = access.config
    props: Properties | None = None
    if access.v5:
        props = Properties(PacketTypes.CONNECT)
        props.ReceiveMaximum = receive_maximum
        if persistent:
            props.SessionExpiryInterval = cfg.session_expiry_s
    return aiomqtt.Client(
        cfg.host,
        cfg.port,
        username=cfg.username,
        password=access.password,
        identifier=client_id,
        protocol=aiomqtt.ProtocolVersion.V5 if access.v5 else aiomqtt.ProtocolVersion.V311,
        # paho refuses clean_session on MQTT 5 and clean_start on 3.1.1. The default clean_start
        # (FIRST_ONLY) would wipe the persistent session at every daemon start.
        clean_session=None if access.v5 else not persistent,
        clean_start=(not persistent) if access.v5 else paho.MQTT_CLEAN_START_FIRST_ONLY,
        keepalive=cfg.keepalive_s,
        timeout=cfg.connect_timeout_s,
        properties=props,
        max_inflight_messages=max_inflight,
        # Acknowledgements and pipelined publishes are tiny packets: without TCP_NODELAY they stall on
        # Nagle plus the peer's delayed ACK.
        socket_options=((socket.IPPROTO_TCP, socket.TCP_NODELAY, 1),),
    )


def paho_client(client: aiomqtt.Client) -> paho.Client:
    """The paho client aiomqtt wraps: manual acknowledgement and confirmed publishing need it, since
    aiomqtt 2.x exposes neither (it acknowledges on receipt and ignores PUBACK reason codes)."""
    return client._client


class Backoff:
    """Capped exponential backoff with jitter: each delay is drawn from [d/2, d], d doubling to the cap."""

    def __init__(self, initial_s: float, max_s: float) -> None:
        self._initial = initial_s
        self._max = max(max_s, initial_s)
        self._next = initial_s

    def reset(self) -> None:
        self._next = self._initial

    def next(self) -> float:
        current = self._next
        self._next = min(self._max, current * 2)
        return random.uniform(current / 2, current)
