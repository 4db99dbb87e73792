"""Authentication, authorization and rate limits, end to end: the real daemon, real HTTP clients, a JWKS
endpoint the test runs, and the consumers' view over the shared RabbitMQ."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import signal
import sys
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aio_pika
import aiohttp
import grpc
import pytest

from mediator.v1 import envelope_pb2, service_pb2, service_pb2_grpc
from tests.e2e.test_quickstart import bound_queue, get_one
from tests.support.daemon import DaemonProcess, Quickstart
from tests.support.jwtkit import AUDIENCE, ISSUER, Issuer, SigningKey
from tests.support.net import RABBIT_URL, wait_until

pytestmark = pytest.mark.timeout(120)

ORDER, INVOICE, AUDIT = "com.example.order.created", "com.example.invoice.created", "com.example.audit.logged"
KEY_BILLING_1 = "mk_billing-one-" + "a" * 30
KEY_BILLING_2 = "mk_billing-two-" + "b" * 30
KEY_EXPIRED = "mk_expired-" + "c" * 30


def sha(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def key_file(*entries: tuple[str, str, str]) -> str:
    """``[[keys]]`` tables for (principal, key, extra TOML)."""
    return "".join(
        f'[[keys]]\nprincipal = "{p}"\nsha256 = "{sha(k)}"\nroles = ["publisher"]\n{extra}\n' for p, k, extra in entries
    )


def security_toml(jwks_url: str) -> str:
    return f"""
[auth.partners]
kind = "jwt"
issuer = "{ISSUER}"
audience = ["{AUDIENCE}"]
algorithms = ["RS256"]
jwks_url = "{jwks_url}"
roles_claim = "roles"
claims = ["tenant"]
leeway_s = 5.0
jwks_cooldown_s = 30.0

[auth.keys]
kind = "api_key"
keys_file = "api-keys.toml"

[inbound.limited]
kind = "http"
listener = "http"
path = "/limited"
mode = "cloudevents"

[[authorization]]
name = "publishers"
roles = ["publisher"]
types = ["com.example.order.*", "com.example.invoice.*"]

[[authorization]]
name = "bob-audits"
principals = ["bob"]
types = ["com.example.audit.*"]

[[authorization]]
name = "carol-no-orders"
effect = "deny"
principals = ["carol"]
types = ["com.example.order.*"]

[[authorization]]
name = "carol-audits"
principals = ["carol"]
types = ["com.example.audit.*"]

[[rate_limits]]
name = "per-caller"
per = "principal"
rate = 1.0
burst = 5
inbounds = ["limited"]

[[rate_limits]]
name = "grpc-per-caller"
per = "principal"
rate = 1.0
burst = 5
inbounds = ["grpc"]

[[routes]]
name = "invoices"
match = {{ type = ["{INVOICE}"] }}
to = [{{ outbound = "subscribers", address = "invoices" }}]

