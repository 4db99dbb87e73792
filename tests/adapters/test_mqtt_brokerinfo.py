"""The MQTT inbound reads the broker's ``$SYS`` version and dropped count (adapters/mqtt/brokerinfo.py): it
logs which broker it found and what Mosquitto's queue limit means, and ``/readyz``'s detail for the
connection shows both, with a warning once the count grows while connected. Over a Mosquitto this test
starts with ``sys_interval 1`` (10 s by default) and a queue limit of 5, so that drops are easy to cause."""

from __future__ import annotations

from pathlib import Path

import aiomqtt
import pytest
from structlog.testing import capture_logs

from adapters.mqtt import MqttInbound
from adapters.mqtt.brokerinfo import BrokerInfo, wanted
from mediator.core.health import Health
from mediator.core.seams import Runtime
from tests.adapters.test_mqtt import access, inbound_cfg, publisher, running
from tests.support.brokers import MosquittoInstance
from tests.support.fakes import ListSink
from tests.support.net import unique, wait_until

pytestmark = [pytest.mark.slow, pytest.mark.timeout(60)]


async def test_readyz_detail_has_the_broker_version_and_warns_when_it_drops(tmp_path: Path) -> None:
    broker = MosquittoInstance(tmp_path, limits="max_queued_messages 5\n", extra="sys_interval 1\n")
    await broker.start()
    try:
        mqtt = access("127.0.0.1", broker.port)
        health = Health()
        sink = ListSink()
        topic = unique("sys")
        with capture_logs() as logs:
            service = MqttInbound("devices", inbound_cfg([f"{topic}/#"]), mqtt, Runtime(sink=sink, health=health))

            def detail() -> str:
                return str(health.snapshot()[service.name]["detail"])

            async with running(service, health, service.name):
                await wait_until(lambda: "dropped 0 messages" in detail(), timeout_s=5, what="the $SYS values")
                assert detail().startswith(f"connected to 127.0.0.1:{broker.port}; broker mosquitto version 2.")
                assert "WARNING" not in detail()

                # Another client's persistent session, offline: the broker keeps 5 of its QoS 1 messages and
                # drops the rest (counted in $SYS/broker/publish/messages/dropped).
                slow = aiomqtt.Client("127.0.0.1", broker.port, identifier=unique("slow"), clean_session=False)
                async with slow:
                    await slow.subscribe(f"{topic}-slow", qos=1)
                async with publisher("127.0.0.1", broker.port) as pub:
                    for i in range(20):
                        await pub.publish(f"{topic}-slow", b"%d" % i, qos=1)
                    await pub.publish(f"{topic}/ours", b"an event", qos=1)
                await wait_until(lambda: "WARNING" in detail(), timeout_s=5, what="the dropped count to grow")
                assert "the broker dropped 15 messages (for any of its clients) since we connected" in detail()
                await sink.wait_for(1)
    finally:
        await broker.stop()
    assert [e.binary_data for e in sink.events] == [b"an event"]  # $SYS never becomes events
    identified = [e for e in logs if e["event"] == "broker.identified"]
    assert len(identified) == 1
    assert identified[0]["version"].startswith("mosquitto version 2.")
    assert "max_queued_messages" in identified[0]["note"]
    dropped = [e for e in logs if e["event"] == "broker.dropped"]
    assert dropped[-1]["since_connected"] == 15
    assert dropped[-1]["log_level"] == "warning"


def test_sys_topics_are_left_to_an_inbound_that_subscribes_to_them() -> None:
    assert wanted(["devices/+/telemetry", "$share/g/devices/#"])
    assert not wanted(["$SYS/#"])
    assert not wanted(["$share/g/$SYS/broker/#"])


def test_dropped_count_from_a_new_connection_is_a_new_baseline() -> None:
    changes: list[str] = []
    info = BrokerInfo(None, lambda: changes.append(info.detail()))
    info.connected()
    assert info.take("$SYS/broker/publish/messages/dropped", b"7")
    assert not info.take("devices/1/telemetry", b"7")
    assert changes == ["broker dropped 7 messages (all clients, since it started)"]
    info.connected()  # a reconnect: drops while we were away are not ours to warn about
    info.take("$SYS/broker/publish/messages/dropped", b"9")
    assert "WARNING" not in info.detail()
