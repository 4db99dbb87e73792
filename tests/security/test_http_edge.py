"""Security at the HTTP edge, against a real listener over real sockets: slow and oversized request heads,
keep-alive, the connection cap, CORS, HTTPS and mTLS with certificate reload, the refusal headers, and who
may use the admin endpoints.

Clients are the aiohttp client, the ``ssl`` module, and raw asyncio streams where a test must control every
byte (slowloris, header floods). The sink is the ListSink fake of our own seam.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import ssl
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import structlog
from aiohttp import http_parser, web_protocol

from adapters.http import HttpInboundConfig, HttpListener, HttpListenerConfig, build
from mediator.core.errors import RateLimitState, RejectCode, Rejected
from mediator.core.health import Health
from mediator.core.ingress import ANONYMOUS, Origin, PeerCertificate, Principal
from mediator.core.seams import AdapterConfig, Runtime
from tests.support.certs import CA, make_ca, serial_of
from tests.support.fakes import ListSink
from tests.support.net import free_port, wait_until

# accept: these requests carry no Content-Type; the default (JSON only) is tested in tests/content/.
PLAIN = {"path": "/orders", "type": "com.example.order.created", "source": "/orders", "accept": ["*/*"]}
APP = "https://app.example.com"


@dataclass
class Edge:
    sink: ListSink
    listener: HttpListener
    runtime: Runtime
    port: int
    base: str


@contextlib.asynccontextmanager
async def serve(
    sink: ListSink | None = None,
    inbounds: Mapping[str, Mapping[str, Any]] | None = None,
    credential_headers: frozenset[str] = frozenset({"authorization"}),
    admin: Any = None,
    **listener: Any,
) -> AsyncIterator[Edge]:
    """Build the HTTP adapter from config sections and run its one listener until the block exits."""
    sink = sink or ListSink()
    lcfg = HttpListenerConfig.model_validate({"kind": "http", "port": free_port(), **listener})
    icfgs = {
        name: HttpInboundConfig.model_validate({"kind": "http", "listener": "web", **section})
        for name, section in (inbounds or {"orders": PLAIN}).items()
    }
    rt = Runtime(sink=sink, health=Health(), admin=admin, credential_headers=credential_headers)
    (service,) = build(AdapterConfig(listeners={"web": lcfg}, inbounds=icfgs), rt).services
    assert isinstance(service, HttpListener)
    task = asyncio.create_task(service.run(), name=service.name)
    try:
        async with asyncio.timeout(5):
            started = asyncio.create_task(service.started.wait())
            await asyncio.wait({task, started}, return_when=asyncio.FIRST_COMPLETED)
            started.cancel()
            if task.done():
                task.result()
        assert service.port is not None
        scheme = "https" if lcfg.tls is not None else "http"
        yield Edge(sink, service, rt, service.port, f"{scheme}://127.0.0.1:{service.port}")
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


@dataclass
class Reply:
    status: int
    headers: dict[str, str]  # lower-case names; the last value of a repeated header
    body: bytes
    vary: list[str] = field(default_factory=list)


async def read_reply(reader: asyncio.StreamReader, timeout_s: float = 5.0) -> Reply:
    async with asyncio.timeout(timeout_s):
        head = await reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ", 2)[1])
        headers: dict[str, str] = {}
        vary: list[str] = []
        for line in lines[1:]:
            if line:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
                if name.strip().lower() == "vary":
                    vary.append(value.strip())
        body = await reader.readexactly(int(headers.get("content-length", "0")))
        return Reply(status, headers, body, vary)


def request_bytes(
    path: str = "/orders", body: bytes = b"{}", headers: Sequence[tuple[str, str]] = (), method: str = "POST"
) -> bytes:
    head = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1"]
    head += [f"{k}: {v}" for k, v in headers]
    if method == "POST":
        head.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + (body if method == "POST" else b"")


async def closed_by_peer(reader: asyncio.StreamReader, timeout_s: float) -> bytes:
    """What the server sent until it closed the connection (a reset counts as closed)."""
    data = b""
    async with asyncio.timeout(timeout_s):
        try:
            while chunk := await reader.read(65536):
                data += chunk
        except ConnectionResetError:
            pass
    return data


async def close(writer: asyncio.StreamWriter) -> None:
    writer.close()
    with contextlib.suppress(OSError, ssl.SSLError):
        await writer.wait_closed()


# ---------------------------------------------------------------- slow and oversized heads


async def test_slowloris_is_closed_within_the_header_timeout_while_others_are_served() -> None:
    async with serve(header_timeout_s=3.0) as edge, aiohttp.ClientSession() as client:
        reader, writer = await asyncio.open_connection("127.0.0.1", edge.port)
        head = request_bytes()

        async def trickle() -> float:
            """One byte every 2 s; returns when the server closed the connection (seconds after byte 1)."""
            t0 = time.monotonic()
            for byte in head:
                try:
                    writer.write(bytes([byte]))
                    await writer.drain()
                except ConnectionError:
                    break
                if reader.at_eof():
                    break
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(2.0):
                        await reader.read(65536)  # returns b"" (or the 408) once the server closed
                        if reader.at_eof():
                            break
            return time.monotonic() - t0

        slow = asyncio.create_task(trickle())
        await asyncio.sleep(0.5)
        # Meanwhile an ordinary client is served at once.
        t = time.monotonic()
        async with client.post(edge.base + "/orders", data=b"{}") as resp:
            assert resp.status == 202
        assert time.monotonic() - t < 1.0
        elapsed = await asyncio.wait_for(slow, 10)
        assert 2.5 <= elapsed <= 4.5, elapsed  # within header_timeout_s (3 s) of the first byte, not sooner
        assert len(edge.sink.events) == 1  # only the ordinary client's request
        await close(writer)


async def test_the_header_timer_starts_at_a_requests_first_byte_not_at_connect() -> None:
    async with serve(header_timeout_s=1.0, keepalive_timeout_s=10.0) as edge:
        reader, writer = await asyncio.open_connection("127.0.0.1", edge.port)
        await asyncio.sleep(1.5)  # idle longer than the header timeout: no request has started
        writer.write(request_bytes(body=b"1"))
        assert (await read_reply(reader)).status == 202
        await asyncio.sleep(1.5)  # idle between two requests of a keep-alive connection: no head pending
        writer.write(request_bytes(body=b"2"))
        assert (await read_reply(reader)).status == 202
        # A second head split over segments, each well inside the timeout: served.
        data = request_bytes(body=b"3")
        for part in (data[:10], data[10:30], data[30:]):
            writer.write(part)
            await asyncio.sleep(0.3)
        assert (await read_reply(reader)).status == 202
        assert len(edge.sink.events) == 3
        await close(writer)


async def test_a_head_that_stalls_is_answered_408_and_closed() -> None:
    async with serve(header_timeout_s=1.0) as edge:
        reader, writer = await asyncio.open_connection("127.0.0.1", edge.port)
        writer.write(b"POST /orders HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # and then nothing
        t0 = time.monotonic()
        sent = await closed_by_peer(reader, 5)
        assert 0.8 <= time.monotonic() - t0 <= 2.5
        assert sent.startswith(b"HTTP/1.1 408 ")
        assert edge.sink.calls == 0
        await close(writer)


@pytest.fixture(params=["c", "python"])
def parser(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run the test with aiohttp's C (llhttp) request parser and with its pure-Python one (what
    AIOHTTP_NO_EXTENSIONS=1 selects): both must give the same answers."""
    if request.param == "python":
        monkeypatch.setattr(web_protocol, "HttpRequestParser", http_parser.HttpRequestParserPy)
    else:
        assert web_protocol.HttpRequestParser is http_parser.HttpRequestParserC  # type: ignore[attr-defined]
    return str(request.param)


