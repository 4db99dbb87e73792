"""Two shortcuts on the AMQP publish path, each measured and each checked against the library's own way.

**Properties.** pamqp marshals a content header's properties generically: for each of the 14 properties a
type lookup by name, then the header table entry by entry through a type dispatch with a dozen
``isinstance`` checks per value. In the binary content mode every CloudEvents attribute is a string
header. ``FastProperties`` encodes short strings, octets and a table whose keys and values are all ``str``
directly, in the layout pamqp writes for them (a table sorted by key: short-string key, ``S``, long
string), and hands everything else to pamqp unchanged (other value types, over-long strings or keys,
which pamqp refuses or truncates). timeit, the properties of a binary-mode CloudEvent (7 headers): 16.9
-> 7.7 us per marshal. ``tests/adapters/test_amqp_speedups.py`` compares the bytes.

**Publish.** aiormq's ``Channel.basic_publish`` wraps every publish in a context manager that translates
a channel's closing, a timeout scope, the channel's publish lock, an awaited queue put and a done
callback, around what a confirmed publish needs: the next delivery tag, a confirmation future registered
where the channel's reader resolves it (and where closing the channel rejects it), the three frames on the
connection's write queue in tag order. ``publish`` does just that (when the body fits one frame and no
``basic_publish`` of ours is under way on the channel; else it calls ``basic_publish``).
``AmqpOutbound.send`` alone, 20,000 confirmed persistent 1 KiB publishes, 256 in flight: 198 -> 115 us
of CPU per publish, 4,700 -> 7,700 publishes/s. The aiormq attributes it relies on are checked once per
channel class (else ``basic_publish`` every time) and by the adapter tests against a real broker.

**Coalesced writes.** aiormq's writer makes one ``transport.write`` (one ``send`` system call) per frame on
its queue: 8% of the daemon's samples on MQTT -> AMQP. The frames of every publish of one loop turn go to
the queue as one ``ChannelFrame`` (``_Coalescer``). ``bench.micro amqp-out``, three runs each, alternated:
146-180 -> 112-136 us of CPU per publish; a bare publisher of prebuilt frames (no codec): 89 -> 48 us.
"""

from __future__ import annotations

import asyncio
import struct
from collections.abc import Mapping

import aiormq
from aiormq.abc import ChannelFrame
from pamqp import encode
from pamqp.commands import Basic

_U32 = struct.Struct(">I")
_U16 = struct.Struct(">H")
# pamqp truncates (and logs) longer keys: such a table is left to it.
_MAX_KEY_BYTES = 128

# Header names repeat from message to message (the CloudEvents attributes): their encoded key and type
# tag are kept, up to a bound (names come from senders).
_KEY_PREFIXES: dict[str, bytes] = {}
_MAX_KEY_PREFIXES = 1024

# (name, flag, AMQP type) per property, in wire order: looked up once instead of per publish.
_PLAN: tuple[tuple[str, int, str], ...] = tuple(
    (name, Basic.Properties.flags[name], Basic.Properties.amqp_type(name)) for name in Basic.Properties.__slots__
)


def str_table(table: Mapping[str, object]) -> bytes | None:
    """The field-table encoding of ``table`` if every key and value is a ``str``; None otherwise."""
    parts = []
    prefixes = _KEY_PREFIXES
    for key, value in sorted(table.items()):
        if type(value) is not str:
            return None
        prefix = prefixes.get(key)
        if prefix is None:
            if type(key) is not str:
                return None
            k = key.encode("utf-8")
            if len(k) > _MAX_KEY_BYTES:
                return None
            prefix = b"%c%sS" % (len(k), k)
            if len(prefixes) < _MAX_KEY_PREFIXES:
                prefixes[key] = prefix
        v = value.encode("utf-8")
        parts.append(prefix + _U32.pack(len(v)) + v)
    body = b"".join(parts)
    return _U32.pack(len(body)) + body


def _short_string(value: object) -> bytes | None:
    if type(value) is not str:
        return None
    b = value.encode("utf-8")
    return b"%c%s" % (len(b), b) if len(b) <= 255 else None  # longer: pamqp raises its TypeError


def _octet(value: object) -> bytes | None:
    return bytes((value,)) if type(value) is int and 0 <= value <= 255 else None


def _table(value: object) -> bytes | None:
    return str_table(value) if isinstance(value, dict) else None


