"""Broker connections over TLS with a CA and a client certificate, against brokers the tests start
(never the shared ones): a Mosquitto with a TLS listener requiring client certificates, and a RabbitMQ
node with an amqps listener (``verify_peer``, ``fail_if_no_peer_cert``)."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import ssl
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aio_pika
import pytest
import structlog
from pydantic import ValidationError

from adapters.amqp import AmqpOutbound
from adapters.amqp.config import AmqpBrokerConfig
from adapters.mqtt import MqttOutbound, broker_access
from adapters.mqtt.config import MqttBrokerConfig, MqttOutboundConfig
from adapters.mqtt.connection import BrokerAccess
from mediator.core.envelope import Envelope, new_event
from mediator.core.errors import ConfigError
from mediator.core.health import Health
from tests.adapters.test_amqp import get_one, is_ready, outbound_config
from tests.adapters.test_amqp import running as running_amqp
from tests.adapters.test_mqtt import running as running_mqtt
from tests.support.brokers import BrokerTls, MosquittoInstance, RabbitNode
from tests.support.certs import Pki, make_pki
from tests.support.net import unique, wait_until

pytestmark = pytest.mark.timeout(90)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def stranger(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """Another CA, with a client certificate of its own: the brokers trust neither."""
    return make_pki(tmp_path_factory.mktemp("stranger"), ca_name="some other CA")


def tls(pki: Pki, client: Pki | None = None, **extra: Any) -> dict[str, Any]:
    """A ``[brokers.X.tls]`` table trusting ``pki``'s CA, with ``client``'s certificate (None: none)."""
    table: dict[str, Any] = {"ca_file": str(pki.ca_file), **extra}
    if client is not None:
        table |= {"cert_file": str(client.client.cert_file), "key_file": str(client.client.key_file)}
    return table


def outbound_cfg_mqtt() -> MqttOutboundConfig:
    return MqttOutboundConfig.model_validate({"kind": "mqtt", "broker": "secure"})


def event(id: str) -> Envelope:
    return new_event(type="com.example.reading", source="/devices/1", data=b'{"t":21.5}', id=id)


# ---------------------------------------------------------------- config


def test_mqtt_broker_takes_a_tls_table_and_builds_its_context_once(pki: Pki) -> None:
    cfg = MqttBrokerConfig.model_validate({"host": "127.0.0.1", "port": 8883, "tls": tls(pki, pki)})
    assert cfg.tls is not None
    assert cfg.tls.verify
    access = broker_access("secure", cfg)
    context = access.tls_context
    assert isinstance(context, ssl.SSLContext)
    assert context.check_hostname
    assert context.verify_mode == ssl.CERT_REQUIRED
    assert broker_access("plain", MqttBrokerConfig()).tls_context is None
    with pytest.raises(ValidationError, match="cert_file and key_file go together"):
        MqttBrokerConfig.model_validate({"tls": {"cert_file": "/x.pem"}})


def test_unreadable_tls_files_are_environment_errors_with_their_key(pki: Pki, tmp_path: Path) -> None:
    missing = str(tmp_path / "missing.pem")
    with pytest.raises(ConfigError) as err:
        broker_access("secure", MqttBrokerConfig.model_validate({"tls": {"ca_file": missing}}))
    assert err.value.file == "environment"
    assert "brokers.secure.tls.ca_file" in err.value.problems[0]
    assert missing in err.value.problems[0]
    bad = {**tls(pki), "cert_file": str(pki.client.cert_file), "key_file": str(pki.server.key_file)}
    with pytest.raises(ConfigError) as err:
        broker_access("secure", MqttBrokerConfig.model_validate({"tls": bad}))
    assert "brokers.secure.tls.cert_file" in err.value.problems[0]


def test_verify_false_warns_at_build(pki: Pki) -> None:
    with structlog.testing.capture_logs() as logs:
        access = broker_access("lab", MqttBrokerConfig.model_validate({"tls": {"verify": False}}))
    assert access.tls_context is not None
    assert access.tls_context.verify_mode == ssl.CERT_NONE
    assert [log["event"] for log in logs if log["log_level"] == "warning"] == ["broker.tls_unverified"]


# ---------------------------------------------------------------- MQTT


@pytest.fixture
async def mosquitto_tls(tmp_path: Path, pki: Pki) -> AsyncIterator[MosquittoInstance]:
    broker = MosquittoInstance(
        tmp_path / "mosquitto", tls=BrokerTls(pki.ca_file, pki.server.cert_file, pki.server.key_file)
    )
    try:
        await broker.start()
    except (AssertionError, TimeoutError, OSError) as exc:
        pytest.fail(f"cannot start a Mosquitto with a TLS listener: {exc!r}")
    try:
        yield broker
    finally:
        await broker.stop()


def mqtt_access(broker: MosquittoInstance, table: dict[str, Any]) -> BrokerAccess:
    assert broker.tls_port is not None
    cfg = MqttBrokerConfig.model_validate(
        {
            "host": "127.0.0.1",
            "port": broker.tls_port,
            "client_id": unique("tls"),
            "reconnect_initial_s": 0.05,
            "reconnect_max_s": 0.5,
            "connect_timeout_s": 5.0,
            "tls": table,
        }
    )
    return broker_access("secure", cfg)


async def refused(access: BrokerAccess) -> str:
    """Run an outbound that must not connect: the reason its first attempt failed, as logged and as its
    health says. The reason comes in well under ``connect_timeout_s`` (5 s), not as a timeout."""
    health = Health()
    with structlog.testing.capture_logs() as logs:
        outbound = MqttOutbound("refused", outbound_cfg_mqtt(), access, health)
        task = asyncio.create_task(outbound.service.run(), name=outbound.component)
        try:
            await wait_until(
                lambda: any(log["event"] == "outbound.disconnected" for log in logs),
                timeout_s=8,  # bounded; a loaded CI machine took over 4 s once
                what="the first connect to fail",
            )
            snapshot = health.snapshot()[outbound.component]
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
    reason = next(str(log["reason"]) for log in logs if log["event"] == "outbound.disconnected")
    assert snapshot["ready"] is False
    assert snapshot["detail"] == reason
    return reason


async def test_mqtt_without_a_client_certificate_is_refused_and_says_why(
    mosquitto_tls: MosquittoInstance, pki: Pki
) -> None:
    reason = await refused(mqtt_access(mosquitto_tls, tls(pki)))
    assert "certificate required" in reason, reason


async def test_mqtt_client_certificate_of_another_ca_is_refused(
    mosquitto_tls: MosquittoInstance, pki: Pki, stranger: Pki
) -> None:
    reason = await refused(mqtt_access(mosquitto_tls, tls(pki, stranger)))
    # TLS 1.3: Mosquitto refuses the certificate in an alert after our side of the handshake is done, and
    # closes; now and then the close overtakes the alert (seen in 1 of ~10 clean-clone runs), and the read
    # fails with an EOF instead. Refused either way, with the TLS layer's reason rather than a timeout.
    assert "unknown ca" in reason or "EOF occurred in violation of protocol" in reason, reason


async def test_mqtt_trusting_another_ca_refuses_the_broker(
    mosquitto_tls: MosquittoInstance, pki: Pki, stranger: Pki
) -> None:
    reason = await refused(mqtt_access(mosquitto_tls, tls(stranger, pki)))
    assert "certificate verify failed" in reason, reason


async def test_mqtt_server_hostname_is_the_name_verified(mosquitto_tls: MosquittoInstance, pki: Pki) -> None:
    reason = await refused(mqtt_access(mosquitto_tls, tls(pki, pki, server_hostname="elsewhere.test")))
    assert "Hostname mismatch" in reason, reason
    assert "elsewhere.test" in reason, reason
    health = Health()
    access = mqtt_access(mosquitto_tls, tls(pki, pki, server_hostname="broker.test"))  # a SAN of the server's
    outbound = MqttOutbound("named", outbound_cfg_mqtt(), access, health)
    async with running_mqtt(outbound.service, health, outbound.component):
        await outbound.send(event("named-1"), unique("tls/named"), "binary")


# ---------------------------------------------------------------- AMQP


def test_amqp_tls_needs_an_amqps_url_and_its_own_table(pki: Pki, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValidationError, match="use amqps://"):
        AmqpBrokerConfig.model_validate({"url": "amqp://127.0.0.1/", "tls": tls(pki)})
    with pytest.raises(ValidationError, match=r"TLS settings go in \[brokers.X.tls\].*cafile"):
        AmqpBrokerConfig.model_validate({"url": f"amqps://127.0.0.1/?cafile={pki.ca_file}"})
    with pytest.raises(ValidationError, match="no_verify_ssl"):
        AmqpBrokerConfig.model_validate({"url": "amqps://127.0.0.1/?heartbeat=5&no_verify_ssl=1"})
    cfg = AmqpBrokerConfig.model_validate({"url_env": "BACKOFFICE_URL", "tls": tls(pki)})
    monkeypatch.setenv("BACKOFFICE_URL", "amqp://127.0.0.1/")
    with pytest.raises(ConfigError, match="use amqps://") as err:
        cfg.resolved_url("backoffice")
    assert err.value.file == "environment"
    monkeypatch.setenv("BACKOFFICE_URL", "amqps://127.0.0.1/")
    assert cfg.resolved_url("backoffice") == "amqps://127.0.0.1/"
    # amqps without a table verifies against the system's trust store
    assert AmqpBrokerConfig.model_validate({"url": "amqps://broker.example/"}).tls is None


def test_amqp_builds_one_context_per_broker_and_none_for_plain_urls(pki: Pki, tmp_path: Path) -> None:
    broker = AmqpBrokerConfig.model_validate({"url": "amqps://127.0.0.1:5671/", "tls": tls(pki, pki)})
    one = AmqpOutbound("one", outbound_config("x"), broker, broker.url, Health())
    two = AmqpOutbound("two", outbound_config("x"), broker, broker.url, Health())
    assert one.link.ssl_context is not None
    assert one.link.ssl_context is two.link.ssl_context
    assert one.link.ssl_context.verify_mode == ssl.CERT_REQUIRED
    assert one.link.ssl_context.check_hostname
    plain = AmqpBrokerConfig.model_validate({"url": "amqp://127.0.0.1/"})
    assert AmqpOutbound("p", outbound_config("x"), plain, plain.url, Health()).link.ssl_context is None
    missing = AmqpBrokerConfig.model_validate(
        {"url": "amqps://127.0.0.1/", "tls": {"ca_file": str(tmp_path / "nope.pem")}}
    )
    with pytest.raises(ConfigError) as err:
        AmqpOutbound("three", outbound_config("x"), missing, missing.url, Health())
    assert err.value.file == "environment"
    assert err.value.problems[0].startswith("outbound.three: its broker: tls.ca_file: cannot load")


@pytest.fixture(scope="module")
def rabbit_tls(pki: Pki) -> Iterator[RabbitNode]:
    """A RabbitMQ node of this module's own, with an amqps listener requiring client certificates."""
    if shutil.which("rabbitmq-server") is None:
        pytest.fail("rabbitmq-server is not installed; `make test` installs it (see README)")
    node = RabbitNode(tls=BrokerTls(pki.ca_file, pki.server.cert_file, pki.server.key_file))
    try:
        try:
            node.start()
        except (AssertionError, OSError, subprocess.SubprocessError) as exc:
            pytest.fail(f"cannot start a RabbitMQ node with an amqps listener: {exc}")
        yield node
    finally:
        node.stop()
        node.remove()


