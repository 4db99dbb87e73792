"""Signed webhooks out, verified webhooks in, and the CloudEvents abuse-protection handshake both ways:
the real daemon, real HTTP clients, an aiohttp receiver the test runs (which verifies with the
``standardwebhooks`` package, the Standard Webhooks reference library), and consumers on the shared
RabbitMQ that must see exactly what was accepted."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import os
import signal
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import aio_pika
import aiohttp
import pytest
from aio_pika.abc import AbstractIncomingMessage, AbstractQueue
from aiohttp import web
from standardwebhooks import Webhook
from standardwebhooks.webhooks import WebhookVerificationError

from tests.e2e.test_quickstart import bound_queue
from tests.observability.test_metrics_e2e import parse, value
from tests.support.daemon import DaemonProcess, Quickstart
from tests.support.net import RABBIT_URL, free_port

pytestmark = pytest.mark.timeout(120)

OUT = "com.example.webhook.out"
CONSENTED = "com.example.handshake.ok"
REFUSED = "com.example.handshake.refused"
SENDER = "sender.example.com"  # what the test's sender calls itself in the handshake
MEDIATOR = "mediator.test"  # what the daemon's outbounds call themselves


def whsec() -> str:
    return "whsec_" + base64.b64encode(os.urandom(32)).decode()


@dataclass
class Receiver:
    """The webhook target: records every request; /refused answers the handshake without consent until
    ``consent_refused`` is set; /signed answers 503 to the first attempt of the ids in ``fail_once``."""

    posts: dict[str, list[tuple[dict[str, str], bytes]]] = field(default_factory=dict)
    options: dict[str, list[dict[str, str]]] = field(default_factory=dict)
    fail_once: set[str] = field(default_factory=set)
    consent_refused: bool = False
    runner: web.AppRunner | None = None
    port: int = 0

    async def handle(self, request: web.Request) -> web.Response:
        headers = {k.lower(): v for k, v in request.headers.items()}
        if request.method == "OPTIONS":
            self.options.setdefault(request.path, []).append(headers)
            if request.path == "/consented" or (request.path == "/refused" and self.consent_refused):
                origin = headers.get("webhook-request-origin", "")
                return web.Response(headers={"WebHook-Allowed-Origin": origin, "WebHook-Allowed-Rate": "600"})
            return web.Response(status=200)  # no WebHook-Allowed-Origin: no consent
        body = await request.read()
        self.posts.setdefault(request.path, []).append((headers, body))
        event_id = headers.get("ce-id", "")
        if event_id in self.fail_once:
            self.fail_once.discard(event_id)
            return web.Response(status=503)
        return web.Response(status=204)

    async def start(self) -> None:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self.handle)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        self.port = free_port()
        await web.TCPSite(self.runner, "127.0.0.1", self.port).start()

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()

    async def wait_posts(self, path: str, count: int, timeout_s: float = 20.0) -> list[tuple[dict[str, str], bytes]]:
        deadline = time.monotonic() + timeout_s
        while len(self.posts.get(path, [])) < count:
            assert time.monotonic() < deadline, f"{path}: {len(self.posts.get(path, []))} of {count} requests"
            await asyncio.sleep(0.05)
        return self.posts[path]


def extra_toml(receiver: int) -> str:
    target = f"http://127.0.0.1:{receiver}"
    return f"""
[auth.hooks]
kind = "webhook"
scheme = "standard-webhooks"
secrets_env = ["T_HOOK_IN"]
principal = "hooks-sender"

[auth.github]
kind = "webhook"
scheme = "github"
secrets_env = ["T_GITHUB_SECRET"]
principal = "github"

[auth.partner]
kind = "webhook"
scheme = "hmac"
header = "X-Partner-Signature"
encoding = "base64"
secrets_env = ["T_PARTNER_SECRET"]
principal = "partner"

[inbound.signed]
kind = "http"
listener = "http"
path = "/hooks/standard"
type = "com.example.hook.received"
source = "/hooks/standard"
auth = ["hooks"]
allow_anonymous = false

