"""paho's Properties with the shared tables behave exactly as paho's own (see adapters/mqtt/speedups.py)."""

from __future__ import annotations

from typing import Any

import pytest
from paho.mqtt.exception import MQTTException
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from adapters.mqtt import speedups

PACKET_TYPES = [
    PacketTypes.CONNECT,
    PacketTypes.CONNACK,
    PacketTypes.PUBLISH,
    PacketTypes.PUBACK,
    PacketTypes.SUBSCRIBE,
    PacketTypes.DISCONNECT,
    PacketTypes.AUTH,
    PacketTypes.WILLMESSAGE,
]


def original(packet_type: int) -> Any:
    props: Any = object.__new__(Properties)
    speedups._ORIGINAL_INIT(props, packet_type)
    return props


def fast(packet_type: int) -> Any:
    assert speedups.install()
    return Properties(packet_type)  # type: ignore[no-untyped-call]


@pytest.mark.parametrize("packet_type", PACKET_TYPES)
def test_a_new_instance_holds_what_paho_builds(packet_type: int) -> None:
    assert vars(fast(packet_type)) == vars(original(packet_type))


def filled(props: Any) -> Any:
    props.ContentType = "application/json"
    props.MessageExpiryInterval = 60
    props.UserProperty = ("specversion", "1.0")
    props.UserProperty = [("id", "e-1"), ("type", "t")]
    props.CorrelationData = b"\x00\x01"
    return props


def test_pack_and_unpack_are_unchanged() -> None:
    packed = filled(fast(PacketTypes.PUBLISH)).pack()
    assert packed == filled(original(PacketTypes.PUBLISH)).pack()
    back: Any = fast(PacketTypes.PUBLISH)
    back.ResponseTopic = "left/over"  # unpack clears what was there
    back.unpack(packed)
    reference: Any = original(PacketTypes.PUBLISH)
    speedups._ORIGINAL_CLEAR(reference)  # the original clear, on the original object
    reference.unpack(packed)
    assert vars(back) == vars(reference)
    assert back.UserProperty == [("specversion", "1.0"), ("id", "e-1"), ("type", "t")]
    assert not hasattr(back, "ResponseTopic")


def test_clear_empties_and_validation_still_applies() -> None:
    props = filled(fast(PacketTypes.PUBLISH))
    props.clear()
    assert props.isEmpty()
    assert vars(props) == vars(original(PacketTypes.PUBLISH))
    with pytest.raises(MQTTException, match="does not apply"):
        props.SessionExpiryInterval = 10  # a CONNECT property
    with pytest.raises(MQTTException, match="must be one of"):
        props.NoSuchProperty = 1
