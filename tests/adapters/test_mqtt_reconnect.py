"""Broker outages, on a Mosquitto this test starts and kills itself (never the shared one)."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import threading
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from adapters.mqtt import MqttInbound, MqttOutbound
from adapters.mqtt.config import MqttOutboundConfig
from mediator.core.errors import RetryableDeliveryError
from mediator.core.health import Health
from mediator.core.seams import Runtime
from tests.adapters.test_mqtt import access, inbound_cfg, publisher, sample_event
from tests.support.fakes import ListSink
from tests.support.net import free_port, reachable, unique, wait_until

pytestmark = [pytest.mark.slow, pytest.mark.timeout(60)]


class OwnMosquitto:
    """A Mosquitto on a free loopback port that the test may stop and start again on the same port."""

    def __init__(self, tmp: Path) -> None:
        self.port = free_port()
        self.conf = tmp / "mosquitto.conf"
        self.conf.write_text(
            f"listener {self.port} 127.0.0.1\nallow_anonymous true\npersistence false\nset_tcp_nodelay true\n"
        )
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        self.proc = await asyncio.create_subprocess_exec(
            "mosquitto",
            "-c",
            str(self.conf),
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )
        await wait_until(lambda: reachable("127.0.0.1", self.port, timeout_s=0.2), timeout_s=10)

    async def stop(self, sig: int = signal.SIGKILL) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.send_signal(sig)
            async with asyncio.timeout(10):
                await self.proc.wait()
        self.proc = None


@contextlib.asynccontextmanager
async def own_mosquitto(tmp: Path) -> AsyncIterator[OwnMosquitto]:
    broker = OwnMosquitto(tmp)
    await broker.start()
    try:
        yield broker
    finally:
        if broker.proc is not None:
            broker.proc.send_signal(signal.SIGCONT)  # in case a test left it stopped
        await broker.stop()


def reader_threads(client_id: str) -> list[threading.Thread]:
    """The live reader threads of an MQTT connection (adapters/mqtt/connection.py ``start_reading``)."""
    return [t for t in threading.enumerate() if t.name == f"mqtt-reader:{client_id}" and t.is_alive()]


async def test_inbound_and_outbound_survive_a_broker_restart(tmp_path: Path) -> None:
    async with own_mosquitto(tmp_path) as mosq:
        broker = access("127.0.0.1", mosq.port)
        health = Health()
        sink = ListSink()
        topic = unique("re")
        service = MqttInbound("devices", inbound_cfg([topic]), broker, Runtime(sink=sink, health=health))
        out = MqttOutbound("mqtt", MqttOutboundConfig(kind="mqtt", broker="b", send_timeout_s=30), broker, health)
        tasks = [asyncio.create_task(service.run()), asyncio.create_task(out.service.run())]
        try:
            await wait_until(lambda: health.ready)
            await out.send(sample_event("before"), topic, "binary")
            await sink.wait_for(1)

            await mosq.stop()
            await wait_until(lambda: not health.snapshot()["inbound:devices"]["ready"])
            await wait_until(lambda: not health.snapshot()["outbound:mqtt"]["ready"])
            async with asyncio.timeout(1):  # while the broker is away a send fails at once
                with pytest.raises(RetryableDeliveryError):
                    await out.send(sample_event("during"), topic, "binary")

            await mosq.start()  # same port, empty broker: the inbound must subscribe again
            await wait_until(lambda: health.ready)
            await out.send(sample_event("after"), topic, "binary")
            await sink.wait_for(2)
            async with publisher("127.0.0.1", mosq.port) as pub:
                await pub.publish(topic, b"third-party", qos=1)
            await sink.wait_for(3)
            # The connection's reader thread ended with it: one thread for the connection there is now.
            assert len(reader_threads(service.client_id)) == 1
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
    await wait_until(lambda: not reader_threads(service.client_id), timeout_s=5)  # and none once stopped
    ids = [e.id for e in sink.events[:2]]
    assert ids == ["before", "after"]
    assert sink.events[2].binary_data == b"third-party"
    assert health.snapshot()["inbound:devices"]["ready"] is False


async def test_outbound_send_fails_fast_when_the_connection_dies_mid_flight(tmp_path: Path) -> None:
    async with own_mosquitto(tmp_path) as mosq:
        health = Health()
        out = MqttOutbound(
            "mqtt",
            MqttOutboundConfig(kind="mqtt", broker="b", send_timeout_s=30),
            access("127.0.0.1", mosq.port),
            health,
        )
        task = asyncio.create_task(out.service.run())
        try:
            await wait_until(lambda: health.ready)
            assert mosq.proc is not None
            mosq.proc.send_signal(signal.SIGSTOP)  # the broker stops answering: no PUBACK will come
            send = asyncio.create_task(out.send(sample_event(), "a/b", "binary"))
            await asyncio.sleep(0.2)
            assert not send.done()
            await mosq.stop()  # SIGKILL: the connection resets
            async with asyncio.timeout(5):  # well before send_timeout_s
                with pytest.raises(RetryableDeliveryError, match="connection lost"):
                    await send
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)


async def test_inbound_starts_while_the_broker_is_down(tmp_path: Path) -> None:
    mosq = OwnMosquitto(tmp_path)  # not started yet
    health = Health()
    sink = ListSink()
    topic = unique("late")
    broker = access("127.0.0.1", mosq.port)
    service = MqttInbound("devices", inbound_cfg([topic]), broker, Runtime(sink=sink, health=health))
    task = asyncio.create_task(service.run())
    try:
        await wait_until(lambda: "refused" in str(health.snapshot()["inbound:devices"]["detail"]).lower())
        assert not task.done()
        await mosq.start()
        await wait_until(lambda: health.ready)
        async with publisher("127.0.0.1", mosq.port) as pub:
            await pub.publish(topic, b"hello", qos=1)
        await sink.wait_for(1)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        if mosq.proc is not None:
            await mosq.stop()
    assert sink.events[0].binary_data == b"hello"