[inbound.github]
kind = "http"
listener = "http"
path = "/hooks/github"
type = "com.github.push"
source = "https://github.com"
auth = ["github"]
allow_anonymous = false

[inbound.partner]
kind = "http"
listener = "http"
path = "/hooks/partner"
type = "com.example.partner.event"
source = "/hooks/partner"
auth = ["partner"]
allow_anonymous = false

[inbound.signed-ce]
kind = "http"
listener = "http"
path = "/hooks/ce"
mode = "cloudevents"
auth = ["hooks"]
allow_anonymous = false
handshake = {{ allowed_origins = ["{SENDER}"], allowed_rate = 120 }}

[outbound.webhook]
kind = "http"
url = "{target}"
sign = {{ kind = "standard-webhooks", secrets_env = ["T_HOOK_NEW", "T_HOOK_OLD"] }}
retry = {{ backoff_initial_s = 2.2, backoff_max_s = 3.0 }}  # first retry after 1.1-2.2 s: a later second

[outbound.consented]
kind = "http"
url = "{target}"
handshake = true
handshake_origin = "{MEDIATOR}"
handshake_rate = 600

[outbound.refusing]
kind = "http"
url = "{target}"
handshake = true
handshake_origin = "{MEDIATOR}"
handshake_retry_s = 0.5

[[routes]]
name = "hooks-in"
match = {{ inbound = ["signed", "github", "partner", "signed-ce"] }}
to = [{{ outbound = "orders-exchange", address = "hooks.{{authid}}" }}]

[[routes]]
name = "to-webhook"
match = {{ type = ["{OUT}"] }}
to = [{{ outbound = "webhook", address = "/signed" }}]

[[routes]]
name = "to-consented"
match = {{ type = ["{CONSENTED}"] }}
to = [{{ outbound = "consented", address = "/consented" }}]

[[routes]]
name = "to-refused"
match = {{ type = ["{REFUSED}"] }}
to = [{{ outbound = "refusing", address = "/refused" }}]
"""


@dataclass
class Hooks:
    daemon: DaemonProcess
    quickstart: Quickstart
    receiver: Receiver
    base: str
    secrets: dict[str, str]

    async def publish(self, http: aiohttp.ClientSession, type_: str, data: bytes, event_id: str) -> None:
        headers = {
            "ce-specversion": "1.0",
            "ce-id": event_id,
            "ce-source": "/webhook-test",
            "ce-type": type_,
            "Content-Type": "application/json",
        }
        async with http.post(self.base + "/events", data=data, headers=headers) as resp:
            assert resp.status == 202, await resp.text()

    async def metrics(self, http: aiohttp.ClientSession) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
        async with http.get(self.base + "/metrics") as resp:
            assert resp.status == 200
            return parse(await resp.text())


@pytest.fixture
async def hooks(tmp_path: Path, rabbitmq: str, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Hooks]:
    secrets = {
        "T_HOOK_IN": whsec(),
        "T_HOOK_NEW": whsec(),
        "T_HOOK_OLD": whsec(),
        "T_GITHUB_SECRET": "gh-" + uuid.uuid4().hex,
        "T_PARTNER_SECRET": "partner-" + uuid.uuid4().hex,
    }
    for name, secret in secrets.items():
        monkeypatch.setenv(name, secret)
    receiver = Receiver()
    await receiver.start()
    qs = Quickstart(tmp_path, extra_toml=extra_toml(receiver.port))
    proc = DaemonProcess(qs.write(), qs.http_port, tmp_path / "daemon.log")
    await proc.start()
    try:
        yield Hooks(proc, qs, receiver, f"http://127.0.0.1:{qs.http_port}", secrets)
    finally:
        code = await proc.stop(signal.SIGTERM)
        await receiver.stop()
        assert code == 0, proc.logs()
        logs = proc.logs()
        for name, secret in secrets.items():
            assert secret not in logs, f"{name} reached the log"


def standard_headers(secret: str, msg_id: str, timestamp: int, body: bytes) -> dict[str, str]:
    """Signed by the reference library, as a Standard Webhooks sender does."""
    signature = Webhook(secret).sign(msg_id, datetime.fromtimestamp(timestamp, tz=UTC), body.decode())
    return {"webhook-id": msg_id, "webhook-timestamp": str(timestamp), "webhook-signature": signature}


def github_signature(secret: str, body: bytes) -> str:
    """As GitHub documents it: "sha256=" + the hex HMAC-SHA256 of the payload with the webhook's secret."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