async def exchange(port: int, data: bytes) -> Reply:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        return await read_reply(reader)
    finally:
        await close(writer)


async def test_an_oversized_header_is_431(parser: str) -> None:
    async with serve(max_header_bytes=1024) as edge:
        token = "Bearer " + "s3cr3t" * 300
        reader, writer = await asyncio.open_connection("127.0.0.1", edge.port)
        writer.write(request_bytes(headers=[("Authorization", token)]))
        reply = await read_reply(reader)
        assert reply.status == 431
        assert await closed_by_peer(reader, 5) == b""  # and the connection is closed
        await close(writer)
        body = json.loads(reply.body)
        assert body["error"] == "headers_too_large"
        assert "s3cr3t" not in reply.body.decode()  # never echo a header: it may be a credential
        # Just under the limit (name, ": " and value in 1024 bytes) passes.
        fits = await exchange(edge.port, request_bytes(headers=[("X-Pad", "v" * 1000)]))
        assert fits.status == 202
        assert edge.sink.calls == 1


async def test_too_many_headers_is_431_and_exactly_max_headers_pass(parser: str) -> None:
    async with serve(max_headers=20) as edge:
        # Host and Content-Length plus 18: exactly 20 header fields.
        at_limit = await exchange(edge.port, request_bytes(headers=[(f"X-H{i}", "v") for i in range(18)]))
        assert at_limit.status == 202
        over = await exchange(edge.port, request_bytes(headers=[(f"X-H{i}", "v") for i in range(19)]))
        assert over.status == 431
        assert json.loads(over.body)["error"] == "headers_too_large"
        flood = await exchange(edge.port, request_bytes(headers=[(f"X-H{i}", "v") for i in range(500)]))
        assert flood.status == 431
        assert edge.sink.calls == 1


