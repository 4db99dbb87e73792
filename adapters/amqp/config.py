"""Config models of the AMQP 0-9-1 adapter: ``[brokers.X]``, ``[inbound.X]`` and ``[outbound.X]`` with
``kind = "amqp"``."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Literal

from pydantic import Field, field_validator, model_validator

from mediator.core.errors import ConfigError
from mediator.core.patterns import Template
from mediator.core.seams import BrokerTlsConfig, ConfigModel, InboundConfigBase, OutboundConfigBase, TemplateField

HEADER_PREFIXES = ("cloudEvents_", "cloudEvents:", "ce-", "ce_")
"""Attribute header prefixes: the CloudEvents AMQP binding writes ``cloudEvents_`` (``cloudEvents:`` in its
older drafts), the RabbitMQ binding of the CloudEvents SDKs ``ce-``; ``ce_`` is common in the wild."""

HeaderPrefix = Literal["cloudEvents_", "cloudEvents:", "ce-", "ce_"]
ExchangeType = Literal["topic", "direct", "fanout", "headers"]

# aiormq's own TLS settings in the URL's query. We always hand aiormq a context of our own (built once
# per broker, from ``tls``), which makes it ignore these: refused rather than silently dropped.
URL_TLS_PARAMETERS = ("cafile", "capath", "cadata", "certfile", "keyfile", "no_verify_ssl")


class AmqpBrokerConfig(ConfigModel):
    """A RabbitMQ (AMQP 0-9-1) broker we connect to. Each inbound and outbound opens its own connection
    (RabbitMQ's advice: a publisher blocked by flow control must not stall consumers).

    An ``amqps://`` URL connects over TLS (port 5671 unless the URL names one), verifying the broker's
    certificate against ``tls.ca_file`` (without ``tls``: the system's trust store) and the name
    ``tls.server_hostname`` (else the URL's host); ``tls.cert_file``/``key_file`` are presented when the
    broker asks for a client certificate. ``tls`` on an ``amqp://`` URL is refused: it would not be used.
    """

    kind: Literal["amqp"] = "amqp"
    url: str = "amqp://guest:guest@127.0.0.1:5672/"
    # The NAME of an environment variable whose value replaces ``url`` (secrets never inline).
    url_env: str | None = Field(default=None, min_length=1)
    heartbeat_s: int = Field(default=30, ge=0, le=65535)
    connect_timeout_s: float = Field(default=5.0, gt=0)
    reconnect_initial_s: float = Field(default=0.5, gt=0)
    reconnect_max_s: float = Field(default=30.0, gt=0)
    tls: BrokerTlsConfig | None = None

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        _check_url(value)
        return value

    @model_validator(mode="after")
    def _backoff(self) -> AmqpBrokerConfig:
        if self.reconnect_max_s < self.reconnect_initial_s:
            raise ValueError("reconnect_max_s must be >= reconnect_initial_s")
        return self

    @model_validator(mode="after")
    def _tls_scheme(self) -> AmqpBrokerConfig:
        if self.url_env is None:  # else checked when the variable is read (``resolved_url``)
            problem = _tls_problem(self.url, self.tls)
            if problem is not None:
                raise ValueError(problem)
        return self

    def resolved_url(self, name: str, environ: Mapping[str, str] | None = None) -> str:
        """The URL to connect to: ``$url_env`` when configured (it must be set), else ``url``."""
        if self.url_env is None:
            return self.url
        env = os.environ if environ is None else environ
        value = env.get(self.url_env)
        if not value:
            raise ConfigError(
                "environment",
                [f"brokers.{name}.url_env: environment variable {self.url_env!r} is not set or empty"],
            )
        try:
            _check_url(value)
        except ValueError as exc:
            raise ConfigError("environment", [f"brokers.{name}.url_env ({self.url_env}): {exc}"]) from None
        problem = _tls_problem(value, self.tls)
        if problem is not None:
            raise ConfigError("environment", [f"brokers.{name}.url_env ({self.url_env}): {problem}"])
        return value


def _check_url(value: str) -> None:
    if not value.startswith(("amqp://", "amqps://")):
        raise ValueError("url must start with amqp:// or amqps://")
    query = value.partition("?")[2]
    given = {part.partition("=")[0] for part in query.split("&") if part}
    in_url = [name for name in URL_TLS_PARAMETERS if name in given]
    if in_url:
        raise ValueError(f"TLS settings go in [brokers.X.tls], not in the URL ({', '.join(in_url)})")


def _tls_problem(url: str, tls: BrokerTlsConfig | None) -> str | None:
    if tls is not None and not url.startswith("amqps://"):
        return "tls is set but the url is amqp:// (plain TCP): use amqps:// to connect over TLS"
    return None


class AmqpBindingConfig(ConfigModel):
    """Bind the inbound queue to ``exchange`` (declared durable, of ``exchange_type``) with ``routing_key``."""

    exchange: str = Field(min_length=1)  # the default exchange cannot be bound
    routing_key: str = "#"
    exchange_type: ExchangeType = "topic"


class AmqpInboundConfig(InboundConfigBase):
    """Consume one queue. The routing key is the event's topic (segments separated by ``.``).

    ``decode = "auto"``: ``application/cloudevents+json`` / ``+protobuf`` bodies are structured events,
    messages whose headers carry ``specversion`` under a known prefix are binary-mode events, anything else
    is raw data named by the ``type`` and ``source`` templates. ``"raw"``: always raw. ``"structured"``:
    CloudEvents only (structured by content type or binary by headers, else the body must be CloudEvents
    JSON); anything else is dead-lettered.
    """

    kind: Literal["amqp"]
    broker: str = Field(min_length=1)
    queue: str = Field(min_length=1)
    durable: bool = True
    queue_type: Literal["classic", "quorum"] = "classic"
    bindings: tuple[AmqpBindingConfig, ...] = ()
    # Deliveries RabbitMQ may send us unacknowledged (basic.qos); never more than [outbox] max_pending
    # (the daemon asks for the smaller of the two).
    prefetch: int = Field(default=256, ge=1, le=65535)
    type: TemplateField = Template.compile("io.mediator.amqp.message")
    source: TemplateField = Template.compile("amqp://{inbound}")
    decode: Literal["auto", "raw", "structured"] = "auto"

    @model_validator(mode="after")
    def _quorum(self) -> AmqpInboundConfig:
        if self.queue_type == "quorum" and not self.durable:
            raise ValueError("quorum queues are always durable: set durable = true or queue_type = 'classic'")
        return self

    def connection(self) -> str | None:
        return self.broker


class AmqpOutboundConfig(OutboundConfigBase):
    """Publish to ``exchange`` with the route's address as routing key, with publisher confirms and
    mandatory routing (an unroutable message is a terminal failure). ``exchange = ""`` is the default
    exchange (the address is then a queue name); it is never declared."""

    kind: Literal["amqp"]
    broker: str = Field(min_length=1)
    exchange: str
    exchange_type: ExchangeType = "topic"
    durable: bool = True
    declare: bool = True
    persistent: bool = True
    header_prefix: HeaderPrefix = "cloudEvents_"
    # The format of destinations that name none; ``send`` uses the one it is given.
    format: Literal["binary", "structured", "protobuf"] = "binary"
    queues: tuple[str, ...] = Field(
        default=(),
        description="queues declared (durable) at connect, for destinations over the default exchange "
        "(exchange = '', the address a queue name) such as a request-reply consumer's queue",
    )

    @field_validator("queues")
    @classmethod
    def _queues(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for queue in value:
            if not queue or queue.startswith("amq.") or len(queue.encode("utf-8")) > 255:
                raise ValueError(f"{queue!r} is not a queue name we may declare (1-255 bytes, not amq.*)")
        return value

    def connection(self) -> str | None:
        return self.broker

    def request_refusal(self) -> str | None:
        return None  # direct reply-to