async def drain_until(queue: AbstractQueue, sentinel: bytes, timeout_s: float = 20.0) -> list[AbstractIncomingMessage]:
    """Every message up to and including the one whose body contains ``sentinel``, then whatever else is
    already queued (the sentinel was accepted after everything before it)."""
    got: list[AbstractIncomingMessage] = []
    deadline = time.monotonic() + timeout_s
    while not any(sentinel in m.body for m in got):
        assert time.monotonic() < deadline, f"the sentinel never arrived; got {[m.body for m in got]}"
        msg = await queue.get(fail=False)
        if msg is None:
            await asyncio.sleep(0.05)
            continue
        await msg.ack()
        got.append(msg)
    while (msg := await queue.get(fail=False)) is not None:
        await msg.ack()
        got.append(msg)
    return got


async def test_outbound_signs_each_delivery_verified_with_either_rotated_secret(hooks: Hooks) -> None:
    receiver = hooks.receiver
    retried = uuid.uuid4().hex
    receiver.fail_once.add(retried)
    ids = [uuid.uuid4().hex for _ in range(3)] + [retried]
    async with aiohttp.ClientSession() as http:
        for n, event_id in enumerate(ids):
            await hooks.publish(http, OUT, json.dumps({"n": n, "text": "h\u00e9 \u2713"}).encode(), event_id)
    posts = await receiver.wait_posts("/signed", len(ids) + 1)  # the retried one twice
    new, old = Webhook(hooks.secrets["T_HOOK_NEW"]), Webhook(hooks.secrets["T_HOOK_OLD"])
    stranger = Webhook(whsec())
    seen: dict[str, list[int]] = {}
    for headers, body in posts:
        # Both secrets verify (a receiver mid-rotation holds either); another secret does not.
        assert new.verify(body, headers, json_parse=False) is None
        assert old.verify(body, headers, json_parse=False) is None
        with pytest.raises(WebhookVerificationError):
            stranger.verify(body, headers)
        assert headers["webhook-id"] == headers["ce-id"], "webhook-id is the event id"
        assert len(headers["webhook-signature"].split(" ")) == 2, headers["webhook-signature"]
        seen.setdefault(headers["webhook-id"], []).append(int(headers["webhook-timestamp"]))
        assert abs(time.time() - int(headers["webhook-timestamp"])) < 60
    assert set(seen) == set(ids), seen
    assert all(len(v) == 1 for k, v in seen.items() if k != retried), seen
    first, second = seen[retried]
    assert second > first, f"the retry's timestamp is its own attempt's: {seen[retried]}"  # backoff >= 1.1 s
    # A body tampered with after signing is caught by the receiver.
    headers, body = posts[0]
    with pytest.raises(WebhookVerificationError):
        new.verify(body.replace(b'"n"', b'"N"'), headers)


