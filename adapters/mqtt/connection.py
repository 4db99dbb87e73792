"""What the inbound and the outbound share: building an aiomqtt client (over TLS when the broker has
``tls``) and the reconnect backoff."""

from __future__ import annotations

import asyncio
import contextlib
import random
import select
import socket
import ssl
import threading
from collections import deque
from collections.abc import Callable
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
    read_ahead: int | None = None,
) -> aiomqtt.Client:
    """An unconnected client (must be created inside the running loop).

    ``persistent``: keep the session (subscriptions and unacknowledged messages) across disconnects:
    MQTT 5 ``clean_start=False`` with a Session Expiry Interval, MQTT 3.1.1 ``clean_session=False``.
    ``receive_maximum`` (MQTT 5) caps the QoS 1/2 messages the broker sends us unacknowledged;
    ``max_inflight`` caps our own unacknowledged publishes (paho's default is 20).
    ``read_ahead``: how many bytes may be read off the socket ahead of paho's parsing (see
    ``_BufferedSocket``); by default one read's worth. A connection that reads further ahead than that
    (the inbound's) is read by a thread of its own when it is plain TCP (``_BufferedSocket.start_reading``).
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
        socket_options=((socket.IPPROTO_TCP, socket.TCP_NODELAY, 1), *_receive_buffer(read_ahead)),
    )
    _buffer_reads(client, READ_SIZE if read_ahead is None else read_ahead, reader_thread=_reads_ahead(read_ahead))
    return client


READ_SIZE = 65536
THREAD_READ_SIZE = 1024 * 1024
"""What the reader thread asks for per read: each read waits for the GIL (up to the 5 ms switch interval
while the loop runs Python), so it takes what has arrived in one piece."""


RECEIVE_BUFFER_BYTES = 4 * 1024 * 1024
"""The kernel's receive buffer asked for a connection that reads ahead (Linux caps it at
``net.core.rmem_max``, 4 MiB by default, and doubles it for its own bookkeeping): what a burst waits in
while the loop is busy elsewhere. Autotuning grows a buffer only as fast as its reader reads, which is
exactly what a busy daemon does not do. Measured (tests/burst, a Mosquitto with Debian's limits, 20,000
1 KiB messages at 22,000-47,000 msgs/s): without it, 2 runs of 3 lost nothing; with it, 6 of 7. Still,
what the kernel holds for a connection that is not read stays small: with the loop stalled for 600 ms in a
burst, the receive queue held 0.6-1.9 MB and Mosquitto's send queue 4 MiB (``net.ipv4.tcp_wmem``'s cap),
about 200 ms of that burst, before Mosquitto's own 1000 packets. Hence the reader thread
(``_BufferedSocket.start_reading``); for a TLS connection, read on the loop, this is all there is."""


def _reads_ahead(read_ahead: int | None) -> bool:
    return read_ahead is not None and read_ahead > READ_SIZE


def _receive_buffer(read_ahead: int | None) -> tuple[tuple[int, int, int], ...]:
    if read_ahead is None or not _reads_ahead(read_ahead):
        return ()
    return ((socket.SOL_SOCKET, socket.SO_RCVBUF, min(read_ahead, RECEIVE_BUFFER_BYTES)),)


class _BufferedSocket:
    """paho's socket, drained ahead of paho's parsing instead of read in paho's pieces.

    paho reads each packet with three or four ``recv`` calls (the type byte, each byte of the length,
    the rest) and one packet per readable event, so a stream of 1 KiB PUBLISHes cost four system calls
    and one event-loop turn each. Here every read takes what the socket holds (``fill``: 64 KiB reads
    until it would block, up to ``limit`` bytes buffered) and paho's small reads are served from that.
    Measured on a lone QoS 1 subscriber (MQTT 5, 1 KiB): 101-135 -> 73 us of CPU per message.

    Draining matters more than the system calls: Mosquitto drops, silently, any packet it would queue for
    a connection that already has ``max_queued_messages`` packets (1000 by default) waiting to be written
    (``packet__queue`` in its lib/packet_mosq.c), PUBLISHes in flight included. So a subscriber that
    parses more slowly than a burst arrives loses messages however large its Receive Maximum, unless it
    takes the bytes off the socket first: what was read waits here, bounded by the Receive Maximum (the
    broker sends no more unacknowledged PUBLISHes) and by ``limit``.

    Read on the loop, the socket is drained once per loop turn, and a busy daemon's turn is long: during
    a burst into the outbox, turns of 100-400 ms were measured (many ready tasks, each a little work),
    and at 20,000 msgs/s that is more than the kernel buffer and Mosquitto's 1000 packets hold together.
    ``start_reading`` drains it from a thread instead (plain TCP only, see ``_Reader``): it waits in
    ``poll`` with the GIL released and needs the GIL only to append what it read, so it keeps reading
    whatever the loop is doing. The deque is the hand-over: the thread only appends and counts
    ``_received``, the loop only pops and counts ``_served`` (each counter has a single writer). Measured
    (the tests/burst burst, the daemon's loop held busy in Python for 600 ms 0.3 s into it): lost 2,153 and
    7,291 in 2 runs of 3 read on the loop, 0 in 3 of 3 with the thread; held 1,500 ms with a CPU hog beside
    it, 10,434 and 12,798 lost in 2 of 2 against 0 in 4 of 4.

    ``failure`` keeps the error a read failed with (paho logs it and reports only "connection lost").
    """

    __slots__ = (
        "_buf",
        "_chunks",
        "_closing",
        "_ended",
        "_lock",
        "_pos",
        "_received",
        "_room",
        "_served",
        "_sock",
        "_thread",
        "_want_write",
        "failure",
        "limit",
    )

    def __init__(self, sock: Any, limit: int = READ_SIZE) -> None:
        self._sock: Any = sock
        self._buf: bytes = b""
        self._pos = 0
        self._chunks: deque[bytes] = deque()
        self._ended = False  # the peer closed (b"") or a read failed: served once the buffer is empty
        self._want_write = False
        self._received = 0  # bytes read off the socket (by ``fill`` or the reader thread)
        self._served = 0  # bytes handed to paho
        self.limit = limit
        self.failure: OSError | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()  # who closes the socket: ``close`` or the exiting thread
        self._closing = False
        self._room = threading.Event()  # set by the loop when it takes a chunk, and by ``close``

    @property
    def buffered(self) -> int:
        """Bytes read and not yet handed to paho."""
        return self._received - self._served

    def fill(self) -> None:
        """Read what the socket holds, without blocking, until ``limit`` bytes are buffered (a no-op
        once the reader thread does the reading)."""
        if self._thread is not None:
            return
        while self.buffered < self.limit and not self._ended:
            try:
                data: bytes = self._sock.recv(READ_SIZE)
            except (BlockingIOError, ssl.SSLWantReadError):
                return
            except ssl.SSLWantWriteError:
                self._want_write = True
                return
            except OSError as exc:
                self.failure = exc
                self._ended = True
                return
            if not data:
                self._ended = True
                return
            self._chunks.append(data)
            self._received += len(data)

    def start_reading(self, wake: Callable[[], None], name: str) -> None:
        """Drain the socket from a thread from now on, calling ``wake`` (on that thread) after each read.

        The thread ends when the peer closes the connection, when a read fails (``failure``), or on
        ``close``; it never touches the loop itself. Only for a plain socket: an ``SSLSocket`` must not be
        read on one thread while paho writes to it on another."""
        self._thread = threading.Thread(target=self._read_forever, args=(wake,), name=name, daemon=True)
        self._thread.start()

    def _read_forever(self, wake: Callable[[], None]) -> None:
        sock = self._sock
        poller = select.poll()
        poller.register(sock.fileno(), select.POLLIN)
        try:
            while not self._closing:
                while self.buffered >= self.limit and not self._closing:
                    self._room.clear()
                    if self.buffered >= self.limit and not self._closing:
                        self._room.wait()
                if self._closing:
                    return
                poller.poll()  # woken by data, by the peer's close, or by ``close``'s shutdown
                try:
                    data: bytes = sock.recv(THREAD_READ_SIZE)
                except BlockingIOError:
                    continue
                except OSError as exc:
                    self.failure = exc
                    data = b""
                if data:
                    self._chunks.append(data)
                    self._received += len(data)
                else:
                    self._ended = True  # after the last append: ``recv`` relies on that order
                if not self._closing:
                    wake()
                if self._ended:
                    return
        finally:
            with self._lock:
                self._thread = None
                if self._closing:
                    sock.close()

    def recv(self, buffer_size: int) -> bytes:
        buf, pos = self._buf, self._pos
        if pos >= len(buf):
            if not self._chunks:
                self.fill()
            ended = self._ended  # read before the deque: the reader thread appends, then sets it
            if not self._chunks:
                if self.failure is not None:
                    raise self.failure
                if ended:
                    return b""
                if self._want_write:  # paho registers for writing on this one (a TLS renegotiation)
                    self._want_write = False
                    raise ssl.SSLWantWriteError()
                raise BlockingIOError()
            buf, pos = self._chunks.popleft(), 0
            self._buf = buf
            if self._thread is not None:
                self._room.set()
        out = buf[pos : pos + buffer_size]
        self._pos = pos + len(out)
        self._served += len(out)
        return out

    def pending(self) -> int:
        inner = getattr(self._sock, "pending", None)  # a TLS socket's own decrypted bytes
        return self.buffered + (inner() if inner is not None else 0)

    def send(self, buffer: bytes | bytearray) -> int:
        sent: int = self._sock.send(buffer)
        return sent

    def fileno(self) -> int:
        fd: int = self._sock.fileno()
        return fd

    def close(self) -> None:
        """Close now, or, while the reader thread runs, shut the connection down (which wakes its
        ``poll``) and leave the closing to the thread: closing a descriptor another thread polls could
        let it read from whatever opens the same number next."""
        with self._lock:
            self._closing = True
            if self._thread is None:
                self._sock.close()
                return
            self._room.set()
            with contextlib.suppress(OSError):  # not connected any more: the thread's poll has returned or will
                self._sock.shutdown(socket.SHUT_RDWR)

    def setblocking(self, flag: bool) -> None:
        self._sock.setblocking(flag)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)


PARSE_BUDGET = 256
"""Packets paho parses per event-loop turn; what is left waits for the next turn (after the commits and
acknowledgements that are ready), while the socket goes on being drained."""


def _buffer_reads(client: aiomqtt.Client, read_ahead: int, *, reader_thread: bool) -> None:
    """Swap paho's socket for a ``_BufferedSocket`` as the connection opens (before aiomqtt sees it), and
    aiomqtt's reader for ``_Reader`` (up to ``read_ahead`` bytes read ahead of paho; with
    ``reader_thread``, read by a thread unless the connection is TLS).

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
        wrapped = _BufferedSocket(sock, read_ahead)
        current[:] = [wrapped]
        opening._sock = wrapped
        if opened is not None:
            opened(opening, userdata, wrapped)
        # Called on the thread that connects, after aiomqtt asked the loop (in order) to add its reader:
        # this one replaces it for the same descriptor.
        loop = client._loop
        threaded = reader_thread and not isinstance(sock, ssl.SSLSocket)
        loop.call_soon_threadsafe(_Reader(client, wrapped, threaded).install)

    def on_disconnect(closing: paho.Client, userdata: Any, *args: Any) -> None:
        failure = current[0].failure if current else None
        connecting: asyncio.Future[None] = client._connected
        if failure is not None and not connecting.done():
            connecting.set_exception(aiomqtt.MqttError(f"connection lost before CONNACK: {failure}"))
        if disconnected is not None:
            disconnected(closing, userdata, *args)

    inner.on_socket_open = on_socket_open
    inner.on_disconnect = on_disconnect


