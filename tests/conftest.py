from __future__ import annotations

import pytest

from tests.support.net import MQTT_HOST, MQTT_PORT, reachable


@pytest.fixture(scope="session")
def rabbitmq() -> str:
    """The shared RabbitMQ. A test that needs it fails (never skips) when it is not reachable."""
    if not reachable("127.0.0.1", 5672):
        pytest.fail("RabbitMQ is not reachable on 127.0.0.1:5672; `make test` starts it (see README)")
    return "amqp://guest:guest@127.0.0.1:5672/"


@pytest.fixture(scope="session")
def mosquitto() -> tuple[str, int]:
    """The shared Mosquitto. A test that needs it fails (never skips) when it is not reachable."""
    if not reachable(MQTT_HOST, MQTT_PORT):
        pytest.fail(f"Mosquitto is not reachable on {MQTT_HOST}:{MQTT_PORT}; `make test` starts it (see README)")
    return MQTT_HOST, MQTT_PORT