[[routes]]
name = "audits"
match = {{ type = ["{AUDIT}"] }}
to = [
  {{ outbound = "subscribers", address = "audits" }},
  {{ outbound = "orders-exchange", address = "audit.{{authid}}" }},
]
"""


@dataclass
class Secured:
    daemon: DaemonProcess
    issuer: Issuer
    quickstart: Quickstart
    base: str
    keys_path: Path

    async def post(
        self,
        session: aiohttp.ClientSession,
        type_: str = ORDER,
        headers: dict[str, str] | None = None,
        path: str = "/events",
        body: bytes = b'{"n": 1}',
    ) -> aiohttp.ClientResponse:
        h = {
            "ce-specversion": "1.0",
            "ce-id": uuid.uuid4().hex,
            "ce-source": "/test",
            "ce-type": type_,
            "Content-Type": "application/json",
            **(headers or {}),
        }
        async with session.post(self.base + path, data=body, headers=h) as resp:
            await resp.read()
            return resp


@pytest.fixture
async def secured(tmp_path: Path, rabbitmq: str, mosquitto: tuple[str, int]) -> AsyncIterator[Secured]:
    issuer = Issuer()
    await issuer.start()
    keys_path = tmp_path / "api-keys.toml"
    keys_path.write_text(
        key_file(
            ("svc-billing", KEY_BILLING_1, ""),
            ("svc-billing", KEY_BILLING_2, ""),
            ("svc-old", KEY_EXPIRED, "expires = 2020-01-01T00:00:00Z"),
        )
    )
    qs = Quickstart(
        tmp_path,
        extra_toml=security_toml(issuer.jwks_url),
        overrides={
            # Header lines up to 32 KiB, so that the token size limit (8 KiB) is what refuses a big token.
            "listeners.http": {"auth": ["partners", "keys"], "max_header_bytes": 32768},
            "listeners.grpc": {"auth": ["partners", "keys"]},
        },
    )
    proc = DaemonProcess(qs.write(), qs.http_port, tmp_path / "daemon.log")
    await proc.start()
    try:
        yield Secured(proc, issuer, qs, f"http://127.0.0.1:{qs.http_port}", keys_path)
    finally:
        code = await proc.stop(signal.SIGTERM)
        await issuer.stop()
        assert code == 0, proc.logs()
        logs = proc.logs()
        assert KEY_BILLING_1 not in logs, "an API key reached the log"
        assert "eyJ" not in logs, "a token reached the log"


BAD_NUMERIC_DATES: list[tuple[str, Any, str]] = [
    ("exp", "9999999999", "a string"),
    ("exp", True, "a boolean"),
    ("exp", None, "null"),
    ("nbf", "0", "a string"),
    ("nbf", False, "a boolean"),
    ("iat", None, "null"),
    ("iat", [1], "an array"),
]


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


async def test_tokens_that_must_be_refused(secured: Secured) -> None:
    iss = secured.issuer
    now = int(time.time())
    rsa_public_pem = iss.key.public_pem()
    hs_with_public_key = (
        b64url(json.dumps({"alg": "HS256", "typ": "JWT", "kid": "k1"}).encode())
        + "."
        + b64url(json.dumps({"iss": ISSUER, "aud": AUDIENCE, "sub": "mallory", "exp": now + 600}).encode())
    )
    import hmac as _hmac

    signature = _hmac.new(rsa_public_pem, hs_with_public_key.encode(), hashlib.sha256).digest()
    forged_hs = hs_with_public_key + "." + b64url(signature)
    alg_none = (
        b64url(json.dumps({"alg": "none", "typ": "JWT"}).encode())
        + "."
        + b64url(json.dumps({"iss": ISSUER, "aud": AUDIENCE, "sub": "mallory", "exp": now + 600}).encode())
        + "."
    )
    cases = {
        "alg none": alg_none,
        "HS256 signed with the RSA public key": forged_hs,
        "expired": iss.token(exp=now - 120),
        "nbf in the future": iss.token(nbf=now + 600),
        "iat in the future": iss.token(iat=now + 600),
        "wrong aud": iss.token(aud="someone-else"),
        "wrong iss": iss.token(iss="https://evil.test/"),
        "missing exp": iss.token(omit=("exp",)),
        "unknown crit header": iss.token(headers={"crit": ["exp-x"], "exp-x": 1}),
        "over 8 KiB": iss.token(padding="x" * 9000),
        "signed by a key the issuer never published": iss.token(key=SigningKey("k1")),
        "garbage": "eyJhbGciOi.not-a-token.at-all",
    }
    async with aiohttp.ClientSession() as session:
        for what, token in cases.items():
            resp = await secured.post(session, headers=bearer(token))
            assert resp.status == 401, f"{what}: {resp.status}"
            assert resp.headers["WWW-Authenticate"].startswith("Bearer"), what
        ok = await secured.post(session, headers=bearer(iss.token(roles=["publisher"])))
        assert ok.status == 202, "a valid token must still pass"
        # RFC 7519: a NumericDate is a JSON number. PyJWT alone reads "9999999999" with int() and accepts it.
        for claim, value, kind in BAD_NUMERIC_DATES:
            h = {**bearer(iss.token(roles=["publisher"], **{claim: value})), "Content-Type": "application/json"}
            async with session.post(secured.base + "/orders", data=b"{}", headers=h) as resp:
                reply = await resp.json(content_type=None)
            assert resp.status == 401, (claim, value, resp.status, reply)
            assert reply["reason"] == f"token claim {claim!r} must be a NumericDate (a JSON number), not {kind}"
        fractional = iss.token(roles=["publisher"], exp=now + 600.5, iat=now - 0.5, nbf=now - 1)
        assert (await secured.post(session, headers=bearer(fractional))).status == 202, "a fraction is a number"


async def test_missing_wrong_expired_rotated_api_keys_and_two_credentials(secured: Secured) -> None:
    async with aiohttp.ClientSession() as session:
        assert (await secured.post(session)).status == 401  # nothing presented
        assert (await secured.post(session, headers={"X-API-Key": "mk_wrong"})).status == 401
        assert (await secured.post(session, headers={"X-API-Key": KEY_EXPIRED})).status == 401
        assert (await secured.post(session, headers={"X-API-Key": KEY_BILLING_1})).status == 202
        assert (await secured.post(session, headers=bearer(KEY_BILLING_2))).status == 202  # as a bearer token
        two = {"X-API-Key": KEY_BILLING_1, **bearer(secured.issuer.token(roles=["publisher"]))}
        resp = await secured.post(session, headers=two)
        assert resp.status == 401
        # Rotation: the first key is removed from the file, SIGHUP, no restart: it stops working, the
        # second goes on.
        secured.keys_path.write_text(key_file(("svc-billing", KEY_BILLING_2, "")))
        assert secured.daemon.proc is not None
        secured.daemon.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while (await secured.post(session, headers={"X-API-Key": KEY_BILLING_1})).status != 401:
            assert time.monotonic() < deadline, "the removed key still works after SIGHUP"
            await asyncio.sleep(0.1)
        assert (await secured.post(session, headers={"X-API-Key": KEY_BILLING_2})).status == 202


async def test_unknown_kid_flood_fetches_the_jwks_at_most_once_per_cooldown(secured: Secured) -> None:
    iss = secured.issuer
    async with aiohttp.ClientSession() as session:
        first = await secured.post(session, headers=bearer(iss.token(roles=["publisher"])))
        assert first.status == 202
        before = iss.fetches
        assert before >= 1
        flood = [iss.token(key=SigningKey(f"made-up-{i}")) for i in range(3)]
        results = await asyncio.gather(*(secured.post(session, headers=bearer(flood[i % 3])) for i in range(60)))
        assert {r.status for r in results} == {401}
        assert iss.fetches - before <= 1, f"{iss.fetches - before} JWKS fetches for one cooldown"
        # A real new key published meanwhile is found on the next refetch only after the cooldown; the
        # old key keeps working throughout, and a failing JWKS endpoint keeps the last good set.
        iss.fail = True
        again = await secured.post(session, headers=bearer(iss.token(roles=["publisher"])))
        assert again.status == 202


async def test_authorization_matrix(secured: Secured) -> None:
    iss = secured.issuer
    principals = {
        "alice": iss.token("alice", roles=["publisher"]),
        "bob": iss.token("bob"),
        "carol": iss.token("carol", roles=["publisher"]),
    }
    expected = {
        ("alice", ORDER): 202,
        ("alice", INVOICE): 202,
        ("alice", AUDIT): 403,
        ("bob", ORDER): 403,
        ("bob", INVOICE): 403,
        ("bob", AUDIT): 202,
        ("carol", ORDER): 403,  # a deny rule beats the publishers' allow
        ("carol", INVOICE): 202,
        ("carol", AUDIT): 202,
    }
    async with aiohttp.ClientSession() as session:
        for (who, type_), status in expected.items():
            h = {
                "ce-specversion": "1.0",
                "ce-id": uuid.uuid4().hex,
                "ce-source": "/m",
                "ce-type": type_,
                "Content-Type": "application/json",
                **bearer(principals[who]),
            }
            async with session.post(secured.base + "/events", data=b"{}", headers=h) as resp:
                body = await resp.json()
                assert resp.status == status, f"{who} publishing {type_}: {resp.status} {body}"
                if status == 403:
                    assert "rule" in body["reason"]
                    assert "route" not in body["reason"], "a refusal must not reveal routes"
        async with session.post(
            secured.base + "/events",
            data=b"{}",
            headers={**h, "ce-type": ORDER, "ce-id": "c", **bearer(principals["carol"])},
        ) as resp:
            assert "carol-no-orders" in (await resp.json())["reason"]


async def test_address_templates_use_the_verified_principal(secured: Secured) -> None:
    conn = await aio_pika.connect(RABBIT_URL)
    async with conn, aiohttp.ClientSession() as session:
        queue = await bound_queue(await conn.channel(), secured.quickstart.orders_exchange, "audit.bob")
        resp = await secured.post(session, AUDIT, {**bearer(secured.issuer.token("bob")), "ce-authid": "carol"})
        assert resp.status == 202
        msg = await get_one(queue)
        assert msg.routing_key == "audit.bob"


async def test_consumers_see_the_verified_principal_and_never_a_spoofed_one(secured: Secured) -> None:
    conn = await aio_pika.connect(RABBIT_URL)
    async with conn, aiohttp.ClientSession() as session:
        channel = await conn.channel()
        queue = await bound_queue(channel, secured.quickstart.orders_exchange, "#")
        token = secured.issuer.token("alice", roles=["publisher"], tenant="acme")
        spoof = {"ce-authid": "mallory", "ce-authtype": "system", "ce-authclaims": '{"admin":true}'}
        resp = await secured.post(session, headers={**bearer(token), **spoof})
        assert resp.status == 202
        msg = await get_one(queue)
        headers = msg.headers
        assert headers["cloudEvents_authid"] == "alice"
        assert headers["cloudEvents_authtype"] == "user"
        assert json.loads(str(headers["cloudEvents_authclaims"])) == {"tenant": "acme"}
        # Structured mode: the same names in the JSON body are removed too.
        event = {
            "specversion": "1.0",
            "id": uuid.uuid4().hex,
            "source": "/s",
            "type": ORDER,
            "authid": "mallory",
            "authtype": "system",
            "data": {"n": 2},
        }
        async with session.post(
            secured.base + "/events",
            data=json.dumps(event),
            headers={"Content-Type": "application/cloudevents+json", "X-API-Key": KEY_BILLING_1},
        ) as r:
            assert r.status == 202, await r.text()
        msg = await get_one(queue)
        assert msg.headers["cloudEvents_authid"] == "svc-billing"
        assert msg.headers["cloudEvents_authtype"] == "api_key"
        assert "cloudEvents_authclaims" not in msg.headers


async def test_one_principal_flooding_does_not_limit_another(secured: Secured) -> None:
    iss = secured.issuer
    flooder = bearer(iss.token("alice", roles=["publisher"]))
    calm = bearer(iss.token("carol", roles=["publisher"]))
    async with aiohttp.ClientSession() as session:
        flood = await asyncio.gather(*(secured.post(session, INVOICE, flooder, "/limited") for _ in range(40)))
        statuses = [r.status for r in flood]
        assert statuses.count(202) <= 7, statuses  # a burst of 5, plus what one second refills
        limited = [r for r in flood if r.status == 429]
        assert limited, statuses
        one = limited[0]
        assert int(one.headers["Retry-After"]) >= 1
        assert one.headers["RateLimit-Policy"].startswith('"per-caller";q=5;w=')
        assert one.headers["RateLimit"].startswith('"per-caller";r=0;t=')
        others = await asyncio.gather(*(secured.post(session, INVOICE, calm, "/limited") for _ in range(5)))
        assert [r.status for r in others] == [202] * 5
        # The other inbounds carry no limit.
        assert (await secured.post(session, INVOICE, flooder)).status == 202


async def test_public_listener_without_authentication_refuses_to_start(tmp_path: Path) -> None:
    qs = Quickstart(tmp_path, overrides={"listeners.http": {"host": "0.0.0.0", "admin": False}})
    config = qs.write()
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "mediator",
        "check",
        "--config",
        str(config),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await proc.communicate()
    assert proc.returncode == 2, (out, err)
    assert b"not loopback" in err
    assert b"allow_anonymous" in err


async def test_security_sections_reload_on_sighup_and_a_bad_edit_keeps_the_old(secured: Secured) -> None:
    alice = bearer(secured.issuer.token("alice", roles=["publisher"]))
    config = secured.daemon.config
    assert secured.daemon.proc is not None
    async with aiohttp.ClientSession() as session:
        assert (await secured.post(session, AUDIT, alice)).status == 403
        original = config.read_text()
        config.write_text(original + '\n[[authorization]]\nname = "alice-audits"\nprincipals = ["alice"]\n')
        secured.daemon.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while (await secured.post(session, AUDIT, alice)).status != 202:
            assert time.monotonic() < deadline, "the new rule was not applied on SIGHUP"
            await asyncio.sleep(0.1)
        # A bad edit (a rule naming an inbound that does not exist) is refused; the running rules stay.
        config.write_text(original + '\n[[authorization]]\nname = "x"\ninbounds = ["nowhere"]\n')
        secured.daemon.proc.send_signal(signal.SIGHUP)
        # The refusal is logged once the reload ran: waited for with a deadline, not a fixed second.
        await wait_until(
            lambda: "config.reload_refused" in secured.daemon.logs(), 15, "the bad edit's config.reload_refused"
        )
        assert (await secured.post(session, AUDIT, alice)).status == 202


async def test_grpc_credentials_refusals_and_per_principal_limits(secured: Secured) -> None:
    iss = secured.issuer
    target = f"127.0.0.1:{secured.quickstart.grpc_port}"

    def event(type_: str = INVOICE) -> envelope_pb2.Envelope:
        return envelope_pb2.Envelope(id=uuid.uuid4().hex, source="/grpc", spec_version="1.0", type=type_)

    async with grpc.aio.insecure_channel(target) as channel:
        stub = service_pb2_grpc.MediatorStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as none:
            await stub.Publish(event())
        assert none.value.code() is grpc.StatusCode.UNAUTHENTICATED
        reply = await stub.Publish(event(), metadata=(("x-api-key", KEY_BILLING_1),))
        assert reply.id
        for claim, value, kind in BAD_NUMERIC_DATES:
            token = iss.token("alice", roles=["publisher"], **{claim: value})
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await stub.Publish(event(), metadata=(("authorization", f"Bearer {token}"),))
            assert refused.value.code() is grpc.StatusCode.UNAUTHENTICATED, (claim, value)
            assert f"token claim {claim!r} must be a NumericDate (a JSON number), not {kind}" in (
                refused.value.details() or ""
            )
        alice = (("authorization", f"Bearer {iss.token('alice', roles=['publisher'])}"),)
        with pytest.raises(grpc.aio.AioRpcError) as denied:
            await stub.Publish(event(AUDIT), metadata=alice)
        assert denied.value.code() is grpc.StatusCode.PERMISSION_DENIED
        assert "default-deny" in (denied.value.details() or "")
        outcomes: list[grpc.StatusCode] = []
        trailers = None
        for _ in range(15):
            try:
                await stub.Publish(event(), metadata=alice)
                outcomes.append(grpc.StatusCode.OK)
            except grpc.aio.AioRpcError as exc:
                outcomes.append(exc.code())
                trailers = exc.trailing_metadata()
        assert grpc.StatusCode.RESOURCE_EXHAUSTED in outcomes, outcomes
        assert outcomes.count(grpc.StatusCode.OK) <= 7, outcomes
        assert trailers is not None
        pushback = dict(trailers).get("grpc-retry-pushback-ms")
        assert pushback is not None
        assert int(pushback) > 0
        carol = (("authorization", f"Bearer {iss.token('carol', roles=['publisher'])}"),)
        for _ in range(5):
            assert (await stub.Publish(event(), metadata=carol)).id, "another principal is not limited"
        # Subscribe streams events out: on a listener with auth it needs a verified principal too.
        anonymous = stub.Subscribe(service_pb2.SubscribeRequest(type="com.example.*"))
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await anext(aiter(anonymous))
        assert refused.value.code() is grpc.StatusCode.UNAUTHENTICATED
        subscribed = stub.Subscribe(service_pb2.SubscribeRequest(type=INVOICE), metadata=carol)
        await subscribed.initial_metadata()
        sent = event()
        await stub.Publish(sent, metadata=(("x-api-key", KEY_BILLING_2),))
        async with asyncio.timeout(15):
            got = await anext(aiter(subscribed))
        assert got.id == sent.id
        subscribed.cancel()
