from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest

from tests.support.daemon import remove_declared
from tests.support.net import MQTT_HOST, MQTT_PORT, reachable

SHARED_AMQP = "amqp://guest:guest@127.0.0.1:5672/"


@pytest.fixture(scope="session", autouse=True)
def _remove_daemon_broker_objects() -> Iterator[None]:
    """The end-to-end daemons declare durable exchanges and a queue under unique names on the shared
    RabbitMQ; they are deleted once the session ends."""
    yield
    if reachable("127.0.0.1", 5672):
        asyncio.run(remove_declared(SHARED_AMQP))


@pytest.fixture(scope="session")
def rabbitmq() -> str:
    """The shared RabbitMQ. A test that needs it fails (never skips) when it is not reachable."""
    if not reachable("127.0.0.1", 5672):
        pytest.fail("RabbitMQ is not reachable on 127.0.0.1:5672; `make test` starts it (see README)")
    return SHARED_AMQP


@pytest.fixture(scope="session")
def mosquitto() -> tuple[str, int]:
    """The shared Mosquitto. A test that needs it fails (never skips) when it is not reachable."""
    if not reachable(MQTT_HOST, MQTT_PORT):
        pytest.fail(f"Mosquitto is not reachable on {MQTT_HOST}:{MQTT_PORT}; `make test` starts it (see README)")
    return MQTT_HOST, MQTT_PORT


@pytest.fixture(scope="session")
def nats_url() -> str:
    """The shared NATS (with JetStream). A test that needs it fails (never skips) when it is not reachable."""
    if not reachable("127.0.0.1", 4222):
        pytest.fail("NATS is not reachable on 127.0.0.1:4222; `make test` starts it (see README)")
    return "nats://127.0.0.1:4222"


@pytest.fixture(scope="session")
def postgres() -> str:
    """The shared PostgreSQL's admin DSN. A test that needs it fails (never skips) when it is not reachable;
    use ``tests.support.postgres.fresh_database`` for a database of the test's own."""
    from tests.support.postgres import ADMIN_DSN, pg_reachable

    if not pg_reachable():
        pytest.fail("PostgreSQL is not reachable on 127.0.0.1:5432; `make test` starts it (see README)")
    return ADMIN_DSN
