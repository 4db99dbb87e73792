"""Broker restarts: a RabbitMQ node this test session owns (never the shared one) is stopped and started
under a running inbound and outbound; both must carry on by themselves."""

from __future__ import annotations

import asyncio
import contextlib
import os
import pwd
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import aio_pika
import pytest

from adapters.amqp import AmqpInbound, AmqpOutbound
from mediator.core.envelope import data_bytes
from mediator.core.errors import RetryableDeliveryError
from mediator.core.health import Health
from mediator.core.seams import Runtime
from tests.adapters.test_amqp import (
    broker_config,
    client,
    get_one,
    inbound_config,
    is_ready,
    order_event,
    outbound_config,
    running,
    wait_until,
)
from tests.support.fakes import ListSink
from tests.support.net import free_port, reachable, unique

pytestmark = pytest.mark.slow

STARTUP_TIMEOUT_S = 90.0


@dataclass(frozen=True)
class OwnRabbit:
    node: str
    port: int
    url: str
    env: dict[str, str]
    base: Path

    def ctl_argv(self, *args: str) -> list[str]:
        return ["rabbitmqctl", "-n", self.node, *args]

    def ctl(self, *args: str, timeout_s: float = 60.0) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            self.ctl_argv(*args), env=self.env, capture_output=True, text=True, timeout=timeout_s, check=False
        )

    async def actl(self, *args: str, timeout_s: float = 60.0) -> None:
        """rabbitmqctl from a test's event loop, without blocking it."""
        proc = await asyncio.create_subprocess_exec(
            *self.ctl_argv(*args), env=self.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )
        try:
            async with asyncio.timeout(timeout_s):
                out, _ = await proc.communicate()
        except TimeoutError:
            proc.kill()
            await proc.wait()
            raise
        assert proc.returncode == 0, f"rabbitmqctl {' '.join(args)} failed: {out.decode(errors='replace')}"

    def logs(self) -> str:
        parts = []
        for path in sorted((self.base / "log").glob("*.log")):
            parts.append(f"--- {path.name}\n{path.read_text(errors='replace')[-3000:]}")
        return "\n".join(parts)


def _own(path: Path, user: pwd.struct_passwd | None) -> None:
    if user is not None:
        os.chown(path, user.pw_uid, user.pw_gid)


@pytest.fixture(scope="session")
def own_rabbitmq() -> Iterator[OwnRabbit]:
    """A second RabbitMQ node on free loopback ports, with its own name, data and config (see
    shared/SERVICES.md). Started once per session; stopped at teardown."""
    if shutil.which("rabbitmq-server") is None:
        pytest.fail("rabbitmq-server is not installed; `make test` installs it (see README)")
    # As root the Debian wrappers re-run the server as the rabbitmq user, which must own its files.
    user = pwd.getpwnam("rabbitmq") if os.geteuid() == 0 else None
    base = Path(tempfile.mkdtemp(prefix="mediator-rabbit-"))
    _own(base, user)
    port, dist_port = free_port(), free_port()
    node = f"t{port}@localhost"
    files = {
        # Our own config file: the system one pins the listener to 5672, the shared node's port.
        "rabbitmq.conf": f"listeners.tcp.local = 127.0.0.1:{port}\n",
        "enabled_plugins": "[].\n",
        "rabbitmq-env.conf": "",  # not the system one, which names the shared node
    }
    for name, text in files.items():
        (base / name).write_text(text)
        _own(base / name, user)
    env = {
        **os.environ,
        "RABBITMQ_NODENAME": node,
        "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
        "RABBITMQ_NODE_PORT": str(port),
        "RABBITMQ_DIST_PORT": str(dist_port),
        "RABBITMQ_MNESIA_BASE": str(base / "mnesia"),
        "RABBITMQ_LOG_BASE": str(base / "log"),
        "RABBITMQ_ENABLED_PLUGINS_FILE": str(base / "enabled_plugins"),
        "RABBITMQ_CONFIG_FILE": str(base / "rabbitmq.conf"),
        "RABBITMQ_CONF_ENV_FILE": str(base / "rabbitmq-env.conf"),
        "ERL_EPMD_ADDRESS": "127.0.0.1",
        "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS": "-kernel inet_dist_use_interface {127,0,0,1}",
    }
    rabbit = OwnRabbit(node, port, f"amqp://guest:guest@127.0.0.1:{port}/", env, base)
    try:
        subprocess.run(["rabbitmq-server", "-detached"], env=env, check=True, timeout=60, capture_output=True)
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        # -detached returns at once: poll until the node has booted.
        while rabbit.ctl("await_startup", "--timeout", "5", timeout_s=30).returncode != 0:
            if time.monotonic() > deadline:
                pytest.fail(f"own RabbitMQ node {node} did not start in {STARTUP_TIMEOUT_S} s\n{rabbit.logs()}")
            time.sleep(0.5)
        if not reachable("127.0.0.1", port):
            pytest.fail(f"own RabbitMQ node {node} is up but not listening on {port}\n{rabbit.logs()}")
        yield rabbit
    finally:
        rabbit.ctl("stop", timeout_s=60)
        shutil.rmtree(base, ignore_errors=True)


