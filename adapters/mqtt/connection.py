"""What the inbound and the outbound share: building an aiomqtt client (over TLS when the broker has
``tls``) and the reconnect backoff."""

from __future__ import annotations

import asyncio
import random
import socket
import ssl
from dataclasses import dataclass, field
from typing import Any

import aiomqtt
import paho.mqtt.client as paho
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from adapters.mqtt import speedups
from adapters.mqtt.config import MqttBrokerConfig
from mediator.core.tls import client_context


@dataclass(frozen=True, slots=True)
class BrokerAccess:
    """A broker's config plus what is read at build time: the secret from the environment and, with
    ``tls``, the TLS context (its CA and client certificate files read once here, not per reconnect).

    Raises ConfigError (file ``environment``) when a TLS file cannot be read."""

    name: str
    config: MqttBrokerConfig
    password: str | None
    tls_context: ssl.SSLContext | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        if self.config.tls is not None:
            object.__setattr__(self, "tls_context", client_context(f"brokers.{self.name}.tls", self.config.tls))

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
    queue_type: type[asyncio.Queue[aiomqtt.Message]] | None = None,
) -> aiomqtt.Client:
    """An unconnected client (must be created inside the running loop).

    ``persistent``: keep the session (subscriptions and unacknowledged messages) across disconnects:
    MQTT 5 ``clean_start=False`` with a Session Expiry Interval, MQTT 3.1.1 ``clean_session=False``.
    ``receive_maximum`` (MQTT 5) caps the QoS 1/2 messages the broker sends us unacknowledged;
    ``max_inflight`` caps our own unacknowledged publishes (paho's default is 20).
    """
    speedups.install()
    cfg = access.config
    props: Properties | None = None
    if access.v5:
        props = properties(PacketTypes.CONNECT)
        props.ReceiveMaximum = receive_maximum
        if persistent:
            props.SessionExpiryInterval = cfg.session_expiry_s
    client = aiomqtt.Client(
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
        # check_hostname on the context (paho reads it: no tls_insecure of its own is needed).
        tls_context=access.tls_context,
        max_inflight_messages=max_inflight,
        queue_type=queue_type,
        # Acknowledgements and pipelined publishes are tiny packets: without TCP_NODELAY they stall on
        # Nagle plus the peer's delayed ACK.
        socket_options=((socket.IPPROTO_TCP, socket.TCP_NODELAY, 1),),
    )
    _buffer_reads(client)
    return client


class _BufferedSocket:
    """paho's socket, read 64 KiB at a time instead of in paho's reads of a packet's pieces.

    paho reads each packet with three or four ``recv`` calls (the type byte, each byte of the length,
    the rest) and reads one packet per readable event, so a stream of 1 KiB PUBLISHes cost four system
    calls and one event-loop turn each. aiomqtt's reader callback keeps calling ``loop_read`` while the
    socket reports ``pending()`` bytes (meant for TLS), so the packets of one large read are all handled
    in one turn. Measured on a lone QoS 1 subscriber (MQTT 5, 1 KiB): 101-135 -> 73 us of CPU per message.

    ``failure`` keeps the error a read failed with (paho logs it and reports only "connection lost").
    """

    __slots__ = ("_buf", "_pos", "_sock", "failure")

    def __init__(self, sock: Any) -> None:
        self._sock: Any = sock
        self._buf: bytes = b""
        self._pos = 0
        self.failure: OSError | None = None

    def recv(self, buffer_size: int) -> bytes:
        buf, pos = self._buf, self._pos
        if pos >= len(buf):
            try:
                buf = self._sock.recv(READ_SIZE)  # BlockingIOError and b"" (closed) reach paho as before
            except (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError):
                raise
            except OSError as exc:
                self.failure = exc
                raise
            if not buf:
                return b""
            self._buf, pos = buf, 0
        out = buf[pos : pos + buffer_size]
        self._pos = pos + len(out)
        return out

    def pending(self) -> int:
        inner = getattr(self._sock, "pending", None)  # a TLS socket's own decrypted bytes
        return len(self._buf) - self._pos + (inner() if inner is not None else 0)

    def send(self, buffer: bytes | bytearray) -> int:
        sent: int = self._sock.send(buffer)
        return sent

    def fileno(self) -> int:
        fd: int = self._sock.fileno()
        return fd

    def close(self) -> None:
        self._sock.close()

    def setblocking(self, flag: bool) -> None:
        self._sock.setblocking(flag)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)


READ_SIZE = 65536


def _buffer_reads(client: aiomqtt.Client) -> None:
    """Swap paho's socket for a ``_BufferedSocket`` as the connection opens (before aiomqtt sees it).

    A read that fails before the CONNACK fails the connect at once, with the reason. aiomqtt ignores a
    disconnect before CONNACK and waits out its whole timeout, then says "Operation timed out": that
    is how a TLS 1.3 broker refusing our client certificate looks, since it says so in an alert after
    the handshake has completed on our side (``tlsv13 alert certificate required``, ``unknown ca``).
    """
    inner = paho_client(client)
    opened = inner.on_socket_open
    disconnected = inner.on_disconnect
    current: list[_BufferedSocket] = []

    def on_socket_open(opening: paho.Client, userdata: Any, sock: Any) -> None:
        wrapped = _BufferedSocket(sock)
        current[:] = [wrapped]
        opening._sock = wrapped
        if opened is not None:
            opened(opening, userdata, wrapped)

    def on_disconnect(closing: paho.Client, userdata: Any, *args: Any) -> None:
        failure = current[0].failure if current else None
        connecting: asyncio.Future[None] = client._connected
        if failure is not None and not connecting.done():
            connecting.set_exception(aiomqtt.MqttError(f"connection lost before CONNACK: {failure}"))
        if disconnected is not None:
            disconnected(closing, userdata, *args)

    inner.on_socket_open = on_socket_open
    inner.on_disconnect = on_disconnect


def properties(packet_type: int) -> Properties:
    """An empty MQTT 5 property set for one packet type (paho's constructor is untyped)."""
    return Properties(packet_type)  # type: ignore[no-untyped-call]


def paho_client(client: aiomqtt.Client) -> paho.Client:
    """The paho client aiomqtt wraps: manual acknowledgement and confirmed publishing need it, since
    aiomqtt 2.x exposes neither (it acknowledges on receipt and ignores PUBACK reason codes)."""
    return client._client


def _utf8(value: str) -> bytes:
    raw = value.encode("utf-8")
    if len(raw) > 0xFFFF:
        raise ValueError("an MQTT string is limited to 65535 bytes")
    return len(raw).to_bytes(2, "big") + raw


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | 0x80 if value else byte)
        if not value:
            return bytes(out)


class PublishProperties:
    """MQTT 5 PUBLISH properties encoded once, here (MQTT 5 section 3.3.2.3).

    paho only ever calls ``pack()`` on the properties of an outgoing PUBLISH; its own ``Properties``
    class spends more time per message than the rest of the publish path together (name tables built
    per instance, per-attribute validation), which caps an outbound at about 2,000 messages/s.
    Raises ValueError for a string longer than MQTT allows.
    """

    __slots__ = ("_packed",)
    packetType = PacketTypes.PUBLISH

    def __init__(self, content_type: str | None, user_properties: tuple[tuple[str, str], ...]) -> None:
        body = bytearray()
        if content_type is not None:
            body += b"\x03" + _utf8(content_type)
        for name, value in user_properties:
            body += b"\x26" + _utf8(name) + _utf8(value)
        self._packed = _varint(len(body)) + bytes(body)

    def pack(self) -> bytes:
        return self._packed


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
