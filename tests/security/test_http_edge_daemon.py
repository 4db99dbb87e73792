"""The HTTPS listener inside the real daemon (``python -m mediator run``): SIGHUP re-reads its certificate,
new connections get the new one while an established keep-alive connection carries on with the old."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import ssl
import time
from pathlib import Path

import pytest

from tests.support.certs import make_ca, serial_of
from tests.support.daemon import DaemonProcess, Quickstart
from tests.support.net import free_port

pytestmark = pytest.mark.broker  # the shipped config's outbounds connect to the shared brokers


async def connect(port: int, ctx: ssl.SSLContext) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, int]:
    reader, writer = await asyncio.wait_for(
        asyncio.open_connection("127.0.0.1", port, ssl=ctx, server_hostname="localhost"), 5
    )
    return reader, writer, serial_of(writer.get_extra_info("ssl_object").getpeercert(binary_form=True))


async def healthz(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bytes:
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n")
    async with asyncio.timeout(5):
        head = await reader.readuntil(b"\r\n\r\n")
        length = next(
            int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")
        )
        await reader.readexactly(length)
    return head.split(b"\r\n", 1)[0]


async def test_sighup_reloads_the_listener_certificate(
    tmp_path: Path, rabbitmq: str, mosquitto: tuple[str, int]
) -> None:
    ca = make_ca(tmp_path, "daemon-ca")
    cert, key = ca.issue(tmp_path / "server", cn="localhost", dns=("localhost",), ips=("127.0.0.1",))
    port = free_port()
    qs = Quickstart(
        tmp_path,
        extra_toml=f"""
[listeners.secure]
kind = "http"
port = {port}
admin = false

[listeners.secure.tls]
cert_file = "{cert}"
key_file = "{key}"
""",
    )
    daemon = DaemonProcess(qs.write(), qs.http_port, tmp_path / "daemon.log")
    await daemon.start()
    try:
        ctx = ssl.create_default_context(cafile=str(ca.cert_path))
        reader, writer, first = await connect(port, ctx)
        assert first == serial_of(cert)
        assert await healthz(reader, writer) == b"HTTP/1.1 200 OK"

        ca.issue(tmp_path / "server", cn="localhost", dns=("localhost",), ips=("127.0.0.1",))
        second = serial_of(cert)
        assert daemon.proc is not None
        daemon.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while True:
            _, w, seen = await connect(port, ctx)
            w.close()
            if seen == second:
                break
            assert time.monotonic() < deadline, f"still serving {seen} after SIGHUP:\n{daemon.logs()}"
            await asyncio.sleep(0.1)
        # The connection opened before the reload stayed open and still works.
        assert await healthz(reader, writer) == b"HTTP/1.1 200 OK"
        writer.close()
        with contextlib.suppress(OSError, ssl.SSLError):
            await writer.wait_closed()
        assert "tls.reload_failed" not in daemon.logs()
    finally:
        assert await daemon.stop() == 0, daemon.logs()