async def test_inbound_refuses_bad_stale_and_replayed_signatures_and_commits_nothing(hooks: Hooks) -> None:
    secret = hooks.secrets["T_HOOK_IN"]
    url = hooks.base + "/hooks/standard"
    conn = await aio_pika.connect(RABBIT_URL)
    async with conn, aiohttp.ClientSession() as http:
        channel = await conn.channel()
        queue = await bound_queue(channel, hooks.quickstart.orders_exchange, "hooks.#")
        before = await hooks.metrics(http)

        async def post(body: bytes, headers: dict[str, str]) -> tuple[int, str]:
            async with http.post(url, data=body, headers={"Content-Type": "application/json", **headers}) as r:
                return r.status, await r.text()

        now = int(time.time())
        good_body = b'{"ok": 1}'
        good = standard_headers(secret, "msg_" + uuid.uuid4().hex, now, good_body)
        status, text = await post(good_body, good)
        assert status == 202
        assert json.loads(text) == {"id": good["webhook-id"]}, "the verified webhook-id names the event"
        forged_body = b'{"refused": "forged"}'
        cases = {
            "signed with another secret": (forged_body, standard_headers(whsec(), "msg_a", now, forged_body)),
            "signature of another body": (forged_body, standard_headers(secret, "msg_b", now, b'{"other": 1}')),
            "timestamp outside the tolerance": (
                b'{"refused": "stale"}',
                standard_headers(secret, "msg_c", now - 400, b'{"refused": "stale"}'),
            ),
            "timestamp in the future": (
                b'{"refused": "future"}',
                standard_headers(secret, "msg_d", now + 400, b'{"refused": "future"}'),
            ),
            "replay of an accepted message": (good_body.replace(b"ok", b"ok"), good),
            "no signature headers": (b'{"refused": "unsigned"}', {}),
            "a GitHub signature on a Standard Webhooks inbound": (
                b'{"refused": "gh"}',
                {"X-Hub-Signature-256": github_signature(hooks.secrets["T_GITHUB_SECRET"], b'{"refused": "gh"}')},
            ),
            "webhook-id missing": (
                b'{"refused": "noid"}',
                {
                    k: v
                    for k, v in standard_headers(secret, "msg_e", now, b'{"refused": "noid"}').items()
                    if k != "webhook-id"
                },
            ),
        }
        for what, (body, headers) in cases.items():
            status, text = await post(body, headers)
            assert status == 401, f"{what}: {status} {text}"
        # A sender's retry of the same message carries a new timestamp (and signature): not a replay,
        # answered 202, and a duplicate of the event already committed (delivered once).
        retry = standard_headers(secret, good["webhook-id"], now + 1, good_body)
        status, text = await post(good_body, retry)
        assert status == 202
        assert json.loads(text) == {"id": good["webhook-id"]}

        # The refusals were never committed: the consumer sees the two accepted, published as the
        # configured principal, and nothing else, up to a sentinel accepted after all of them.
        sentinel = b'{"sentinel": "' + uuid.uuid4().hex.encode() + b'"}'
        assert (await post(sentinel, standard_headers(secret, "msg_s", int(time.time()), sentinel)))[0] == 202
        got = await drain_until(queue, sentinel)
        assert [m.body for m in got].count(good_body) == 1, [m.body for m in got]
        assert not [m.body for m in got if b"refused" in m.body], "a refused webhook was delivered"
        assert len(got) == 2
        assert {m.message_id for m in got} == {good["webhook-id"], "msg_s"}
        assert {m.routing_key for m in got} == {"hooks.hooks-sender"}
        assert {(m.headers or {}).get("cloudEvents_authid") or (m.headers or {}).get("ce-authid") for m in got} == {
            "hooks-sender"
        }, [m.headers for m in got]

        after = await hooks.metrics(http)
        accepted = value(after, "mediator_events_accepted_total", inbound="signed") - value(
            before, "mediator_events_accepted_total", inbound="signed"
        )
        refused = value(after, "mediator_events_refused_total", inbound="signed", reason="unauthenticated") - value(
            before, "mediator_events_refused_total", inbound="signed", reason="unauthenticated"
        )
        duplicates = value(after, "mediator_events_duplicate_total", inbound="signed") - value(
            before, "mediator_events_duplicate_total", inbound="signed"
        )
        assert accepted == 2, accepted
        assert duplicates == 1, duplicates
        assert refused == len(cases), refused