async def test_an_oversized_request_target_is_414_not_431(parser: str) -> None:
    async with serve() as edge:
        reply = await exchange(edge.port, request_bytes(path="/orders?" + "q" * 9000))
        assert reply.status == 414


# ---------------------------------------------------------------- connections


async def test_an_idle_keepalive_connection_is_closed_after_keepalive_timeout() -> None:
    async with serve(keepalive_timeout_s=1.0) as edge:
        reader, writer = await asyncio.open_connection("127.0.0.1", edge.port)
        writer.write(request_bytes())
        reply = await read_reply(reader)
        assert reply.status == 202
        assert reply.headers.get("connection", "keep-alive").lower() != "close"
        t0 = time.monotonic()
        assert await closed_by_peer(reader, 5) == b""
        assert 0.7 <= time.monotonic() - t0 <= 3.0
        await close(writer)


async def test_connections_beyond_max_connections_get_503_and_are_closed() -> None:
    async with serve(max_connections=2) as edge:
        held = [await asyncio.open_connection("127.0.0.1", edge.port) for _ in range(2)]
        for reader, writer in held:
            writer.write(request_bytes())
            assert (await read_reply(reader)).status == 202
        assert edge.listener.open_connections == 2
        reader, writer = await asyncio.open_connection("127.0.0.1", edge.port)
        refused = await closed_by_peer(reader, 5)
        assert refused.startswith(b"HTTP/1.1 503 ")
        assert b"\r\nRetry-After: 1\r\n" in refused
        await close(writer)
        assert edge.listener.open_connections == 2  # the refused one was never counted
        # Once one closes, a new connection is served again.
        await close(held[0][1])
        await wait_until(lambda: edge.listener.open_connections == 1, 5, "the closed connection to be counted out")
        assert (await exchange(edge.port, request_bytes())).status == 202
        await close(held[1][1])


# ---------------------------------------------------------------- CORS


def preflight(origin: str, method: str = "POST", headers: str | None = None, path: str = "/orders") -> bytes:
    extra = [("Origin", origin), ("Access-Control-Request-Method", method)]
    if headers is not None:
        extra.append(("Access-Control-Request-Headers", headers))
    return request_bytes(path=path, headers=extra, method="OPTIONS")


async def test_without_cors_a_preflight_is_refused_and_no_cors_headers_are_sent() -> None:
    async with serve() as edge:
        reply = await exchange(edge.port, preflight(APP))
        assert reply.status == 403
        actual = await exchange(edge.port, request_bytes(headers=[("Origin", APP)]))
        assert actual.status == 202
        assert not [h for h in actual.headers if h.startswith("access-control-")]


