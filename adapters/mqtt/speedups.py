"""Take four costs off paho's per-message path, without changing what it does.

**Properties.** paho builds a ``Properties`` object for every MQTT 5 PUBLISH it receives (and for
acknowledgements), and its constructor rebuilds the same three tables each time (a list, a 42-entry dict,
a 27-entry dict of tuples of lists) through a ``__setattr__`` that scans the property names per
assignment; ``unpack`` then ``clear()``s the fresh object, again scanning every name. Profiled on MQTT 5
-> AMQP at saturation, the two took 23% of the daemon's samples. The tables never change after
construction and paho never mutates them, so every instance can share one copy, set without the scan.

**ReasonCode.** Every MQTT 5 acknowledgement builds a ``ReasonCode``, whose constructor copies the
class's 45-entry table of names into the instance; paho only ever reads it, so the instance can read the
class's (read-only) table.

**In-flight window.** With ``max_inflight_messages`` set (our publishes must not exceed what the broker
accepts), paho calls ``_update_inflight`` on every PUBACK, and that walks every unacknowledged message
looking for a queued one to send. When every unfinished message is already in flight (nothing queued,
the usual case) there is nothing to find: the walk is skipped. MqttOutbound.send alone, 20,000 QoS 1
publishes with 256 in flight (py-spy): the walk was 12% of the samples and the name copies 5%.

**Coalesced writes.** paho writes its queued packets one ``send`` each. Under load the dispatcher
queues many PUBLISHes (and an MQTT inbound many PUBACKs) in one loop turn, all written in the next: one
system call each, each waking the broker. Before a write, each run of queued packets that paho does
nothing with once written (everything but a QoS 0 PUBLISH, whose ``on_publish`` fires on writing, and
DISCONNECT) becomes one packet of their concatenated bytes (up to 256 KiB); paho's own partial-write
handling applies to it unchanged. The sends were 15% of the daemon's profile on AMQP -> MQTT.

``install()`` patches only after checking, on objects built by paho's own code, that they hold what the
replacements assume; with a paho that does something else it leaves that part alone.
``tests/adapters/test_mqtt_speedups.py`` compares the replacements with the originals.
"""

from __future__ import annotations

from collections import deque
from typing import Any

import structlog
from paho.mqtt.client import DISCONNECT, PINGREQ, PUBLISH, Client
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

log = structlog.get_logger(__name__)

_EXPECTED = frozenset({"packetType", "types", "names", "properties"})
_installed = False
_properties_installed = False


def install() -> bool:
    """Patch paho once; returns whether the fast ``Properties`` are in place (the other two are checked and
    logged on their own)."""
    global _installed, _properties_installed
    if not _installed:
        _installed = True
        _install_reason_codes()
        _install_inflight_shortcut()
        _install_write_coalescing()
        _properties_installed = _install_properties()
    return _properties_installed


def _install_properties() -> bool:
    template: Any = object.__new__(Properties)
    _ORIGINAL_INIT(template, PacketTypes.PUBLISH)
    if set(vars(template)) != _EXPECTED:
        log.warning("mqtt.speedups_skipped", reason="paho's Properties changed", attributes=sorted(vars(template)))
        return False
    types, names, properties = template.types, template.names, template.properties
    compressed = tuple(name.replace(" ", "") for name in names)
    setter = object.__setattr__

    def __init__(self: Any, packetType: int) -> None:
        setter(self, "packetType", packetType)
        setter(self, "types", types)
        setter(self, "names", names)
        setter(self, "properties", properties)

    def clear(self: Any) -> None:
        values = self.__dict__
        for name in compressed:
            values.pop(name, None)

    Properties.__init__ = __init__  # type: ignore[method-assign]
    Properties.clear = clear  # type: ignore[method-assign]
    return True


_REASON_CODE_ATTRIBUTES = frozenset({"names", "packetType", "value"})