# The encodings taken directly; anything else (or a value they decline) goes to pamqp.
_SHORTCUTS = {"shortstr": _short_string, "octet": _octet, "table": _table}


class FastProperties(Basic.Properties):
    """``Basic.Properties`` whose ``marshal`` takes the shortcuts above; the same bytes on the wire."""

    def marshal(self) -> bytes:
        flags = 0
        parts = []
        for name, flag, kind in _PLAN:
            value = getattr(self, name)
            if value is None or value == "":
                continue
            flags |= flag
            shortcut = _SHORTCUTS.get(kind)
            encoded = shortcut(value) if shortcut is not None else None
            parts.append(encoded if encoded is not None else encode.by_type(value, kind))
        # All 14 flags fit in one 16-bit word (bit 0, "more flags follow", stays clear), as pamqp writes it.
        return _U16.pack(flags & 0xFFFE) + b"".join(parts)


_FRAME_HEAD = struct.Struct(">BHI")  # frame type, channel, payload size
_CONTENT_HEAD = struct.Struct(">BHIHHQ")  # the same, then class (basic), weight (0), body size
_FRAME_END = b"\xce"
_METHOD, _HEADER, _BODY = 1, 2, 3
# Exchange -> the Basic.Publish method payload up to its routing key: method index, ticket 0, exchange.
_PUBLISH_PREFIXES: dict[str, bytes] = {}
_MAX_PUBLISH_PREFIXES = 256


def publish_frames(
    channel_number: int, exchange: str, routing_key: str, properties: Basic.Properties, body: bytes
) -> bytes:
    """The three frames of a mandatory publish whose body fits one frame, as pamqp marshals them
    (``ChannelFrame.marshall`` of Basic.Publish, ContentHeader, ContentBody: 25 -> 9 us per publish of a
    binary-mode event, timeit, most of the 9 the properties). pamqp validates an exchange name the first
    time it is seen; a routing key over 255 bytes is a ValueError."""
    prefix = _PUBLISH_PREFIXES.get(exchange)
    if prefix is None:
        Basic.Publish(exchange=exchange)  # raises ValueError on a name AMQP does not allow
        name = exchange.encode("utf-8")
        prefix = struct.pack(">IHB", Basic.Publish.index, 0, len(name)) + name
        if len(_PUBLISH_PREFIXES) < _MAX_PUBLISH_PREFIXES:
            _PUBLISH_PREFIXES[exchange] = prefix
    key = routing_key.encode("utf-8")
    if len(key) > 255:
        raise ValueError(f"routing key longer than 255 bytes: {routing_key[:64]!r}...")
    method = b"%s%c%s\x01" % (prefix, len(key), key)  # last octet: the bits, mandatory set
    props = properties.marshal()
    frames = [
        _FRAME_HEAD.pack(_METHOD, channel_number, len(method)),
        method,
        _FRAME_END,
        _CONTENT_HEAD.pack(_HEADER, channel_number, 12 + len(props), Basic.frame_id, 0, len(body)),
        props,
        _FRAME_END,
    ]
    if body:  # AMQP 0-9-1 4.2.6: an empty body has no body frame (RabbitMQ closes on one: UNEXPECTED_FRAME)
        frames += (_FRAME_HEAD.pack(_BODY, channel_number, len(body)), body, _FRAME_END)
    return b"".join(frames)


# What ``publish`` reads and writes on an aiormq channel (aiormq 7.x).
_CHANNEL_ATTRIBUTES = (
    "confirmations",
    "create_future",
    "delivery_tag",
    "is_closed",
    "max_content_size",
    "message_id_delivery_tag",
    "number",
    "publisher_confirms",
    "write_queue",
)
_supported: dict[type, bool] = {}
# id(channel) -> how many of our basic_publish calls are under way on it. Such a call takes its delivery
# tag before it waits for room in the write queue (``publish`` takes it after): while one is under way,
# every publish goes the same way, so the tags stay in the order the frames reach the wire.
_slow: dict[int, int] = {}


def shortcut_supported(channel: aiormq.Channel) -> bool:
    """Whether this channel's class has everything ``publish`` uses (checked once per class)."""
    cls = type(channel)
    ok = _supported.get(cls)
    if ok is None:
        ok = _supported[cls] = all(hasattr(channel, name) for name in _CHANNEL_ATTRIBUTES)
    return ok