async def restart(rabbit: OwnRabbit, health: Health, component: str) -> None:
    """stop_app, wait until the component saw its connection go, then start_app."""
    await rabbit.actl("stop_app")
    await wait_until(lambda: not is_ready(health, component)(), what=f"{component} down")
    await rabbit.actl("start_app", timeout_s=120)


async def test_inbound_consumer_resumes_after_broker_restart(own_rabbitmq: OwnRabbit) -> None:
    url = own_rabbitmq.url
    sink = ListSink()
    health = Health()
    queue, exchange = unique("t.rs.in"), unique("t.rs.ex")
    inbound = AmqpInbound(
        "restart",
        inbound_config(queue, exchange, prefetch=10),
        broker_config(url),
        url,
        Runtime(sink=sink, health=health),
    )
    async with running(inbound):
        await wait_until(is_ready(health, "inbound:restart"), what="inbound ready")
        async with client(url) as ch:
            ex = await ch.get_exchange(exchange)
            await ex.publish(aio_pika.Message(b"before", message_id="before"), routing_key="r.1")
        await sink.wait_for(1)

        await restart(own_rabbitmq, health, "inbound:restart")
        await wait_until(is_ready(health, "inbound:restart"), timeout_s=60, what="inbound reconnected")
        assert "reconnected" in str(health.snapshot()["inbound:restart"]["detail"])

        async with client(url) as ch:
            ex = await ch.get_exchange(exchange)  # durable: survived the restart
            await ex.publish(
                aio_pika.Message(b"after", message_id="after", delivery_mode=aio_pika.DeliveryMode.PERSISTENT),
                routing_key="r.2",
            )
        await sink.wait_for(2, timeout_s=30)
    assert [e.id for e in sink.events] == ["before", "after"]
    assert data_bytes(sink.events[1]) == b"after"
    assert sink.events[1].provenance.topic == "r.2"
    async with client(url) as ch:
        await ch.queue_delete(queue)
        await ch.exchange_delete(exchange)


async def test_outbound_publishes_again_after_broker_restart(own_rabbitmq: OwnRabbit) -> None:
    url = own_rabbitmq.url
    health = Health()
    exchange, queue_name = unique("t.rs.out"), unique("t.rs.rb")
    outbound = AmqpOutbound("restart", outbound_config(exchange), broker_config(url), url, health)
    async with running(outbound):
        await wait_until(is_ready(health, "outbound:restart"), what="outbound ready")
        async with client(url) as ch:
            queue = await ch.declare_queue(queue_name, durable=True)
            await queue.bind(exchange, routing_key="#")
        await outbound.send(order_event("e-1"), "orders.one", "binary")

        await own_rabbitmq.actl("stop_app")
        await wait_until(lambda: not is_ready(health, "outbound:restart")(), what="outbound down")
        with pytest.raises(RetryableDeliveryError, match="not connected"):
            await outbound.send(order_event("e-lost"), "orders.lost", "binary")
        await own_rabbitmq.actl("start_app", timeout_s=120)

        await wait_until(is_ready(health, "outbound:restart"), timeout_s=60, what="outbound reconnected")
        await outbound.send(order_event("e-2"), "orders.two", "binary")

        async with client(url) as ch:
            queue = await ch.declare_queue(queue_name, durable=True)
            got = [(await get_one(queue)).message_id, (await get_one(queue)).message_id]
            assert await queue.get(fail=False, timeout=5) is None
            with contextlib.suppress(Exception):
                await ch.queue_delete(queue_name)
                await ch.exchange_delete(exchange)
    assert got == ["e-1", "e-2"]