async def test_cors_preflight_for_an_allowed_origin_and_refusals() -> None:
    cors = {"allow_origins": [APP], "allow_headers": ["Content-Type", "Authorization"], "max_age_s": 600}
    templated = {"path": "/devices/{device}", "type": "com.example.t", "source": "urn:{topic.1}", "accept": ["*/*"]}
    async with serve(cors=cors, inbounds={"orders": PLAIN, "devices": templated}) as edge:
        assert (await exchange(edge.port, preflight(APP, path="/devices/d-1"))).status == 204
        ok = await exchange(edge.port, preflight(APP, headers="content-type, authorization"))
        assert ok.status == 204
        assert ok.headers["access-control-allow-origin"] == APP
        assert ok.headers["access-control-allow-methods"] == "POST"
        assert ok.headers["access-control-allow-headers"] == "Content-Type, Authorization"
        assert ok.headers["access-control-max-age"] == "600"
        assert "access-control-allow-credentials" not in ok.headers
        assert "Origin" in ok.vary
        for refused in (
            preflight("https://evil.example.com"),
            preflight(APP, method="DELETE"),
            preflight(APP, headers="x-forbidden"),
        ):
            reply = await exchange(edge.port, refused)
            assert reply.status == 403
            assert "access-control-allow-origin" not in reply.headers
        unknown = await exchange(edge.port, preflight(APP, path="/nowhere"))
        assert unknown.status == 404
        assert edge.sink.calls == 0


async def test_cors_headers_on_actual_responses() -> None:
    async with serve(cors={"allow_origins": [APP], "allow_credentials": True}) as edge:
        ok = await exchange(edge.port, request_bytes(headers=[("Origin", APP)]))
        assert ok.status == 202
        assert ok.headers["access-control-allow-origin"] == APP
        assert ok.headers["access-control-allow-credentials"] == "true"
        assert "Origin" in ok.vary
        exposed = {h.strip() for h in ok.headers["access-control-expose-headers"].split(",")}
        assert {"RateLimit", "RateLimit-Policy", "Retry-After", "WWW-Authenticate"} <= exposed
        edge.sink.fail_with = Rejected(RejectCode.RATE_LIMITED, "slow down", retry_after_s=2)
        limited = await exchange(edge.port, request_bytes(headers=[("Origin", APP)]))
        assert limited.status == 429
        assert limited.headers["access-control-allow-origin"] == APP  # a browser script can read the refusal
        other = await exchange(edge.port, request_bytes(headers=[("Origin", "https://evil.example.com")]))
        assert "access-control-allow-origin" not in other.headers
        assert "Origin" in other.vary


async def test_cors_any_origin() -> None:
    async with serve(cors={"allow_origins": ["*"]}) as edge:
        pre = await exchange(edge.port, preflight("https://anyone.example"))
        assert (pre.status, pre.headers["access-control-allow-origin"]) == (204, "*")
        actual = await exchange(edge.port, request_bytes(headers=[("Origin", "https://anyone.example")]))
        assert (actual.status, actual.headers["access-control-allow-origin"]) == (202, "*")


def test_cors_config_refuses_any_origin_with_credentials() -> None:
    with pytest.raises(ValueError, match="explicit allow_origins"):
        HttpListenerConfig.model_validate({"cors": {"allow_origins": ["*"], "allow_credentials": True}})
    with pytest.raises(ValueError, match="without a path"):
        HttpListenerConfig.model_validate({"cors": {"allow_origins": ["https://app.example.com/"]}})


# ---------------------------------------------------------------- TLS


@dataclass
class Pki:
    ca: CA
    cert: Path
    key: Path
    client_cert: Path
    client_key: Path
    directory: Path

    def tls(self, **extra: Any) -> dict[str, Any]:
        return {"cert_file": str(self.cert), "key_file": str(self.key), **extra}

    def client_context(self, with_cert: bool = False) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=str(self.ca.cert_path))
        if with_cert:
            ctx.load_cert_chain(self.client_cert, self.client_key)
        return ctx


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    ca = make_ca(tmp_path, "edge-ca")
    cert, key = ca.issue(tmp_path / "server", cn="localhost", dns=("localhost",), ips=("127.0.0.1",))
    client_cert, client_key = ca.issue(
        tmp_path / "device",
        cn="device-7",
        dns=("device-7.fleet.example",),
        uris=("spiffe://example.org/device/7",),
        client=True,
    )
    return Pki(ca, cert, key, client_cert, client_key, tmp_path)


