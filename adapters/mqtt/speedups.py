"""Make paho's MQTT 5 ``Properties`` cheap to create and clear, without changing what they hold.

paho builds a ``Properties`` object for every MQTT 5 PUBLISH it receives (and for acknowledgements), and
its constructor rebuilds the same three tables each time (a list, a 42-entry dict, a 27-entry dict of
tuples of lists) through a ``__setattr__`` that scans the property names per assignment; ``unpack`` then
``clear()``s the fresh object, again scanning every name. Profiled on MQTT 5 -> AMQP at saturation, the two
took 23% of the daemon's samples. The tables never change after construction and paho never mutates
them, so every instance can share one copy, set without the scan.

``install()`` replaces ``Properties.__init__`` and ``Properties.clear`` only after checking, on an
instance built by paho's own constructor, that the constructor sets exactly those four attributes; with
a paho that does something else it leaves paho alone. ``tests/adapters/test_mqtt_speedups.py`` compares
the two implementations.
"""

from __future__ import annotations

from typing import Any

import structlog
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

log = structlog.get_logger(__name__)

_EXPECTED = frozenset({"packetType", "types", "names", "properties"})
_installed = False


def install() -> bool:
    """Patch ``Properties`` once; returns whether the fast versions are in place."""
    global _installed
    if _installed:
        return True
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
    _installed = True
    return True


_ORIGINAL_INIT: Any = Properties.__init__
_ORIGINAL_CLEAR: Any = Properties.clear
