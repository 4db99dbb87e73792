"""The publish properties encoded faster, byte for byte as pamqp encodes them.

pamqp marshals a content header's properties generically: for each of the 14 properties a type lookup by
name, then the header table entry by entry through a type dispatch with a dozen ``isinstance`` checks per
value. In the binary content mode every CloudEvents attribute is a string header. ``FastProperties``
encodes short strings, octets and a table whose keys and values are all ``str`` directly, in the layout
pamqp writes for them (a table sorted by key: short-string key, ``S``, long string), and hands everything
else to pamqp unchanged (other value types, over-long strings or keys, which pamqp refuses or truncates).
Measured with timeit on the properties of a binary-mode CloudEvent (7 headers): 16.9 -> 7.7 us per
marshal, of about 200 us of CPU per confirmed publish. ``tests/adapters/test_amqp_speedups.py`` compares
the two encodings.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping

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
