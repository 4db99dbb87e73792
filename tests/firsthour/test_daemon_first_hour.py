"""Issue 14 against the running daemon: the duplicate flag over a real gRPC channel, ``mediator publish`` and
``mediator tail`` (the tail seeing events published over HTTP, MQTT and the CLI; with an API key where the
listener asks for one), 404/405 in the JSON error shape, dead letters listed with the attempts made and ISO
times, an unknown id's replay refused over HTTP and by the CLI, and systemd's READY=1 / STOPPING=1 /
WATCHDOG=1 on a NOTIFY_SOCKET the test binds."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import aiomqtt
import grpc
import pytest

from mediator.stages.authn import new_api_key
from mediator.v1 import envelope_pb2, service_pb2_grpc
from tests.cli.support import cli
from tests.support.daemon import ROOT, DaemonProcess, Quickstart

pytestmark = pytest.mark.timeout(60)


def event(event_id: str) -> envelope_pb2.Envelope:
    env = envelope_pb2.Envelope(id=event_id, source="/firsthour", spec_version="1.0", type="com.example.order.created")
    env.binary_data = b'{"order": 1}'
    return env


async def test_grpc_reports_a_duplicate_publish_and_the_cli_says_so(
    daemon: DaemonProcess, quickstart: Quickstart
) -> None:
    event_id = f"dup-{uuid.uuid4()}"
    async with grpc.aio.insecure_channel(f"127.0.0.1:{quickstart.grpc_port}") as channel:
        stub = service_pb2_grpc.MediatorStub(channel)
        first = await stub.Publish(event(event_id))
        second = await stub.Publish(event(event_id))
        assert (first.id, first.duplicate) == (event_id, False)
        assert (second.id, second.duplicate) == (event_id, True)

        stream_id = f"dup-{uuid.uuid4()}"
        call = stub.PublishStream()
        for _ in range(2):
            await call.write(event(stream_id))
        await call.done_writing()
        acks = [ack async for ack in call]
        assert [(a.code, a.duplicate) for a in acks] == [(0, False), (0, True)]

    cli_id = f"dup-{uuid.uuid4()}"
    args = ("publish", "--config", str(daemon.config), "--type", "com.example.order.created", "--id", cli_id, "{}")
    code, out, err = await cli(*args)
    assert code == 0, err
    assert json.loads(out) == {"id": cli_id, "duplicate": False}
    code, out, err = await cli(*args)
    assert code == 0, err
    assert json.loads(out) == {"id": cli_id, "duplicate": True}


async def start_tail(*args: str, api_key: str | None = None) -> asyncio.subprocess.Process:
    """``mediator tail``, once it says it is subscribed (every event routed from then on reaches it)."""
    env = {**os.environ, **({"MEDIATOR_API_KEY": api_key} if api_key else {})}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "mediator", "tail", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, cwd=ROOT, env=env,
    )  # fmt: skip
    assert proc.stderr is not None
    async with asyncio.timeout(20):
        line = await proc.stderr.readline()
    assert b"tail: subscribed" in line, line
    return proc


async def test_cli_tail_sees_events_published_over_http_mqtt_and_the_cli(
    daemon: DaemonProcess, quickstart: Quickstart
) -> None:
    tail = await start_tail("--config", str(daemon.config), "--type", "com.example.*", "--json", "--count", "3")
    url = f"http://127.0.0.1:{quickstart.http_port}/orders"
    async with aiohttp.ClientSession() as http, http.post(url, json={"order": 7}) as resp:
        assert resp.status == 202
        http_id = (await resp.json())["id"]
    async with aiomqtt.Client("127.0.0.1", 1883) as mqtt:
        await mqtt.publish(f"{quickstart.topic_prefix}devices/dev5/telemetry", b'{"temp": 20}', qos=1)
    cli_id = f"cli-{uuid.uuid4()}"
    code, _, err = await cli(
        "publish", "--config", str(daemon.config), "--type", "com.example.order.created", "--id", cli_id,
        "--attr", "subject=hello", '{"order": 8}',
    )  # fmt: skip
    assert code == 0, err
    async with asyncio.timeout(20):
        out, err_rest = await tail.communicate()
    assert tail.returncode == 0, err_rest
    events = [json.loads(line) for line in out.decode().splitlines()]
    by_type: dict[str, list[dict[str, object]]] = {}
    for e in events:
        by_type.setdefault(str(e["type"]), []).append(e)
    orders = {e["id"]: e for e in by_type["com.example.order.created"]}
    assert orders[http_id]["data"] == {"order": 7}
    assert orders[cli_id]["data"] == {"order": 8}
    assert orders[cli_id]["subject"] == "hello"
    [telemetry] = by_type["com.example.device.telemetry"]
    assert telemetry["source"] == "mqtt://127.0.0.1/devices/dev5"


async def test_plain_endpoints_answer_404_and_405_as_json(daemon: DaemonProcess, quickstart: Quickstart) -> None:
    base = f"http://127.0.0.1:{quickstart.http_port}"
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{base}/nope") as resp:
            assert resp.status == 404
            assert resp.content_type == "application/json"
            assert (await resp.json())["error"] == "not_found"
        async with http.get(f"{base}/orders") as resp:
            assert resp.status == 405
            assert resp.content_type == "application/json"
            body = await resp.json()
            assert set(body) == {"error", "reason"}
            assert body["error"] == "method_not_allowed"
            assert "POST" in resp.headers["Allow"]
        async with http.post(f"{base}/healthz") as resp:
            assert resp.status == 405
            assert "GET" in resp.headers["Allow"]
            assert (await resp.json())["error"] == "method_not_allowed"


async def test_dead_letters_show_attempts_and_times_and_an_unknown_replay_is_refused(
    daemon: DaemonProcess, quickstart: Quickstart
) -> None:
    base = f"http://127.0.0.1:{quickstart.http_port}"
    async with aiohttp.ClientSession() as http:
        # Nothing is bound to the orders exchange: RabbitMQ returns the publish, a terminal failure.
        async with http.post(f"{base}/orders", json={"order": 9}) as resp:
            event_id = (await resp.json())["id"]
        async with asyncio.timeout(20):
            while True:
                async with http.get(f"{base}/admin/dead-letters") as resp:
                    mine = [dl for dl in (await resp.json())["dead_letters"] if dl["event_id"] == event_id]
                if mine:
                    break
                await asyncio.sleep(0.1)
        [letter] = mine
        assert letter["attempts"] == 1  # the one send that was tried
        assert letter["class"] == "unroutable"  # NO_ROUTE, as mediator_dead_letters_total counts it
        assert str(letter["at"]).endswith("Z")
        assert "T" in str(letter["at"])

        async with http.post(f"{base}/admin/dead-letters/replay", json={"ids": [987654321]}) as resp:
            assert resp.status == 404
            body = await resp.json()
            assert body["error"] == "not_found"
            assert "987654321" in body["reason"]

    code, out, err = await cli("dead-letters", "list", "--config", str(daemon.config), "--table")
    assert code == 0, err
    [row] = [line for line in out.splitlines() if event_id in line]
    assert "orders-exchange" in row
    assert "unroutable" in row.lower()
    assert row.split()[1].endswith("Z")  # the time, ISO 8601
    assert row.split()[6] == "1"  # ATTEMPTS
    assert row.split()[7] == "unroutable"  # CLASS
    code, out, err = await cli("dead-letters", "list", "--config", str(daemon.config), "--json")
    assert code == 0, err
    assert any(dl["event_id"] == event_id for dl in json.loads(out)["dead_letters"])

    code, out, err = await cli("dead-letters", "replay", "--config", str(daemon.config), "--id", "987654321")
    assert code == 1
    assert "404" in err
    assert "987654321" in err


@pytest.fixture
async def keyed_daemon(
    tmp_path: Path, rabbitmq: str, mosquitto: tuple[str, int]
) -> AsyncIterator[tuple[Quickstart, DaemonProcess, str]]:
    """The quickstart with an API key required on the gRPC listener."""
    key, digest = new_api_key()
    os.environ["FIRSTHOUR_KEYS"] = f'[[keys]]\nprincipal = "cli"\nsha256 = "{digest}"\n'
    quickstart = Quickstart(
        tmp_path,
        overrides={"listeners.grpc": {"auth": ["keys"]}},
        extra_toml='[auth.keys]\nkind = "api_key"\nkeys_env = "FIRSTHOUR_KEYS"\n',
    )
    proc = DaemonProcess(quickstart.write(), quickstart.http_port, tmp_path / "daemon.log")
    try:
        await proc.start()
        yield quickstart, proc, key
    finally:
        del os.environ["FIRSTHOUR_KEYS"]
        if proc.proc is not None:
            assert await proc.stop(signal.SIGTERM) == 0, proc.logs()


async def test_publish_and_tail_with_an_api_key(keyed_daemon: tuple[Quickstart, DaemonProcess, str]) -> None:
    quickstart, _daemon, key = keyed_daemon
    target = f"127.0.0.1:{quickstart.grpc_port}"
    publish = ("publish", "--target", target, "--type", "com.example.order.created", "x")
    code, _, err = await cli(*publish)
    assert code == 1
    assert "UNAUTHENTICATED" in err
    assert "--api-key" in err
    assert "Traceback" not in err

    tail = await start_tail("--target", target, "--type", "com.example.order.*", "--count", "1", api_key=key)
    code, out, err = await cli(*publish, "--id", "keyed-1", env={"MEDIATOR_API_KEY": key})
    assert code == 0, err
    assert json.loads(out)["id"] == "keyed-1"
    async with asyncio.timeout(20):
        out_tail, _ = await tail.communicate()
    [line] = out_tail.decode().splitlines()
    assert "com.example.order.created  keyed-1  /mediator/cli  x" in line


async def test_systemd_notify_ready_watchdog_and_stopping(
    quickstart: Quickstart, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    name = f"@mediator-firsthour-{uuid.uuid4().hex}"  # abstract namespace, as systemd's own sockets may be
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + name[1:])
    sock.setblocking(False)
    loop = asyncio.get_running_loop()
    monkeypatch.setenv("NOTIFY_SOCKET", name)
    monkeypatch.setenv("WATCHDOG_USEC", "400000")
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    proc = DaemonProcess(quickstart.write(), quickstart.http_port, tmp_path / "daemon.log")
    messages: list[str] = []

    async def until(state: str) -> None:
        async with asyncio.timeout(20):
            while not any(state in m.split("\n") for m in messages):
                messages.append((await loop.sock_recv(sock, 4096)).decode())

    try:
        await proc.start(wait_ready=False)
        await until("READY=1")
        ready = next(m for m in messages if "READY=1" in m)
        assert f"MAINPID={proc.pid}" in ready
        # READY=1 comes once the listeners are bound: the HTTP listener answers at once.
        async with aiohttp.ClientSession() as http, http.get(f"http://127.0.0.1:{quickstart.http_port}/healthz") as r:
            assert r.status == 200
        await until("WATCHDOG=1")
        assert proc.proc is not None
        proc.proc.send_signal(signal.SIGTERM)
        await until("STOPPING=1")
        assert await proc.stop() == 0
    finally:
        sock.close()
        await proc.kill()