def _install_reason_codes() -> None:
    reference: Any = object.__new__(ReasonCode)
    _ORIGINAL_REASON_INIT(reference, PacketTypes.PUBACK, identifier=0x10)
    if set(vars(reference)) != _REASON_CODE_ATTRIBUTES or reference.names != ReasonCode.names:
        log.warning("mqtt.speedups_skipped", reason="paho's ReasonCode changed", attributes=sorted(vars(reference)))
        return

    def __init__(self: Any, packetType: int, aName: str = "Success", identifier: int = -1) -> None:
        # paho's constructor, but reading the class's table of names instead of copying it.
        self.names = type(self).names
        self.packetType = packetType
        if identifier == -1:
            if packetType == PacketTypes.DISCONNECT and aName == "Success":
                aName = "Normal disconnection"
            self.set(aName)
        else:
            self.value = identifier
            self.getName()  # check it's good

    ReasonCode.__init__ = __init__  # type: ignore[method-assign]


def _install_inflight_shortcut() -> None:
    original = _ORIGINAL_UPDATE_INFLIGHT

    def _update_inflight(self: Any) -> MQTTErrorCode:
        # _out_messages holds every QoS 1/2 message not yet completed; _inflight_messages counts those sent.
        try:
            if len(self._out_messages) <= self._inflight_messages:
                return MQTTErrorCode.MQTT_ERR_SUCCESS  # nothing queued: nothing for the walk to send
        except AttributeError:  # a paho that keeps its books differently: its own walk
            pass
        result: MQTTErrorCode = original(self)
        return result

    Client._update_inflight = _update_inflight  # type: ignore[method-assign]


COALESCE_MAX_BYTES = 256 * 1024
"""The most one coalesced packet carries (a partial write copies what is left of it again)."""
_PACKET_KEYS = frozenset({"command", "mid", "qos", "pos", "to_process", "packet", "info"})


def coalesce(out: deque[Any]) -> None:
    """Merge each run of packets in paho's ``_out_packet`` queue that need nothing done once written into
    one packet (command 0: paho does nothing when it is done), in place and in order.

    Only with ``popleft`` and ``extendleft``, as paho's own writer: with paho's network thread
    (``loop_start``) another thread may append to the queue meanwhile, at the other end."""
    taken = [out.popleft() for _ in range(len(out))]
    merged: list[Any] = []
    run: list[Any] = []
    size = 0

    def end_run() -> None:
        if len(run) == 1:
            merged.append(run[0])
        elif run:
            data = b"".join(p["packet"][p["pos"] :] for p in run)
            merged.append(
                {"command": 0, "mid": 0, "qos": 0, "pos": 0, "to_process": len(data), "packet": data, "info": None}
            )
        run.clear()

    for packet in taken:
        kind = packet["command"] & 0xF0
        if (kind == PUBLISH and packet["qos"] == 0) or kind == DISCONNECT:
            end_run()  # paho acts once these are written: they stay packets of their own
            size = 0
            merged.append(packet)
            continue
        remaining = packet["to_process"]
        if run and size + remaining > COALESCE_MAX_BYTES:
            end_run()
            size = 0
        run.append(packet)
        size += remaining
    end_run()
    out.extendleft(reversed(merged))


def _install_write_coalescing() -> None:
    probe: Any = Client(CallbackAPIVersion.VERSION2)
    probe.on_socket_register_write = lambda *_: None  # queue only: no socket, no write
    probe._packet_queue(PINGREQ, bytearray(b"\xc0\x00"), 0, 0)
    queue = getattr(probe, "_out_packet", None)
    if not isinstance(queue, deque) or len(queue) != 1 or set(queue[0]) != _PACKET_KEYS:
        log.warning("mqtt.speedups_skipped", reason="paho's packet queue changed")
        return
    original = _ORIGINAL_PACKET_WRITE

    def _packet_write(self: Any) -> MQTTErrorCode:
        if len(self._out_packet) > 1:
            coalesce(self._out_packet)
        result: MQTTErrorCode = original(self)
        return result

    Client._packet_write = _packet_write  # type: ignore[method-assign]


_ORIGINAL_INIT: Any = Properties.__init__
_ORIGINAL_CLEAR: Any = Properties.clear
_ORIGINAL_REASON_INIT: Any = ReasonCode.__init__
_ORIGINAL_UPDATE_INFLIGHT: Any = Client._update_inflight
_ORIGINAL_PACKET_WRITE: Any = Client._packet_write