async def tls_connect(port: int, ctx: ssl.SSLContext) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, int]:
    """A TLS connection and the serial of the certificate the server presented on it."""
    reader, writer = await asyncio.wait_for(
        asyncio.open_connection("127.0.0.1", port, ssl=ctx, server_hostname="localhost"), 5
    )
    sslobj = writer.get_extra_info("ssl_object")
    der = sslobj.getpeercert(binary_form=True)
    return reader, writer, serial_of(der)


async def tls_post(port: int, ctx: ssl.SSLContext) -> Reply:
    reader, writer, _ = await tls_connect(port, ctx)
    try:
        writer.write(request_bytes())
        return await read_reply(reader)
    finally:
        await close(writer)


async def test_https_handshake_and_request(pki: Pki) -> None:
    async with serve(tls=pki.tls()) as edge:
        assert edge.base.startswith("https://")
        connector = aiohttp.TCPConnector(ssl=pki.client_context())
        async with (
            aiohttp.ClientSession(connector=connector) as client,
            client.post(edge.base + "/orders", data=b"{}") as resp,
        ):
            assert resp.status == 202
        assert edge.sink.origins[-1].certificate is None
        # Plain HTTP on the HTTPS port gets no HTTP answer.
        reader, writer = await asyncio.open_connection("127.0.0.1", edge.port)
        writer.write(request_bytes())
        assert not (await closed_by_peer(reader, 5)).startswith(b"HTTP/1.1 202")
        await close(writer)
        assert len(edge.sink.events) == 1


async def test_a_tls_handshake_that_stalls_is_closed_within_the_header_timeout(pki: Pki) -> None:
    async with serve(tls=pki.tls(), header_timeout_s=1.0) as edge:
        reader, writer = await asyncio.open_connection("127.0.0.1", edge.port)
        writer.write(b"\x16\x03\x01")  # the first bytes of a ClientHello record, and no more
        t0 = time.monotonic()
        await closed_by_peer(reader, 5)
        assert 0.8 <= time.monotonic() - t0 <= 3.0  # asyncio's own default would be 60 s
        await close(writer)
        assert (await tls_post(edge.port, pki.client_context())).status == 202


async def test_tls_min_version_13_refuses_a_tls12_client(pki: Pki) -> None:
    async with serve(tls=pki.tls(min_version="1.3")) as edge:
        old = pki.client_context()
        old.maximum_version = ssl.TLSVersion.TLSv1_2
        with pytest.raises((ssl.SSLError, ConnectionError)):
            await tls_post(edge.port, old)
        assert (await tls_post(edge.port, pki.client_context())).status == 202


async def test_mtls_required(pki: Pki, tmp_path: Path) -> None:
    tls = pki.tls(client_ca_file=str(pki.ca.cert_path), client_cert="required")
    async with serve(tls=tls) as edge:
        # Without a client certificate the handshake fails (TLS 1.3 reports it on the first read).
        with pytest.raises((ssl.SSLError, ConnectionError, asyncio.IncompleteReadError)):
            await tls_post(edge.port, pki.client_context())
        # A certificate from another CA is refused as well.
        stranger_ca = make_ca(tmp_path / "other", "stranger-ca")
        cert, key = stranger_ca.issue(tmp_path / "other" / "mallory", cn="device-7", client=True)
        stranger = pki.client_context()
        stranger.load_cert_chain(cert, key)
        with pytest.raises((ssl.SSLError, ConnectionError, asyncio.IncompleteReadError)):
            await tls_post(edge.port, stranger)
        assert edge.sink.calls == 0
        reply = await tls_post(edge.port, pki.client_context(with_cert=True))
        assert reply.status == 202
        assert edge.sink.origins[-1].certificate == PeerCertificate(
            uris=("spiffe://example.org/device/7",), dns=("device-7.fleet.example",), common_name="device-7"
        )
        assert edge.sink.origins[-1].peer == "127.0.0.1"


