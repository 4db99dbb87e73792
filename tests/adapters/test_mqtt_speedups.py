"""paho's Properties with the shared tables behave exactly as paho's own (see adapters/mqtt/speedups.py)."""

from __future__ import annotations

import asyncio
import socket
import sys
import threading
import uuid
from collections import deque
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


def test_coalesce_merges_only_packets_paho_does_nothing_with_once_written() -> None:
    def packet(command: int, qos: int, data: bytes, pos: int = 0) -> dict[str, Any]:
        return {"command": command, "mid": 1, "qos": qos, "pos": pos, "to_process": len(data) - pos, "packet": data}

    queue = deque(
        [
            packet(paho.PUBLISH | 0x02, 1, b"abcdef", pos=2),  # partly written already: its rest goes first
            packet(paho.PUBACK, 0, b"PA"),
            packet(paho.PUBLISH, 0, b"q0"),  # QoS 0: on_publish fires when written
            packet(paho.PUBLISH | 0x02, 1, b"z"),
            packet(paho.PUBLISH | 0x02, 1, b"w"),
            packet(paho.DISCONNECT, 0, b"D"),
            packet(paho.PUBACK, 0, b"PB"),
        ]
    )
    speedups.coalesce(queue)
    assert [p["packet"] for p in queue] == [b"cdefPA", b"q0", b"zw", b"D", b"PB"]
    assert [(p["command"], p["pos"], p["to_process"]) for p in queue] == [
        (0, 0, 6),
        (paho.PUBLISH, 0, 2),
        (0, 0, 2),
        (paho.DISCONNECT, 0, 1),
        (paho.PUBACK, 0, 2),
    ]
    speedups.coalesce(queue)  # nothing left to merge
    assert [p["packet"] for p in queue] == [b"cdefPA", b"q0", b"zw", b"D", b"PB"]
    big = deque([packet(paho.PUBACK, 0, b"x" * speedups.COALESCE_MAX_BYTES), packet(paho.PUBACK, 0, b"y")])
    speedups.coalesce(big)
    assert len(big) == 2  # past the bound: written apart


@pytest.mark.parametrize("send_buffer", [None, 4096])
async def test_coalesced_writes_deliver_every_packet_in_order(
    mosquitto: tuple[str, int], send_buffer: int | None
) -> None:
    """300 publishes of 1 KiB queued at once (QoS 1, every tenth QoS 0) are written in few sends; through a
    4 KiB send buffer the coalesced writes are cut short again and again. Everything arrives, in order."""
    assert speedups.install()
    host, port = mosquitto
    base = f"test/coalesce/{uuid.uuid4().hex}"
    n = 300
    loop = asyncio.get_running_loop()
    received: dict[str, list[bytes]] = {"q0": [], "q1": []}
    all_in = asyncio.Event()
    subscribed = asyncio.Event()

    def on_message(_c: Any, _u: Any, msg: Any) -> None:
        received[msg.topic.rsplit("/", 1)[1]].append(msg.payload)
        if sum(map(len, received.values())) == n:
            loop.call_soon_threadsafe(all_in.set)

    def on_subscribe(*_: Any) -> None:
        loop.call_soon_threadsafe(subscribed.set)

    sub = paho.Client(CallbackAPIVersion.VERSION2, protocol=paho.MQTTv311)
    sub.on_message = on_message
    sub.on_subscribe = on_subscribe
    sub.connect(host, port)
    sub.subscribe(f"{base}/#", qos=1)
    sub.loop_start()
    pub: Any = paho.Client(CallbackAPIVersion.VERSION2, protocol=paho.MQTTv311)
    pub.max_inflight_messages_set(n)
    sends: list[int] = []
    try:
        async with asyncio.timeout(10):
            await subscribed.wait()
        pub.connect(host, port)
        if send_buffer is not None:
            pub.socket().setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, send_buffer)
        real_send = pub._sock_send

        def counting_send(buf: bytes) -> int:
            sent: int = real_send(buf)
            sends.append(sent)
            return sent

        pub._sock_send = counting_send
        pub.on_socket_register_write = lambda *_: None  # queue everything first: written by the loop below
        payloads = [f"{i:04d}".encode() + b"x" * 1020 for i in range(n)]
        qos = [0 if i % 10 == 0 else 1 for i in range(n)]
        infos = [pub.publish(f"{base}/q{q}", p, qos=q) for p, q in zip(payloads, qos, strict=True)]
        pub.on_socket_register_write = None
        pub.loop_start()
        async with asyncio.timeout(20):
            await all_in.wait()
            while not all(info.is_published() for info in infos):
                await asyncio.sleep(0.01)
    finally:
        for client in (pub, sub):
            client.disconnect()
            client.loop_stop()
    assert received["q0"] == [p for p, q in zip(payloads, qos, strict=True) if q == 0]
    assert received["q1"] == [p for p, q in zip(payloads, qos, strict=True) if q == 1]
    if send_buffer is None:
        assert len(sends) < n / 4  # one send per packet without coalescing
    else:
        assert max(sends) <= 64 * 1024  # the writes were cut short by the socket


def test_coalesce_loses_nothing_a_thread_appends_meanwhile() -> None:
    """paho's network thread coalesces while the application's thread queues (loop_start): what is
    appended during a merge stays, after it and in order."""
    queue: deque[dict[str, Any]] = deque()
    n = 20_000

    def produce() -> None:
        for i in range(n):
            data = i.to_bytes(4, "big")
            queue.append({"command": paho.PUBACK, "mid": i, "qos": 0, "pos": 0, "to_process": 4, "packet": data})

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    written = bytearray()
    producer = threading.Thread(target=produce)
    try:
        producer.start()
        while producer.is_alive() or queue:
            speedups.coalesce(queue)
            while queue:
                packet = queue.popleft()
                written += packet["packet"][packet["pos"] :]
    finally:
        producer.join()
        sys.setswitchinterval(interval)
    assert bytes(written) == b"".join(i.to_bytes(4, "big") for i in range(n))
