"""Config models of the NATS adapter: ``[brokers.X]``, ``[inbound.X]`` and ``[outbound.X]`` with
``kind = "nats"``.

Streams: a JetStream inbound or outbound uses a stream that is either declared here
(``[[brokers.X.streams]]``: created, or updated to this config, each time a component of the broker
connects) or required to exist (named by ``stream`` but not declared: the inbound reports not ready,
saying so, until it exists; a JetStream publish to a subject no stream stores is a terminal failure).
Declared from config by choice for a gateway that owns its streams; required to exist where an operator
manages them (a stream's limits and replicas are an operator's decision, not one a gateway should
overwrite at every connect).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Literal

from pydantic import Field, field_validator, model_validator

from mediator.core.errors import ConfigError
from mediator.core.patterns import Template
from mediator.core.seams import BrokerTlsConfig, ConfigModel, InboundConfigBase, OutboundConfigBase, TemplateField

_SUBJECT_FORBIDDEN = frozenset(" \t\r\n")


def subject_problem(subject: str, *, wildcards: bool) -> str | None:
    """Why ``subject`` is not a NATS subject (a filter when ``wildcards``), or None."""
    if not subject:
        return "a subject must not be empty"
    if any(ch in _SUBJECT_FORBIDDEN for ch in subject):
        return f"{subject!r}: a subject has no whitespace"
    tokens = subject.split(".")
    for i, token in enumerate(tokens):
        if not token:
            return f"{subject!r}: empty token (two dots, or a dot at either end)"
        if not wildcards and ("*" in token or ">" in token):
            return f"{subject!r}: wildcards only in subscriptions, not in a subject published to"
        if wildcards:
            if token == ">" and i != len(tokens) - 1:
                return f"{subject!r}: '>' must be the last token"
            if token not in ("*", ">") and ("*" in token or ">" in token):
                return f"{subject!r}: a wildcard must be a whole token ('sensors.*.temperature', 'orders.>')"
    return None


def _check_subjects(value: tuple[str, ...]) -> tuple[str, ...]:
    for subject in value:
        problem = subject_problem(subject, wildcards=True)
        if problem is not None:
            raise ValueError(problem)
    return value


def _env(where: str, name: str | None, environ: Mapping[str, str]) -> str | None:
    if name is None:
        return None
    value = environ.get(name)
    if not value:
        raise ConfigError("environment", [f"{where}: environment variable {name!r} is not set or empty"])
    return value


class NatsStreamConfig(ConfigModel):
    """A JetStream stream the adapter declares (creates, or updates to this config) when it connects."""

    name: str = Field(min_length=1, pattern=r"^[^.*> \t]+$", description="stream name (no dots, wildcards or spaces)")
    subjects: tuple[str, ...] = Field(min_length=1, description="subjects the stream stores (wildcards allowed)")
    storage: Literal["file", "memory"] = "file"
    replicas: int = Field(default=1, ge=1, le=5)
    max_age_s: float = Field(default=0.0, ge=0, description="oldest message kept, seconds; 0: no limit")
    max_bytes: int = Field(default=-1, ge=-1, description="bytes kept; -1: no limit")
    duplicate_window_s: float = Field(
        default=120.0, gt=0, description="how long a Nats-Msg-Id (the event id) is remembered to drop a republish"
    )

    @field_validator("subjects")
    @classmethod
    def _subjects(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        return _check_subjects(value)


class NatsBrokerConfig(ConfigModel):
    """A NATS server (or cluster) we connect to. Each inbound and outbound opens its own connection,
    named ``<name> <inbound|outbound>:<section>`` (``nats server --connz`` shows it).

    Credentials, at most one way: ``credentials_file`` (a ``.creds`` file: user JWT and NKey seed),
    ``nkey_seed_env`` (an NKey seed), ``token_env``, or ``user`` with ``password_env``; secrets by the
    NAME of an environment variable, never inline. ``tls`` connects over TLS (with a client certificate
    when ``tls.cert_file`` is set); a ``tls://`` server URL needs it.
    """

    kind: Literal["nats"] = "nats"
    servers: tuple[str, ...] = Field(
        default=("nats://127.0.0.1:4222",), min_length=1, description="nats:// or tls:// URLs of the cluster's servers"
    )
    name: str = Field(default="mediator", min_length=1, description="connection name prefix (shown by the server)")
    credentials_file: str | None = Field(default=None, min_length=1, description=".creds file (JWT + NKey seed)")
    nkey_seed_env: str | None = Field(default=None, min_length=1, description="variable holding an NKey seed")
    token_env: str | None = Field(default=None, min_length=1, description="variable holding a token")
    user: str | None = Field(default=None, min_length=1)
    password_env: str | None = Field(default=None, min_length=1, description="variable holding user's password")
    tls: BrokerTlsConfig | None = None
    connect_timeout_s: float = Field(default=5.0, gt=0)
    reconnect_wait_s: float = Field(default=1.0, gt=0, description="pause between reconnection attempts")
    max_reconnect_attempts: int = Field(
        default=-1, ge=-1, description="attempts per outage before the connection is rebuilt from scratch; -1: forever"
    )
    ping_interval_s: float = Field(default=20.0, gt=0)
    max_outstanding_pings: int = Field(default=3, ge=1)
    streams: tuple[NatsStreamConfig, ...] = Field(default=(), description="JetStream streams declared at connect")

    @field_validator("servers")
    @classmethod
    def _servers(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for url in value:
            if not url.startswith(("nats://", "tls://")):
                raise ValueError(f"{url!r}: a server URL starts with nats:// or tls://")
            if "@" in url:
                raise ValueError(
                    f"credentials go in user/password_env/token_env, not in the URL ({url.split('@')[-1]})"
                )
        return value

    @model_validator(mode="after")
    def _auth(self) -> NatsBrokerConfig:
        ways = [
            name
            for name, given in (
                ("credentials_file", self.credentials_file),
                ("nkey_seed_env", self.nkey_seed_env),
                ("token_env", self.token_env),
                ("user", self.user),
            )
            if given is not None
        ]
        if len(ways) > 1:
            raise ValueError(f"one way to authenticate, not {' and '.join(ways)}")
        if (self.user is None) != (self.password_env is None):
            raise ValueError("user and password_env go together")
        if self.tls is None and any(url.startswith("tls://") for url in self.servers):
            raise ValueError("a tls:// server needs [brokers.X.tls] (its ca_file, or {} for the system's trust store)")
        names = [s.name for s in self.streams]
        if len(set(names)) != len(names):
            raise ValueError("two streams with one name")
        return self

    def secrets(self, broker: str, environ: Mapping[str, str] | None = None) -> dict[str, str]:
        """The connect options read from the environment (password, token, NKey seed); raises ConfigError
        naming the key whose variable is unset."""
        env = os.environ if environ is None else environ
        out: dict[str, str] = {}
        for key, option in (("password_env", "password"), ("token_env", "token"), ("nkey_seed_env", "nkeys_seed_str")):
            value = _env(f"brokers.{broker}.{key}", getattr(self, key), env)
            if value is not None:
                out[option] = value
        return out

    def stream(self, name: str) -> NatsStreamConfig | None:
        return next((s for s in self.streams if s.name == name), None)


class NatsInboundConfig(InboundConfigBase):
    """Subscribe to ``subjects``; the subject is the event's topic (tokens separated by ``.``).

    Core NATS (``jetstream = false``): at most once, as NATS is (nothing is acknowledged, so a message
    that arrives while we cannot commit is lost to us); ``queue_group`` makes several daemons (or
    workers) competing consumers. JetStream (``jetstream = true``): a durable pull consumer on ``stream``
    filtered by ``subjects``, explicit ack only after the outbox commit, at most ``max_ack_pending``
    unacknowledged (no more than ``[outbox] max_pending``), ``nak`` with a delay when the outbox cannot
    take it, ``term`` and a dead letter for a message that cannot be decoded or that a stage refused,
    or that was delivered ``dead_letter_after`` times.

    ``decode`` as for AMQP: ``auto`` reads ``application/cloudevents+json``/``+protobuf`` bodies as
    structured events, ``ce-`` headers as a binary-mode event, anything else as raw data named by ``type``
    and ``source``.
    """

    kind: Literal["nats"]
    broker: str = Field(min_length=1)
    subjects: tuple[str, ...] = Field(min_length=1, description="subjects or filters ('sensors.*.temperature', '>')")
    queue_group: str | None = Field(default=None, min_length=1, description="core NATS: competing consumers")
    jetstream: bool = False
    stream: str | None = Field(default=None, min_length=1, description="JetStream: the stream to consume")
    durable: str | None = Field(
        default=None, min_length=1, pattern=r"^[^.*> \t]+$", description="JetStream: consumer name (mediator-<inbound>)"
    )
    max_ack_pending: int = Field(default=256, ge=1, le=65535, description="JetStream: unacknowledged at most")
    ack_wait_s: float = Field(default=30.0, gt=0, description="JetStream: redelivered when not acked within it")
    nak_delay_max_s: float = Field(
        default=5.0, ge=0, description="JetStream: longest delay of a nak when the outbox cannot take a message now"
    )
    dead_letter_after: int = Field(
        default=20, ge=1, description="JetStream: deliveries after which a message is dead-lettered (and termed)"
    )
    type: TemplateField = Template.compile("io.mediator.nats.message")
    source: TemplateField = Template.compile("nats://{inbound}")
    decode: Literal["auto", "raw", "structured"] = "auto"
    request: bool = Field(
        default=False,
        description="request-reply (core NATS): each message with a reply subject is a request, answered there "
        "with the consumer's reply; nothing is committed",
    )
    request_timeout_s: float = Field(default=5.0, gt=0, le=300, description="request mode: the wait for a reply")
    max_in_flight: int = Field(default=256, ge=1, le=65536, description="request mode: requests at once")

    @field_validator("subjects")
    @classmethod
    def _subjects(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        return _check_subjects(value)

    @model_validator(mode="after")
    def _modes(self) -> NatsInboundConfig:
        if self.jetstream and self.stream is None:
            raise ValueError("jetstream = true needs stream (the stream to consume)")
        if not self.jetstream and self.stream is not None:
            raise ValueError("stream is for jetstream = true")
        if self.jetstream and self.queue_group is not None:
            raise ValueError("queue_group is core NATS: JetStream consumers share a durable consumer instead")
        if self.jetstream and self.request:
            raise ValueError("request mode is core NATS (a request is never stored): set jetstream = false")
        return self

    def connection(self) -> str | None:
        return self.broker

    @property
    def request_mode(self) -> bool:
        return self.request

    def durable_name(self, inbound: str) -> str:
        return self.durable or "mediator-" + "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in inbound)


class NatsOutboundConfig(OutboundConfigBase):
    """Publish to the route's address as subject.

    Core NATS: a send is confirmed when the server has it (a PING after it answered); core NATS drops a
    message no one subscribes to, so that is all it can confirm. JetStream (``jetstream = true``): a
    send is confirmed by the stream's ack (stored), with ``Nats-Msg-Id`` = the event id so a republish
    after a lost ack is dropped by the stream's duplicate window; a subject no stream stores is a
    terminal failure (unroutable). ``requests = true`` (core NATS) carries request-reply: replies come
    to an inbox subject of this connection.
    """

    kind: Literal["nats"]
    broker: str = Field(min_length=1)
    jetstream: bool = False
    stream: str | None = Field(
        default=None, min_length=1, description="JetStream: the stream that must store it (Nats-Expected-Stream)"
    )
    format: Literal["binary", "structured", "protobuf"] = "binary"
    requests: bool = Field(default=False, description="carry request-reply (core NATS reply subjects)")

    @model_validator(mode="after")
    def _modes(self) -> NatsOutboundConfig:
        if self.stream is not None and not self.jetstream:
            raise ValueError("stream is for jetstream = true")
        if self.requests and self.jetstream:
            raise ValueError("requests are core NATS (never stored): a separate outbound with jetstream = false")
        return self

    def connection(self) -> str | None:
        return self.broker

    def request_refusal(self) -> str | None:
        if not self.requests:
            return "it has requests = false (set requests = true: it then subscribes to a reply inbox)"
        return None