def client_context(pki: Pki, client: Pki | None) -> ssl.SSLContext:
    """An aio-pika client's own context, built with the standard library alone."""
    context = ssl.create_default_context(cafile=str(pki.ca_file))
    if client is not None:
        context.load_cert_chain(client.client.cert_file, client.client.key_file)
    return context


def amqps_broker(node: RabbitNode, table: dict[str, Any]) -> AmqpBrokerConfig:
    return AmqpBrokerConfig.model_validate(
        {"url": node.tls_url, "reconnect_initial_s": 0.1, "connect_timeout_s": 5.0, "tls": table}
    )


@pytest.mark.slow
async def test_amqp_outbound_publishes_with_confirms_over_amqps(rabbit_tls: RabbitNode, pki: Pki) -> None:
    url = rabbit_tls.tls_url
    assert url is not None
    broker = amqps_broker(rabbit_tls, tls(pki, pki))
    health = Health()
    exchange, queue_name = unique("t.tls.ex"), unique("t.tls.q")
    outbound = AmqpOutbound("backoffice", outbound_config(exchange), broker, url, health)
    reader = await aio_pika.connect(url, ssl_context=client_context(pki, pki), timeout=10)
    try:
        async with running_amqp(outbound):
            await wait_until(is_ready(health, "outbound:backoffice"), timeout_s=20, what="outbound ready")
            channel = await reader.channel()
            queue = await channel.declare_queue(queue_name, auto_delete=True)
            await queue.bind(exchange, routing_key="#")
            for n in range(3):
                await outbound.send(event(f"amqps-{n}"), f"readings.{n}", "binary")
            got = [await get_one(queue) for _ in range(3)]
            assert [m.message_id for m in got] == ["amqps-0", "amqps-1", "amqps-2"]
            assert got[0].body == b'{"t":21.5}'
            # The broker's view: our connection is TLS and authenticated by the client certificate.
            listed = rabbit_tls.ctl("list_connections", "ssl", "peer_cert_subject", "client_properties")
            ours = [line for line in listed.stdout.splitlines() if "mediator outbound:backoffice" in line]
            assert len(ours) == 1, listed.stdout
            assert ours[0].startswith("true\tCN=device-1"), listed.stdout
            await channel.exchange_delete(exchange)
    finally:
        await reader.close()


