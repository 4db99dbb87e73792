"""Run the real daemon as a subprocess, the way an operator does: ``python -m mediator run --config``."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import sys
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

from tests.support.net import free_port, unique

ROOT = Path(__file__).resolve().parents[2]

# (exchanges, queues) that daemons of this test session may have declared, durable, on a RabbitMQ:
# removed from the shared one when the session ends (tests/conftest.py), so runs do not pile them up.
_declared: list[tuple[list[str], list[str]]] = []


async def remove_declared(url: str) -> None:
    """Delete every exchange and queue a Quickstart of this session named, on the broker at ``url``
    (one channel per deletion: a name that was never declared must not stop the rest)."""
    import aio_pika

    connection = await aio_pika.connect(url, timeout=5)
    try:
        for exchanges, queues in _declared:
            for name, is_queue in [(q, True) for q in queues] + [(e, False) for e in exchanges]:
                try:
                    channel = await connection.channel()
                    if is_queue:
                        await channel.queue_delete(name)
                    else:
                        await channel.exchange_delete(name)
                    await channel.close()
                except aio_pika.exceptions.AMQPError:
                    continue
    finally:
        await connection.close()
    _declared.clear()


@dataclass
class Quickstart:
    """The shipped config.toml, moved onto free ports and unique broker names so tests never collide."""

    tmp: Path
    uid: str = field(default_factory=lambda: unique("t"))
    http_port: int = field(default_factory=free_port)
    grpc_port: int = field(default_factory=free_port)
    registry_port: int = field(default_factory=free_port)
    mqtt_port: int = 1883
    amqp_port: int = 5672
    outbox: str = "sqlite"
    # Fault tests: where the outbox file lives (default: tmp/outbox.sqlite), the back-pressure threshold
    # (default: the shipped value), and TOML appended verbatim (more outbounds, more [[routes]]).
    outbox_path: Path | None = None
    max_pending: int | None = None
    extra_toml: str = ""
    # Keys to set, by section: {"brokers.rabbit": {"heartbeat_s": 2}, "outbound.mqtt": {"send_timeout_s": 3.0}}.
    # A key the section has is replaced; any other is added under the section's header.
    overrides: dict[str, dict[str, object]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        u = self.uid
        self.orders_exchange = f"orders-{u}"
        self.telemetry_exchange = f"telemetry-{u}"
        self.commands_exchange = f"commands-{u}"
        self.commands_queue = f"mediator.commands-{u}"
        self.topic_prefix = f"{u}/"
        self.rpc_queue = f"rpc.echo-{u}"
        self.rpc_topic = f"{u}/rpc/price"
        self.rpc_request_topic = f"{u}/rpc/echo"
        _declared.append(
            (
                [self.orders_exchange, self.telemetry_exchange, self.commands_exchange],
                [self.commands_queue, self.rpc_queue],
            )
        )

    def render(self) -> str:
        text = (ROOT / "config.toml").read_text()
        u = self.uid
        replacements = [
            ("127.0.0.1:5672/", f"127.0.0.1:{self.amqp_port}/"),
            ('path = "var/outbox.sqlite"', f'path = "{self.tmp / "outbox.sqlite"}"'),
            ('kind = "sqlite"', f'kind = "{self.outbox}"'),
            ('client_id = "mediator"', f'client_id = "mediator-{u}"'),
            ('exchange = "orders"', f'exchange = "{self.orders_exchange}"'),
            ('exchange = "telemetry"', f'exchange = "{self.telemetry_exchange}"'),
            ('exchange = "commands"', f'exchange = "{self.commands_exchange}"'),
            ('queue = "mediator.commands"', f'queue = "{self.commands_queue}"'),
            ('"devices/+/telemetry"', f'"{self.topic_prefix}devices/+/telemetry"'),
            ("{topic.1}", "{topic.2}"),
            ('address = "orders/created"', f'address = "{self.topic_prefix}orders/created"'),
            ('address = "devices/{topic}/commands"', f'address = "{self.topic_prefix}devices/{{topic}}/commands"'),
            ('queues = ["rpc.echo"]', f'queues = ["{self.rpc_queue}"]'),
            ('address = "rpc.echo"', f'address = "{self.rpc_queue}"'),
            ('address = "rpc/price"', f'address = "{self.rpc_topic}"'),
            ('topics = ["rpc/echo"]', f'topics = ["{self.rpc_request_topic}"]'),
        ]
        # The ports in one pass, whole numbers only: a port put in by one replacement must never be matched
        # by the next (an HTTP port 18834 read as "port = 1883" then "4" became the test Mosquitto's + "4").
        ports = {"8080": self.http_port, "50051": self.grpc_port, "1883": self.mqtt_port, "8081": self.registry_port}
        for shipped in ports:
            if not re.search(rf"port = {shipped}\b", text):
                raise AssertionError(f"config.toml has no 'port = {shipped}'; update tests/support/daemon.py")
        text = re.sub(r"port = (8080|8081|50051|1883)\b", lambda m: f"port = {ports[m.group(1)]}", text)
        for old, new in replacements:
            if old not in text:
                raise AssertionError(f"config.toml no longer contains {old!r}; update tests/support/daemon.py")
            text = text.replace(old, new)
        if self.outbox_path is not None:
            text = text.replace(f'path = "{self.tmp / "outbox.sqlite"}"', f'path = "{self.outbox_path}"')
        if self.max_pending is not None:
            if "max_pending = 20000" not in text:
                raise AssertionError("config.toml no longer contains 'max_pending = 20000'; update Quickstart")
            text = text.replace("max_pending = 20000", f"max_pending = {self.max_pending}")
        for section, keys in self.overrides.items():
            text = _override(text, section, keys)
        if self.extra_toml:
            text += "\n" + self.extra_toml
        return text

    @property
    def outbox_file(self) -> Path:
        """The SQLite outbox file the rendered config names."""
        return self.outbox_path if self.outbox_path is not None else self.tmp / "outbox.sqlite"

    def write(self) -> Path:
        path = self.tmp / "config.toml"
        path.write_text(self.render())
        return path


def toml_value(value: object) -> str:
    """A TOML literal for the values overrides use: bool, int, float, str, and inline tables of them."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a valid TOML basic string
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {toml_value(v)}" for k, v in value.items()) + " }"
    if isinstance(value, list | tuple):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    raise TypeError(f"no TOML literal for {value!r}")


