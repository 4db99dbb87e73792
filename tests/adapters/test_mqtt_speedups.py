"""paho's Properties with the shared tables behave exactly as paho's own (see adapters/mqtt/speedups.py)."""

from __future__ import annotations

import asyncio
from typing import Any

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.exception import MQTTException
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

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


def original_reason(packet_type: int, name: str = "Success", identifier: int = -1) -> Any:
    code: Any = object.__new__(ReasonCode)
    speedups._ORIGINAL_REASON_INIT(code, packet_type, name, identifier)
    return code


@pytest.mark.parametrize(
    ("packet_type", "name", "identifier"),
    [
        (PacketTypes.PUBACK, "Success", -1),
        (PacketTypes.PUBACK, "Success", 0x10),  # no matching subscribers
        (PacketTypes.PUBACK, "Success", 0x87),  # not authorized
        (PacketTypes.SUBACK, "Success", 0x01),  # granted QoS 1
        (PacketTypes.DISCONNECT, "Success", -1),  # "Normal disconnection"
        (PacketTypes.CONNACK, "Server moved", -1),
    ],
)
def test_reason_codes_are_unchanged(packet_type: int, name: str, identifier: int) -> None:
    assert speedups.install()
    fast_code = ReasonCode(packet_type, name, identifier)
    reference = original_reason(packet_type, name, identifier)
    assert (fast_code.value, fast_code.getName(), fast_code.packetType) == (
        reference.value,
        reference.getName(),
        reference.packetType,
    )
    assert dict(fast_code.names) == dict(reference.names)
    assert fast_code == reference


def test_reason_codes_still_refuse_what_paho_refuses() -> None:
    assert speedups.install()
    for make in (ReasonCode, original_reason):
        with pytest.raises(KeyError):
            make(PacketTypes.PUBACK, identifier=0x03)  # not a reason code
        with pytest.raises(ValueError, match="exactly one name"):
            make(PacketTypes.PUBACK, identifier=0x8E)  # a DISCONNECT reason, not a PUBACK one
        with pytest.raises(KeyError):
            make(PacketTypes.PUBACK, "No such reason")


async def test_a_small_in_flight_window_still_sends_what_it_queued(mosquitto: tuple[str, int]) -> None:
    """With more publishes than the window, paho queues the rest and sends them as PUBACKs free the window
    (its own walk); with none queued the walk is skipped. Every publish must complete either way."""
    assert speedups.install()
    host, port = mosquitto
    done = asyncio.Event()
    acked: list[int] = []
    client = paho.Client(CallbackAPIVersion.VERSION2, protocol=paho.MQTTv5)
    client.max_inflight_messages_set(2)

    def on_publish(_c: Any, _u: Any, mid: int, _rc: Any, _p: Any) -> None:
        acked.append(mid)
        if len(acked) == 50:
            loop.call_soon_threadsafe(done.set)

    loop = asyncio.get_running_loop()
    client.on_publish = on_publish
    client.connect(host, port)
    client.loop_start()
    try:
        infos = [client.publish(f"test/speedups/{i}", b"x", qos=1) for i in range(50)]
        async with asyncio.timeout(10):
            await done.wait()
    finally:
        client.disconnect()
        client.loop_stop()
    assert sorted(acked) == sorted(info.mid for info in infos)
