"""Config models of the MQTT adapter: ``[brokers.X]``, ``[inbound.X]`` and ``[outbound.X]`` with ``kind = "mqtt"``."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from mediator.core.patterns import Template
from mediator.core.seams import BrokerTlsConfig, ConfigModel, InboundConfigBase, OutboundConfigBase, TemplateField


def topic_filter_problem(text: str) -> str | None:
    """Why ``text`` is not a valid MQTT topic filter (MQTT 5 section 4.7, 4.8.2), or None."""
    if not text:
        return "a topic filter must not be empty"
    if "\x00" in text:
        return "a topic filter must not contain NUL"
    if len(text.encode("utf-8")) > 65535:
        return "a topic filter is limited to 65535 bytes"
    levels = text.split("/")
    if levels[0] == "$share":
        # $share/{ShareName}/{filter}: the share name is one level without wildcards.
        if len(levels) < 3 or not levels[1] or not levels[2:] or levels[2:] == [""]:
            return "a shared subscription is '$share/<group>/<filter>'"
        if "+" in levels[1] or "#" in levels[1]:
            return "the group of a shared subscription must not contain '+' or '#'"
        levels = levels[2:]
    for i, level in enumerate(levels):
        if "#" in level and (level != "#" or i != len(levels) - 1):
            return "'#' must be a whole level and the last one"
        if "+" in level and level != "+":
            return "'+' must be a whole level"
    return None


def publish_topic_problem(text: str) -> str | None:
    """Why ``text`` cannot be published to (MQTT 5 section 4.7.1), or None."""
    if not text:
        return "the topic is empty"
    if "+" in text or "#" in text:
        return "a publish topic must not contain the wildcards '+' or '#'"
    if "\x00" in text:
        return "the topic contains NUL"
    if len(text.encode("utf-8")) > 65535:
        return "the topic is longer than 65535 bytes"
    return None


class MqttBrokerConfig(ConfigModel):
    """An MQTT broker we connect to. Each inbound and outbound opens its own connection to it, with the
    client id ``<client_id>-<name>`` (fixed, so a persistent session survives a restart).

    ``tls`` (``[brokers.X.tls]``) connects over TLS (mqtts): the broker's certificate is verified against
    ``ca_file`` (else the system's trust store) and the name ``server_hostname`` (else ``host``), and
    ``cert_file``/``key_file`` are presented when the broker asks for a client certificate. ``port`` keeps
    its default of 1883: a TLS listener is usually 8883, so set it.
    """

    kind: Literal["mqtt"] = "mqtt"
    host: str = Field(default="127.0.0.1", min_length=1)
    port: int = Field(default=1883, ge=1, le=65535)
    protocol: Literal["5", "3.1.1"] = "5"
    client_id: str = Field(default="mediator", min_length=1, max_length=200)
    username: str | None = None
    # The NAME of the environment variable holding the password; secrets never sit in the file.
    password_env: str | None = Field(default=None, min_length=1)
    keepalive_s: int = Field(default=30, ge=1, le=65535)
    connect_timeout_s: float = Field(default=10.0, gt=0)
    reconnect_initial_s: float = Field(default=0.5, gt=0)
    reconnect_max_s: float = Field(default=30.0, gt=0)
    # MQTT 5: how long the broker keeps an inbound's session (subscriptions, unacknowledged messages)
    # after a disconnect. MQTT 3.1.1 sessions of a fixed client id never expire.
    session_expiry_s: int = Field(default=3600, ge=0, le=4294967295)
    tls: BrokerTlsConfig | None = None

    @field_validator("protocol", mode="before")
    @classmethod
    def _protocol(cls, value: object) -> object:
        # TOML writers may type `protocol = 5`; accept it rather than a puzzling literal error.
        if value == 5:
            return "5"
        return value


def _filters(value: list[str]) -> list[str]:
    for topic in value:
        problem = topic_filter_problem(topic)
        if problem is not None:
            raise ValueError(f"topic filter {topic!r}: {problem}")
    return value


class MqttDrainSessionConfig(ConfigModel):
    """A persistent session this inbound used under another client id (another ``workers`` count, a
    renamed ``client_id``): emptied into this inbound and deleted at start (see ``drain_sessions``)."""

    # The connection's client id as the broker knows it (an inbound's own is `<broker client_id>-<inbound>`).
    client_id: str = Field(min_length=1, max_length=200)
    # What that session subscribed to, unsubscribed first so that the broker hands it nothing new.
    topics: list[str] = Field(min_length=1)

    @field_validator("topics")
    @classmethod
    def _topics(cls, value: list[str]) -> list[str]:
        return _filters(value)


class MqttInboundConfig(InboundConfigBase):
    """A subscription on a broker; every message becomes one event (or a batch).

    ``decode``: ``auto`` reads a CloudEvent when the message says it is one (MQTT 5: a ``specversion``
    user property for binary mode, the Content Type ``application/cloudevents+json`` or
    ``application/cloudevents+protobuf`` for structured mode) and otherwise makes a new event from the raw
    payload, named by the ``type`` and ``source`` templates; ``raw`` always does the latter; ``structured``
    expects CloudEvents JSON in every payload (how MQTT 3.1.1 carries CloudEvents).

    ``qos = 2`` is accepted but the subscription is made at QoS 1: paho acknowledges a QoS 2 PUBLISH
    (PUBREC) before the application sees it and keeps that state in memory only, so QoS 2 would lose
    messages on a crash, while QoS 1 with the acknowledgement held until the outbox commit, plus the
    event id as deduplication key, is the gateway's at-least-once contract.
    """

    kind: Literal["mqtt"]
    broker: str = Field(min_length=1)
    topics: list[str] = Field(min_length=1)
    qos: Literal[0, 1, 2] = 1
    type: TemplateField = Template.compile("io.mediator.mqtt.message")
    source: TemplateField = Template.compile("mqtt://{inbound}")
    content_type: str | None = Field(default=None, min_length=1)
    decode: Literal["auto", "raw", "structured"] = "auto"
    max_in_flight: int = Field(default=256, ge=1, le=65535)
    # MQTT 5: the QoS 1 messages the broker may send us unacknowledged. It is what a burst can wait in
    # (read into memory, then committed at the outbox's pace) rather than in the broker's queue, which
    # drops past max_queued_messages: as large as the outbox takes. Never more than [outbox] max_pending
    # (the daemon asks for the smaller of the two).
    receive_maximum: int = Field(default=20000, ge=1, le=65535)
    # Subscribe (QoS 0) to the broker's $SYS/broker/version and $SYS/broker/publish/messages/dropped too, for
    # the start-up log and /readyz (never events). Off for a broker that disconnects on a refused subscription.
    sys_topics: bool = True
    # Sessions to empty and delete once this inbound has subscribed: each is connected with its client id
    # (keeping its session), unsubscribed from its topics, its queued messages taken in as this inbound's
    # (committed, then acknowledged), and once nothing came for a while it is deleted. The daemon sets
    # this itself when `workers` changed (the sessions of the other worker count: mediator/supervisor.py);
    # an operator can name others, e.g. after renaming a broker's client_id.
    drain_sessions: list[MqttDrainSessionConfig] = Field(default_factory=list)
    request: bool = Field(
        default=False,
        description="request-reply (MQTT 5): each message with a Response Topic is a request, answered on "
        "that topic (with its Correlation Data, if any) with the consumer's reply (mosquitto_rr works as the "
        "requester); acknowledged once taken: a request is acted on at most once",
    )
    request_timeout_s: float = Field(
        default=5.0, gt=0, le=300, description="request mode: how long a request waits for its reply"
    )

    @property
    def request_mode(self) -> bool:
        return self.request

    @field_validator("topics")
    @classmethod
    def _topics(cls, value: list[str]) -> list[str]:
        _filters(value)
        if len(set(value)) != len(value):
            raise ValueError("topics lists the same filter twice")
        return value

    def connection(self) -> str | None:
        return self.broker


class MqttOutboundConfig(OutboundConfigBase):
    """Publishes each event to the topic given by the route's address.

    ``format``: ``binary`` (MQTT 5: payload = data, Content Type = datacontenttype, every other attribute a
    user property; MQTT 3.1.1: the payload only, since 3.1.1 has no place for attributes), ``structured``
    (CloudEvents JSON) or ``protobuf`` (CloudEvents Protobuf). ``max_in_flight`` also sets how many QoS 1/2
    publishes the client keeps unacknowledged on the wire.
    """

    kind: Literal["mqtt"]
    broker: str = Field(min_length=1)
    qos: Literal[0, 1, 2] = 1
    retain: bool = False
    format: Literal["binary", "structured", "protobuf"] = "binary"
    max_in_flight: int = Field(default=256, ge=1, le=65535)
    requests: bool = Field(
        default=False,
        description="request-reply (MQTT 5 only): subscribe to the reply topic <reply_topic_prefix>/<client id> "
        "and carry requests with Response Topic, Correlation Data and Message Expiry Interval",
    )
    reply_topic_prefix: str = Field(
        default="mediator/replies", min_length=1, description="requests: where replies are addressed"
    )

    @field_validator("reply_topic_prefix")
    @classmethod
    def _reply_prefix(cls, value: str) -> str:
        problem = publish_topic_problem(value)
        if problem is not None or value.endswith("/"):
            raise ValueError(f"{value!r} is not a topic prefix: {problem or 'it ends with /'}")
        return value

    def connection(self) -> str | None:
        return self.broker

    def request_refusal(self) -> str | None:
        if not self.requests:
            return "it has requests = false (set requests = true: it then subscribes to its reply topic)"
        return None