async def amqp_refused(node: RabbitNode, table: dict[str, Any]) -> str:
    """Run an outbound that must not connect: its health detail after the first failed attempt."""
    broker = amqps_broker(node, table)
    health = Health()
    outbound = AmqpOutbound("refused", outbound_config(unique("t.tls.no")), broker, broker.url, health)

    def detail() -> str:
        return str(health.snapshot()["outbound:refused"]["detail"])

    async with running_amqp(outbound):
        await wait_until(lambda: detail().startswith("cannot connect"), timeout_s=15, what="a failed connect")
        assert not health.is_ready("outbound:refused")
        return detail()


@pytest.mark.slow
async def test_amqps_without_a_client_certificate_is_refused(rabbit_tls: RabbitNode, pki: Pki) -> None:
    assert rabbit_tls.tls_url is not None
    with pytest.raises((aio_pika.exceptions.AMQPConnectionError, ConnectionError, OSError)):
        await aio_pika.connect(rabbit_tls.tls_url, ssl_context=client_context(pki, None), timeout=10)
    reason = await amqp_refused(rabbit_tls, tls(pki))
    # Either the broker's alert came through, or it was lost in the reset that followed it (see
    # BrokerLink._tls_hint): both name the cause.
    assert "certificate required" in reason or "without a client certificate" in reason, reason


@pytest.mark.slow
async def test_amqps_trusting_another_ca_refuses_the_broker(rabbit_tls: RabbitNode, pki: Pki, stranger: Pki) -> None:
    reason = await amqp_refused(rabbit_tls, tls(stranger, pki))
    assert "certificate verify failed" in reason, reason