async def test_mtls_optional(pki: Pki) -> None:
    tls = pki.tls(client_ca_file=str(pki.ca.cert_path), client_cert="optional")
    async with serve(tls=tls) as edge:
        assert (await tls_post(edge.port, pki.client_context())).status == 202
        assert edge.sink.origins[-1].certificate is None
        assert (await tls_post(edge.port, pki.client_context(with_cert=True))).status == 202
        certificate = edge.sink.origins[-1].certificate
        assert certificate is not None
        assert certificate.common_name == "device-7"


async def test_certificate_reload_keeps_established_connections_and_serves_the_new_one(pki: Pki) -> None:
    tls = pki.tls(client_ca_file=str(pki.ca.cert_path), client_cert="optional")
    async with serve(tls=tls) as edge:
        (hook,) = edge.runtime.reload_hooks
        ctx = pki.client_context(with_cert=True)
        reader, writer, first = await tls_connect(edge.port, ctx)
        assert first == serial_of(pki.cert)
        writer.write(request_bytes(body=b"1"))
        assert (await read_reply(reader)).status == 202

        pki.ca.issue(pki.directory / "server", cn="localhost", dns=("localhost",), ips=("127.0.0.1",))
        second = serial_of(pki.cert)
        assert second != first
        hook()
        assert edge.listener.last_reload is not None
        assert await asyncio.wait_for(edge.listener.last_reload, 5) is True

        # The established keep-alive connection stays open and keeps working, on its old certificate.
        writer.write(request_bytes(body=b"2"))
        assert (await read_reply(reader)).status == 202
        assert serial_of(writer.get_extra_info("ssl_object").getpeercert(binary_form=True)) == first
        # A new connection gets the new certificate, and client certificates are still verified.
        r2, w2, seen = await tls_connect(edge.port, ctx)
        assert seen == second
        w2.write(request_bytes(body=b"3"))
        assert (await read_reply(r2)).status == 202
        assert edge.sink.origins[-1].certificate is not None
        await close(w2)
        await close(writer)
        assert len(edge.sink.events) == 3


async def test_a_failed_reload_is_logged_and_the_old_certificate_keeps_serving(pki: Pki, tmp_path: Path) -> None:
    async with serve(tls=pki.tls()) as edge:
        (hook,) = edge.runtime.reload_hooks
        serving = serial_of(pki.cert)
        # A new certificate written, its key not (yet): the pair does not match.
        elsewhere = tmp_path / "elsewhere"
        elsewhere.mkdir()
        new_cert, _ = pki.ca.issue(elsewhere / "server", cn="localhost", dns=("localhost",), ips=("127.0.0.1",))
        pki.cert.write_bytes(new_cert.read_bytes())
        with structlog.testing.capture_logs() as logs:
            hook()
            assert edge.listener.last_reload is not None
            assert await asyncio.wait_for(edge.listener.last_reload, 5) is False
        assert [e for e in logs if e["event"] == "tls.reload_failed"]
        _, writer, seen = await tls_connect(edge.port, pki.client_context())
        assert seen == serving
        await close(writer)
        # A missing key file: refused as well, still serving.
        pki.key.unlink()
        hook()
        assert edge.listener.last_reload is not None
        assert await asyncio.wait_for(edge.listener.last_reload, 5) is False
        assert (await tls_post(edge.port, pki.client_context())).status == 202


def test_plain_listeners_register_no_reload_hook() -> None:
    rt = Runtime(sink=ListSink(), health=Health())
    lcfg = HttpListenerConfig.model_validate({"port": free_port()})
    build(AdapterConfig(listeners={"web": lcfg}), rt)
    assert rt.reload_hooks == []


# ---------------------------------------------------------------- refusals and credentials