def _override(text: str, section: str, keys: dict[str, object]) -> str:
    lines = text.split("\n")
    header = f"[{section}]"
    try:
        start = next(i for i, line in enumerate(lines) if line.split("#", 1)[0].strip() == header)
    except StopIteration:
        raise AssertionError(f"config.toml has no section {header}; update the test's overrides") from None
    end = next((i for i in range(start + 1, len(lines)) if lines[i].lstrip().startswith("[")), len(lines))
    for key, value in keys.items():
        line = f"{key} = {toml_value(value)}"
        found = next((i for i in range(start + 1, end) if re.match(rf"{re.escape(key)}\s*=", lines[i])), None)
        if found is None:
            lines.insert(start + 1, line)
            end += 1
        else:
            lines[found] = line
    return "\n".join(lines)


class DaemonProcess:
    def __init__(self, config: Path, http_port: int, log: Path) -> None:
        self.config = config
        self.http_port = http_port
        self.log_path = log
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self, wait_ready: bool = True, timeout_s: float = 60.0) -> None:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        with self.log_path.open("ab") as log:
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "mediator",
                "run",
                "--config",
                str(self.config),
                stdout=log,
                stderr=log,
                cwd=ROOT,
                env=env,
            )
        if wait_ready:
            try:
                await self.wait_ready(timeout_s)
            except BaseException:
                # Never leave a daemon behind that was not ready: the test's teardown (which only runs once
                # start returned) would not stop it, and it would hold its ports and load the machine.
                await self.kill()
                raise

    async def wait_ready(self, timeout_s: float = 60.0) -> None:
        """Until /readyz answers 200; fails with the last answer and the log's tail (what it saw)."""
        url = f"http://127.0.0.1:{self.http_port}/readyz"
        last = "no answer"
        try:
            async with asyncio.timeout(timeout_s), aiohttp.ClientSession() as session:
                while True:
                    if self.proc is not None and self.proc.returncode is not None:
                        raise AssertionError(f"daemon exited with {self.proc.returncode}:\n{self.logs()}")
                    try:
                        async with session.get(url) as resp:
                            if resp.status == 200:
                                return
                            last = f"{resp.status} {(await resp.text())[:2000]}"
                    except aiohttp.ClientError as exc:
                        last = f"no answer ({exc.__class__.__name__})"
                    await asyncio.sleep(0.1)
        except TimeoutError:
            raise AssertionError(
                f"daemon not ready after {timeout_s} s; /readyz: {last}\n{self.logs()[-6000:]}"
            ) from None

    async def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 30.0) -> int:
        assert self.proc is not None
        if self.proc.returncode is None:
            self.proc.send_signal(sig)
        async with asyncio.timeout(timeout_s):
            return await self.proc.wait()

    async def kill(self) -> None:
        assert self.proc is not None
        if self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()

    @property
    def pid(self) -> int | None:
        return None if self.proc is None else self.proc.pid

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace")[-20000:]