async def test_github_and_generic_hmac_signatures_and_signed_cloudevents(hooks: Hooks) -> None:
    gh_secret, partner = hooks.secrets["T_GITHUB_SECRET"], hooks.secrets["T_PARTNER_SECRET"]
    conn = await aio_pika.connect(RABBIT_URL)
    async with conn, aiohttp.ClientSession() as http:
        channel = await conn.channel()
        queue = await bound_queue(channel, hooks.quickstart.orders_exchange, "hooks.#")

        async def post(path: str, body: bytes, headers: dict[str, str]) -> int:
            h = {"Content-Type": "application/json", **headers}
            async with http.post(hooks.base + path, data=body, headers=h) as resp:
                await resp.read()
                return resp.status

        push = b'{"ref": "refs/heads/main", "pusher": {"name": "octocat"}}'
        gh_headers = {"X-GitHub-Event": "push", "X-GitHub-Delivery": str(uuid.uuid4())}
        assert (
            await post("/hooks/github", push, {**gh_headers, "X-Hub-Signature-256": github_signature(gh_secret, push)})
            == 202
        )
        bad = b'{"refused": "github"}'
        assert (
            await post("/hooks/github", bad, {"X-Hub-Signature-256": github_signature("another-secret-xx", bad)}) == 401
        )
        assert await post("/hooks/github", bad, {"X-Hub-Signature-256": github_signature(gh_secret, push)}) == 401
        assert await post("/hooks/github", bad, {"X-Hub-Signature-256": "sha1=" + "0" * 40}) == 401
        assert await post("/hooks/github", bad, {}) == 401

        order = b'{"partner": "order", "total": 5}'
        mac = base64.b64encode(hmac.new(partner.encode(), order, hashlib.sha256).digest()).decode()
        assert await post("/hooks/partner", order, {"X-Partner-Signature": mac}) == 202
        wrong = base64.b64encode(hmac.new(b"x" * 20, b'{"refused": "partner"}', hashlib.sha256).digest()).decode()
        assert await post("/hooks/partner", b'{"refused": "partner"}', {"X-Partner-Signature": wrong}) == 401

        # CloudEvents structured mode: the signature covers the raw body exactly as sent (odd spacing,
        # key order and escapes the daemon's own encoding would not reproduce).
        secret = hooks.secrets["T_HOOK_IN"]
        structured = (
            b'{ "specversion":"1.0",  "id":"ce-structured-1","source":"/s" ,"type":"com.example.t",'
            b'"datacontenttype":"application/json","data":{"b":2, "a":"\\u00e9"}}\n'
        )
        signed = standard_headers(secret, "msg_" + uuid.uuid4().hex, int(time.time()), structured)
        h = {"Content-Type": "application/cloudevents+json", **signed}
        async with http.post(hooks.base + "/hooks/ce", data=structured, headers=h) as resp:
            assert resp.status == 202, await resp.text()
        resigned = structured.replace(b"  ", b" ")  # the same event, other bytes: the signature no longer matches
        async with http.post(hooks.base + "/hooks/ce", data=resigned, headers=h) as resp:
            assert resp.status == 401
        binary = b'{"binary": true}'
        ce = {"ce-specversion": "1.0", "ce-id": "ce-binary-1", "ce-source": "/s", "ce-type": "com.example.t"}
        signed = standard_headers(secret, "msg_" + uuid.uuid4().hex, int(time.time()), binary)
        assert await post("/hooks/ce", binary, {**ce, **signed}) == 202

        sentinel = b'{"sentinel": "' + uuid.uuid4().hex.encode() + b'"}'
        mac = base64.b64encode(hmac.new(partner.encode(), sentinel, hashlib.sha256).digest()).decode()
        assert await post("/hooks/partner", sentinel, {"X-Partner-Signature": mac}) == 202
        got = await drain_until(queue, sentinel)
        by_key = sorted((m.routing_key or "", m.body) for m in got)
        assert not [b for _, b in by_key if b"refused" in b], by_key
        assert ("hooks.github", push) in by_key
        assert ("hooks.partner", order) in by_key
        assert ("hooks.hooks-sender", binary) in by_key
        assert any(k == "hooks.hooks-sender" and json.loads(b) == {"b": 2, "a": "\u00e9"} for k, b in by_key), by_key
        assert len(got) == 5, by_key