async def test_credentials_are_handed_over_in_order_and_never_echoed() -> None:
    names = frozenset({"authorization", "x-api-key"})
    async with serve(credential_headers=names) as edge:
        headers = [
            ("Authorization", "Bearer one"),
            ("X-Api-Key", "k1"),
            ("Authorization", "Bearer two"),
            ("X-Other", "o"),
        ]
        assert (await exchange(edge.port, request_bytes(headers=headers))).status == 202
        origin = edge.sink.origins[0]
        assert origin.inbound == "orders"
        assert origin.protocol == "http"
        assert origin.peer == "127.0.0.1"
        assert origin.credentials == (
            ("authorization", "Bearer one"),
            ("authorization", "Bearer two"),
            ("x-api-key", "k1"),
        )
        assert edge.sink.origins[-1] is origin  # the same Origin for authenticate and accept
        edge.sink.fail_with = Rejected(RejectCode.UNAUTHENTICATED, "unknown key", rule="keys")
        refused = await exchange(edge.port, request_bytes(headers=[("X-Api-Key", "k-secret-123")]))
        assert refused.status == 401
        assert b"k-secret-123" not in refused.body
        assert "k-secret-123" not in json.dumps(refused.headers)


async def test_401_is_answered_before_the_body_is_read() -> None:
    async with serve(read_timeout_s=30.0) as edge:
        edge.sink.fail_with = Rejected(RejectCode.UNAUTHENTICATED, "no credential")
        reader, writer = await asyncio.open_connection("127.0.0.1", edge.port)
        # The head announces a megabyte that never comes: a body read would wait out read_timeout_s.
        writer.write(b"POST /orders HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 1000000\r\n\r\n")
        t0 = time.monotonic()
        reply = await read_reply(reader, timeout_s=5)
        assert time.monotonic() - t0 < 2.0
        assert reply.status == 401
        assert reply.headers["www-authenticate"] == 'Bearer realm="mediator"'
        assert json.loads(reply.body) == {"error": "unauthenticated", "reason": "no credential"}
        assert edge.sink.calls == 0  # accept never ran
        await close(writer)


async def test_refusal_headers() -> None:
    async with serve() as edge:
        edge.sink.fail_with = Rejected(RejectCode.UNAUTHENTICATED, "bad key", challenge='ApiKey realm="fleet"')
        r401 = await exchange(edge.port, request_bytes())
        assert (r401.status, r401.headers["www-authenticate"]) == (401, 'ApiKey realm="fleet"')

        edge.sink.fail_with = Rejected(RejectCode.FORBIDDEN, "not yours", rule="billing-only")
        r403 = await exchange(edge.port, request_bytes())
        assert r403.status == 403
        assert json.loads(r403.body) == {"error": "forbidden", "reason": "not yours"}
        assert "www-authenticate" not in r403.headers

        limit = RateLimitState(policy="per-caller", quota=100, window_s=60.0, remaining=0, reset_s=12.2)
        edge.sink.fail_with = Rejected(RejectCode.RATE_LIMITED, "too fast", retry_after_s=12.2, limit=limit)
        r429 = await exchange(edge.port, request_bytes())
        assert r429.status == 429
        assert r429.headers["retry-after"] == "13"
        assert r429.headers["ratelimit-policy"] == '"per-caller";q=100;w=60'
        assert r429.headers["ratelimit"] == '"per-caller";r=0;t=13'
        assert json.loads(r429.body)["error"] == "rate_limited"

        odd = RateLimitState(policy='a"b\\c\u00e9', quota=5, window_s=0.25, remaining=-1, reset_s=0.1)
        edge.sink.fail_with = Rejected(RejectCode.RATE_LIMITED, "too fast", retry_after_s=0.1, limit=odd)
        rodd = await exchange(edge.port, request_bytes())
        assert rodd.headers["retry-after"] == "1"  # at least one second
        assert rodd.headers["ratelimit-policy"] == '"a\\"b\\\\c";q=5;w=1'  # sf-string escaped, window >= 1 s
        assert rodd.headers["ratelimit"] == '"a\\"b\\\\c";r=0;t=1'

        edge.sink.fail_with = Rejected(RejectCode.RATE_LIMITED, "too fast")
        bare = await exchange(edge.port, request_bytes())
        assert (bare.status, bare.headers["retry-after"]) == (429, "1")
        assert "ratelimit" not in bare.headers


# ---------------------------------------------------------------- admin


class FakeAdmin:
    async def dead_letters(self, limit: int) -> list[dict[str, object]]:
        return [{"id": 1, "reason": "test"}]

    async def replay(self, ids: Sequence[int] | None) -> int:
        return 0 if ids is None else len(ids)


