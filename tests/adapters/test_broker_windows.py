"""A broker inbound asks for no more unacknowledged messages than the outbox takes: the MQTT 5 Receive
Maximum and the AMQP prefetch are each the smaller of the inbound's own setting and ``[outbox] max_pending``
(issue 13: intake asks for as many messages as the outbox can take, and no more)."""

from __future__ import annotations

from pathlib import Path

import pytest

from adapters.amqp import AmqpInbound
from adapters.mqtt import MqttInbound
from mediator.config import load
from mediator.core.health import Health
from mediator.core.seams import Runtime
from mediator.registry import load_specs
from mediator.units import build_unit, plan
from tests.support.daemon import Quickstart
from tests.support.fakes import ListSink

pytestmark = pytest.mark.timeout(30)


def test_window_is_the_smallest_of_asked_max_pending_and_the_protocol() -> None:
    rt = Runtime(sink=ListSink(), health=Health(), max_pending=500)
    assert rt.window(20000) == 500
    assert rt.window(300) == 300
    assert Runtime(sink=ListSink(), health=Health()).window(20000) == 20000  # no outbox bound (a dry build)
    assert Runtime(sink=ListSink(), health=Health(), max_pending=10**6).window(65535) == 65535
    assert Runtime(sink=ListSink(), health=Health(), max_pending=10**6).window(70000) == 65535


def inbounds(tmp_path: Path, max_pending: int) -> tuple[MqttInbound, AmqpInbound]:
    """The shipped config's two broker inbounds, built as the daemon builds them (plan, build_unit)."""
    tmp_path.mkdir()
    config = load(Quickstart(tmp_path, max_pending=max_pending).write(), load_specs())
    units = plan(config, frozenset({"authorization"}), frozenset({"admin"}))
    specs = load_specs()
    (mqtt,) = build_unit(units["inbound:devices"], specs, ListSink(), Health(), None).services
    (amqp,) = build_unit(units["inbound:commands"], specs, ListSink(), Health(), None).services
    assert isinstance(mqtt, MqttInbound)
    assert isinstance(amqp, AmqpInbound)
    return mqtt, amqp


async def test_shipped_inbounds_ask_for_no_more_than_max_pending(tmp_path: Path) -> None:
    mqtt, amqp = inbounds(tmp_path / "shipped", 20000)  # the shipped max_pending
    assert (mqtt.receive_maximum, amqp.prefetch) == (20000, 256)

    mqtt, amqp = inbounds(tmp_path / "small", 100)
    assert (mqtt.receive_maximum, amqp.prefetch) == (100, 100)
    client, _ = mqtt._client()  # what CONNECT will carry
    assert getattr(client._properties, "ReceiveMaximum", None) == 100