async def test_handshake_served_by_a_cloudevents_inbound(hooks: Hooks) -> None:
    async with aiohttp.ClientSession() as http:
        url = hooks.base + "/hooks/ce"
        async with http.options(url, headers={"WebHook-Request-Origin": SENDER, "WebHook-Request-Rate": "60"}) as resp:
            assert resp.status == 200
            assert resp.headers["WebHook-Allowed-Origin"] == SENDER
            assert resp.headers["WebHook-Allowed-Rate"] == "120"
        async with http.options(url, headers={"WebHook-Request-Origin": SENDER.upper()}) as resp:
            assert resp.status == 200, "origins compare case-insensitively"
        async with http.options(url, headers={"WebHook-Request-Origin": "evil.example.net"}) as resp:
            assert resp.status == 403
            assert "WebHook-Allowed-Origin" not in resp.headers
        async with http.options(hooks.base + "/orders", headers={"WebHook-Request-Origin": SENDER}) as resp:
            assert resp.status == 405, "a plain inbound without handshake config does not consent"


async def test_handshake_performed_once_per_target_and_a_refusal_dead_letters(hooks: Hooks) -> None:
    receiver = hooks.receiver
    async with aiohttp.ClientSession() as http:
        ids = [uuid.uuid4().hex for _ in range(5)]
        for n, event_id in enumerate(ids):
            await hooks.publish(http, CONSENTED, json.dumps({"n": n}).encode(), event_id)
        posts = await receiver.wait_posts("/consented", len(ids))
        assert sorted(h["ce-id"] for h, _ in posts) == sorted(ids)
        [asked] = receiver.options["/consented"]  # once for the target, however many deliveries
        assert asked["webhook-request-origin"] == MEDIATOR
        assert asked["webhook-request-rate"] == "600"
        assert all(h["webhook-request-origin"] == MEDIATOR for h, _ in posts)

        refused_id = uuid.uuid4().hex
        await hooks.publish(http, REFUSED, b'{"refused": true}', refused_id)
        deadline = time.monotonic() + 20
        while True:
            async with http.get(hooks.base + "/admin/dead-letters") as resp:
                letters = [dl for dl in (await resp.json())["dead_letters"] if dl["event_id"] == refused_id]
            if letters:
                break
            assert time.monotonic() < deadline, "the refused delivery was not dead-lettered"
            await asyncio.sleep(0.1)
        [letter] = letters
        assert "refused the CloudEvents webhook handshake" in str(letter["reason"]), letter
        assert letter["outbound"] == "refusing"
        assert "/refused" not in receiver.posts, "an event reached a target that did not consent"

        # The target consents later; the refusal is remembered handshake_retry_s only, so the replayed
        # dead letter asks again and is delivered.
        # (A replay within that time is dead-lettered again from the remembered refusal: replayed until
        # delivered.)
        receiver.consent_refused = True
        deadline = time.monotonic() + 20
        while "/refused" not in receiver.posts:
            assert time.monotonic() < deadline, "the replayed delivery never reached the consenting target"
            async with http.get(hooks.base + "/admin/dead-letters") as resp:
                again = [dl["id"] for dl in (await resp.json())["dead_letters"] if dl["event_id"] == refused_id]
            if again:
                async with http.post(hooks.base + "/admin/dead-letters/replay", json={"ids": again}) as resp:
                    assert resp.status == 200
            await asyncio.sleep(0.1)
        [(headers, body)] = await receiver.wait_posts("/refused", 1)
        assert headers["ce-id"] == refused_id
        assert body == b'{"refused": true}'
        assert len(receiver.options["/refused"]) >= 2, "the consent was asked for again"