class _Reader:
    """The socket's reader callback: drain the socket, then let paho parse at most ``PARSE_BUDGET``
    packets; if more is buffered, go on in the next loop turn (draining again first).

    aiomqtt's own reader parses everything buffered in one callback: with the socket drained ahead, that
    would be seconds of a burst in one turn, with no commit, acknowledgement or read in between.

    ``threaded``: the socket is drained by its own thread (``_BufferedSocket.start_reading``), which calls
    ``wake`` after each read; ``wake`` schedules ``step`` on the loop unless it is scheduled already. Only
    for plain TCP: an ``SSLSocket`` is not safe to read on one thread while paho writes on another (a
    TLS connection keeps being read on the loop)."""

    __slots__ = ("_client", "_loop", "_paho", "_scheduled", "_sock", "_threaded", "_woken")

    def __init__(self, client: aiomqtt.Client, sock: _BufferedSocket, threaded: bool) -> None:
        self._client = client
        self._paho = paho_client(client)
        self._sock = sock
        self._loop: asyncio.AbstractEventLoop = client._loop
        self._scheduled = False
        self._threaded = threaded
        self._woken = False  # a ``woken`` call is on its way to the loop (set by the thread, cleared by it)

    def install(self) -> None:
        if self._paho._sock is not self._sock:  # closed in the meantime
            return
        fd = self._sock.fileno()
        if not self._threaded:
            self._loop.add_reader(fd, self.step)
            return
        self._loop.remove_reader(fd)  # aiomqtt's
        name = f"mqtt-reader:{self._paho._client_id.decode(errors='replace')}"
        self._sock.start_reading(self.wake, name)

    def wake(self) -> None:
        """On the reader thread: more was read."""
        if not self._woken:
            self._woken = True
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is left to read for
                self._loop.call_soon_threadsafe(self.woken)

    def woken(self) -> None:
        self._woken = False  # first: what the thread reads from now on schedules another call
        self.step()

    def resume(self) -> None:
        self._scheduled = False
        self.step()

    def step(self) -> None:
        sock, mqtt = self._sock, self._paho
        try:
            sock.fill()
            for _ in range(PARSE_BUDGET):
                if mqtt._sock is not sock or mqtt.loop_read() != paho.MQTT_ERR_SUCCESS:
                    return  # closed: paho has told aiomqtt
                if not sock.pending():
                    return
            if not self._scheduled:
                self._scheduled = True
                self._loop.call_soon(self.resume)
        except Exception as exc:  # as aiomqtt's reader: a failed read means the connection is gone
            disconnected: asyncio.Future[None] = self._client._disconnected
            if not disconnected.done():
                disconnected.set_exception(exc)


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

    def __init__(
        self,
        content_type: str | None,
        user_properties: tuple[tuple[str, str], ...],
        *,
        expiry_s: int | None = None,
        response_topic: str | None = None,
        correlation_data: bytes | None = None,
    ) -> None:
        body = bytearray()
        if expiry_s is not None:  # Message Expiry Interval (0x02), a four-byte integer of seconds
            body += b"\x02" + expiry_s.to_bytes(4, "big")
        if content_type is not None:
            body += b"\x03" + _utf8(content_type)
        if response_topic is not None:  # Response Topic (0x08) and Correlation Data (0x09): request-reply
            body += b"\x08" + _utf8(response_topic)
        if correlation_data is not None:
            if len(correlation_data) > 0xFFFF:
                raise ValueError("correlation data is limited to 65535 bytes")
            body += b"\x09" + len(correlation_data).to_bytes(2, "big") + correlation_data
        for name, value in user_properties:
            body += b"\x26" + _utf8(name) + _utf8(value)
        self._packed = _varint(len(body)) + bytes(body)

    def pack(self) -> bytes:
        return self._packed


def stop_if_cancelled() -> None:
    """Raise CancelledError when the current task was asked to stop. aiomqtt turns a cancellation that
    lands inside its connect or its message iterator into an ``MqttError`` ("Disconnected during message
    iteration"), or lets its connect complete as if nothing happened, which a reconnect loop would take for
    a broker outage (or a connection) and go on forever: a daemon whose listener failed to bind at start-up
    kept its MQTT clients running instead of exiting (tests/e2e/test_bind_failure.py). Called once the
    connect returned and where such a loop catches MqttError."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


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