class RoleSink(ListSink):
    """Bearer tokens mapped to principals; anything else anonymous, an unknown token refused."""

    PRINCIPALS = {
        "ops-token": Principal("ops", "user", "tokens", roles=frozenset({"admin"})),
        "dev-token": Principal("dev", "user", "tokens", roles=frozenset({"publisher"})),
    }

    async def authenticate(self, origin: Origin) -> Principal:
        self.origins.append(origin)
        for name, value in origin.credentials:
            if name == "authorization":
                principal = self.PRINCIPALS.get(value.removeprefix("Bearer "))
                if principal is None:
                    raise Rejected(RejectCode.UNAUTHENTICATED, "unknown token", challenge='Bearer realm="ops"')
                origin.principal = principal
                return principal
        origin.principal = Principal("", ANONYMOUS, "anonymous")
        return origin.principal


async def admin_status(edge: Edge, authorization: str | None = None) -> int:
    headers = [("Authorization", authorization)] if authorization is not None else []
    return (await exchange(edge.port, request_bytes("/admin/dead-letters", headers=headers, method="GET"))).status


async def test_admin_by_role_when_the_listener_authenticates() -> None:
    sink = RoleSink()
    async with serve(sink=sink, admin=FakeAdmin(), auth=["tokens"]) as edge:
        assert await admin_status(edge, "Bearer ops-token") == 200
        assert sink.origins[-1].inbound == "listener:web"
        assert await admin_status(edge, "Bearer dev-token") == 403  # authenticated, not an admin
        assert await admin_status(edge) == 401  # anonymous
        reply = await exchange(
            edge.port, request_bytes("/admin/dead-letters", headers=[("Authorization", "Bearer nope")], method="GET")
        )
        assert (reply.status, reply.headers["www-authenticate"]) == (401, 'Bearer realm="ops"')
        replay = await exchange(edge.port, request_bytes("/admin/dead-letters/replay", b'{"ids": [1, 2]}'))
        assert replay.status == 401


async def test_admin_token_is_still_one_way_in(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EDGE_ADMIN_TOKEN", "t0ken")
    sink = RoleSink()
    async with serve(sink=sink, admin=FakeAdmin(), auth=["tokens"], admin_token_env="EDGE_ADMIN_TOKEN") as edge:
        assert await admin_status(edge, "Bearer t0ken") == 200
        assert await admin_status(edge, "Bearer ops-token") == 200
        assert await admin_status(edge, "Bearer dev-token") == 403
    async with serve(admin=FakeAdmin(), admin_token_env="EDGE_ADMIN_TOKEN") as edge:  # no auth: token only
        assert await admin_status(edge, "Bearer t0ken") == 200
        assert await admin_status(edge) == 401
        assert await admin_status(edge, "Bearer wr0ng") == 401
        assert await admin_status(edge, "Bearer t\u00f6ken") == 401  # not ASCII: refused, not a 500
        assert edge.sink.origins == []  # without auth the sink is not asked


async def test_admin_open_on_loopback_without_auth_or_token() -> None:
    async with serve(admin=FakeAdmin()) as edge:
        assert await admin_status(edge) == 200


def test_edge_settings_have_defaults_and_descriptions() -> None:
    cfg = HttpListenerConfig()
    assert (cfg.header_timeout_s, cfg.keepalive_timeout_s) == (10.0, 15.0)
    assert (cfg.max_header_bytes, cfg.max_headers, cfg.max_connections) == (8190, 100, 1024)
    assert cfg.cors is None
    fields = HttpListenerConfig.model_fields
    for name in (
        "header_timeout_s",
        "keepalive_timeout_s",
        "max_header_bytes",
        "max_headers",
        "max_connections",
        "cors",
    ):
        assert fields[name].description, name
    with pytest.raises(ValueError, match="greater than 0"):
        HttpListenerConfig.model_validate({"header_timeout_s": 0})


def test_admin_off_loopback_needs_a_token_or_auth() -> None:
    with pytest.raises(ValueError, match="admin_token_env or auth"):
        HttpListenerConfig.model_validate({"host": "0.0.0.0"})
    assert HttpListenerConfig.model_validate({"host": "0.0.0.0", "auth": ["tokens"]}).auth == ["tokens"]