class _Coalescer:
    """The frames of one channel's shortcut publishes, written together: everything published in one loop
    turn becomes one ``ChannelFrame`` on aiormq's write queue, so one socket write (and one pass of
    aiormq's writer) instead of one per publish. The frames keep the order their delivery tags were taken
    in: only this object puts them on the write queue, and a ``basic_publish`` of ours waits for
    ``drained`` first (see ``publish``)."""

    __slots__ = ("channel", "frames", "scheduled", "task")

    def __init__(self, channel: aiormq.Channel) -> None:
        self.channel = channel
        self.frames: list[bytes] = []
        self.scheduled = False  # a flush (the callback or ``task``) will take what ``frames`` holds
        self.task: asyncio.Task[None] | None = None

    def add(self, frames: bytes) -> None:
        self.frames.append(frames)
        if not self.scheduled:
            self.scheduled = True
            asyncio.get_running_loop().call_soon(self.flush)

    def _take(self) -> ChannelFrame:
        data = b"".join(self.frames)
        self.frames.clear()
        return ChannelFrame(payload=data, should_close=False)

    def flush(self) -> None:
        if self.task is not None or not self.frames:
            return
        if self.channel.is_closed:
            # Closing rejected every confirmation of these frames: their publishes are failing already.
            self.frames.clear()
            self.scheduled = False
            return
        frame = self._take()
        try:
            self.channel.write_queue.put_nowait(frame)
        except asyncio.QueueFull:  # aiormq's writer is waiting for the socket: wait with it, in order
            self.task = asyncio.get_running_loop().create_task(self._put(frame))
            return
        self.scheduled = False

    async def _put(self, frame: ChannelFrame) -> None:
        try:
            while True:
                await self.channel.write_queue.put(frame)
                if not self.frames or self.channel.is_closed:
                    return
                frame = self._take()
        finally:
            self.frames.clear()  # empty unless the channel closed (their confirmations are rejected)
            self.task = None
            self.scheduled = False

    async def drained(self) -> None:
        """Return once everything added is on the write queue."""
        self.flush()
        if self.task is not None:
            await asyncio.shield(self.task)


# id(channel) -> its coalescer (the entry's channel checked on lookup: an id can be reused).
_coalescers: dict[int, _Coalescer] = {}


def _coalescer(channel: aiormq.Channel) -> _Coalescer:
    found = _coalescers.get(id(channel))
    if found is None or found.channel is not channel:
        for key, other in list(_coalescers.items()):  # forget the channels that closed (a reconnect)
            if other.channel.is_closed and not other.scheduled:
                del _coalescers[key]
        found = _coalescers[id(channel)] = _Coalescer(channel)
    return found


async def publish(
    channel: aiormq.Channel, body: bytes, *, exchange: str, routing_key: str, properties: Basic.Properties
) -> None:
    """A mandatory publish on a confirm channel; returns once the broker confirmed it.

    Raises what ``basic_publish`` raises: ``PublishError`` when the broker returned it (the channel was
    opened with ``on_return_raises``), ``DeliveryError`` on a nack, the channel's close reason when it
    closes first. The caller bounds the wait.
    """
    message_id = properties.message_id
    key = id(channel)
    if (
        not message_id
        or not shortcut_supported(channel)
        or key in _slow
        or channel.is_closed
        or not channel.publisher_confirms
        or len(body) >= channel.max_content_size
    ):
        _slow[key] = _slow.get(key, 0) + 1
        try:
            # Our frames not yet written took their delivery tags already: they go first.
            coalescer = _coalescers.get(key)
            if coalescer is not None and coalescer.channel is channel:
                await coalescer.drained()
            await channel.basic_publish(
                body, exchange=exchange, routing_key=routing_key, properties=properties, mandatory=True, wait=False
            )
        finally:
            if _slow[key] == 1:
                del _slow[key]
            else:
                _slow[key] -= 1
        return
    # The frames' place in the coalescer is their place on the wire, so the next delivery tag is theirs;
    # and no confirm can be read before this registers it.
    _coalescer(channel).add(publish_frames(channel.number, exchange, routing_key, properties, body))
    confirmation = channel.create_future()  # rejected with the reason if the channel closes
    channel.delivery_tag += 1
    tag = channel.delivery_tag
    channel.confirmations[tag] = confirmation
    channel.message_id_delivery_tag[message_id] = tag  # how a returned message finds its publish
    try:
        await confirmation
    finally:
        if channel.message_id_delivery_tag.get(message_id) == tag:
            del channel.message_id_delivery_tag[message_id]
