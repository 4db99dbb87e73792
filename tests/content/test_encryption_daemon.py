"""Encrypted fields through the real daemon: JSON posted over HTTP to an inbound whose transform encrypts
``$.card.number`` and ``$.customer.email``; an AMQP consumer on the shared RabbitMQ receives JWE values and
decrypts them with jwcrypto (a second JOSE implementation); a destination whose transform decrypts (a
consumer the gateway holds the key for) receives the clear values; a value jwcrypto encrypted under the
previous key still decrypts (rotation) while new values name the new kid; an altered value and one under
a key the ring does not hold are dead-lettered with a reason that quotes no value; and the clear values
appear nowhere else: not in the tail (gRPC Subscribe, what ``mediator tail`` prints), the dead-letter
listing or the daemon's log. One daemon for the module."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import signal
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aio_pika
import aiohttp
import grpc
import pytest
import pytest_asyncio
from aio_pika.abc import AbstractChannel, AbstractQueue
from jwcrypto import jwe, jwk

from mediator.client import format_event
from mediator.v1 import service_pb2, service_pb2_grpc
from tests.content.test_wellformed_daemon import dead_letters
from tests.e2e.test_quickstart import bound_queue, get_one
from tests.support.daemon import DaemonProcess, Quickstart
from tests.support.net import RABBIT_URL

pytestmark = [pytest.mark.timeout(60), pytest.mark.asyncio(loop_scope="module")]

NEW, OLD, STRANGER = os.urandom(32), os.urandom(32), os.urandom(32)
NEW_KID, OLD_KID = "2026-02", "2025-11"
PAYMENT, SEALED = "com.example.payment.authorized", "com.example.payment.sealed"
CARD, EMAIL = "4111111111111111", "alice.secret@example.com"
BAD_CARD = "4111 1111 1111 1111"
SCHEMA = {"type": "object", "properties": {"card": {"properties": {"number": {"pattern": "^[0-9]{16}$"}}}}}
FIELDS = '["$.card.number", "$.customer.email"]'

ROUTES = f"""
[encryption.cards]
keys = [{{ kid = "{NEW_KID}", env = "T_CARD_KEY_NEW" }}, {{ kid = "{OLD_KID}", env = "T_CARD_KEY_OLD" }}]

[inbound.payments-http]
kind = "http"
listener = "http"
path = "/payments"
type = "{PAYMENT}"
source = "/payments"
transform = {{ encrypt = {FIELDS} }}

[[schemas]]
name = "payment"
kind = "json"
file = "payment.json"
inbounds = ["payments-http"]
on_invalid = "dead_letter"

[[routes]]
name = "payments"
match = {{ type = ["{PAYMENT}"] }}
to = [
  {{ outbound = "orders-exchange", address = "payments.sealed" }},
  {{ outbound = "subscribers", address = "payments" }},
]

[[routes]]
name = "opened"
match = {{ type = ["{PAYMENT}", "{SEALED}"] }}
to = [{{ outbound = "orders-exchange", address = "payments.opened", transform = {{ decrypt = {FIELDS} }} }}]
"""


def b64(key: bytes) -> str:
    return base64.urlsafe_b64encode(key).rstrip(b"=").decode()


def jwcrypto_decrypt(token: str, kid: str, key: bytes) -> str:
    message = jwe.JWE()
    message.deserialize(token, key=jwk.JWK(kty="oct", kid=kid, k=b64(key)))
    return bytes(message.payload).decode()


def jwcrypto_encrypt(value: str, kid: str, key: bytes) -> str:
    message = jwe.JWE(value.encode(), protected=json.dumps({"alg": "dir", "enc": "A256GCM", "kid": kid}))
    message.add_recipient(jwk.JWK(kty="oct", kid=kid, k=b64(key)))
    token: str = message.serialize(compact=True)
    return token


def kid_of(token: str) -> str:
    header: dict[str, str] = json.loads(base64.urlsafe_b64decode(token.split(".")[0] + "=="))
    return header["kid"]


@dataclass
class Env:
    daemon: DaemonProcess
    qs: Quickstart
    base: str
    http: aiohttp.ClientSession
    channel: AbstractChannel
    sealed: AbstractQueue
    opened: AbstractQueue

    async def post(self, path: str, body: dict[str, Any], headers: dict[str, str] | None = None) -> int:
        h = {"Content-Type": "application/json", **(headers or {})}
        async with self.http.post(self.base + path, data=json.dumps(body).encode(), headers=h) as resp:
            await resp.read()
            return resp.status


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def env(
    tmp_path_factory: pytest.TempPathFactory, rabbitmq: str, mosquitto: tuple[str, int]
) -> AsyncIterator[Env]:
    tmp = tmp_path_factory.mktemp("encryption")
    qs = Quickstart(tmp, extra_toml=ROUTES)
    (tmp / "payment.json").write_text(json.dumps(SCHEMA))
    with pytest.MonkeyPatch.context() as mp:  # the daemon's environment: the two keys of the ring
        mp.setenv("T_CARD_KEY_NEW", b64(NEW))
        mp.setenv("T_CARD_KEY_OLD", b64(OLD))
        daemon = DaemonProcess(qs.write(), qs.http_port, tmp / "daemon.log")
        await daemon.start()
    conn = await aio_pika.connect(RABBIT_URL)
    try:
        async with conn, aiohttp.ClientSession() as http:
            channel = await conn.channel()
            sealed = await bound_queue(channel, qs.orders_exchange, "payments.sealed")
            opened = await bound_queue(channel, qs.orders_exchange, "payments.opened")
            yield Env(daemon, qs, f"http://127.0.0.1:{qs.http_port}", http, channel, sealed, opened)
    finally:
        code = await daemon.stop(signal.SIGTERM)
        logs = daemon.logs()
        assert code == 0, logs
        stored = b"".join(p.read_bytes() for p in tmp.glob("outbox.sqlite*"))
        assert b'"expiry":"12/29"' in stored, "the outbox keeps the data as it is (the search below means something)"
        for clear in (CARD, EMAIL, BAD_CARD):
            assert clear not in logs, f"{clear} reached the log"
            assert clear.encode() not in stored, f"{clear} was stored in the outbox"


def payment(marker: str) -> dict[str, Any]:
    return {
        "payment": marker,
        "amount": 12.5,
        "card": {"number": CARD, "expiry": "12/29"},
        "customer": {"email": EMAIL, "name": "Alice"},
    }


async def test_round_trip_http_in_amqp_out_decrypted_with_jwcrypto_and_never_clear_in_the_tail(env: Env) -> None:
    marker = uuid.uuid4().hex
    async with grpc.aio.insecure_channel(f"127.0.0.1:{env.qs.grpc_port}") as ch:
        tail = service_pb2_grpc.MediatorStub(ch).Subscribe(service_pb2.SubscribeRequest(type=PAYMENT))
        await tail.initial_metadata()  # registered: every event routed from now on is streamed
        assert await env.post("/payments", payment(marker)) == 202
        got = json.loads((await get_one(env.sealed)).body)
        async with asyncio.timeout(15):
            followed = await anext(aiter(tail))
        tail.cancel()
    assert got["payment"] == marker
    assert got["amount"] == 12.5
    assert got["card"]["expiry"] == "12/29", "only the named fields are encrypted"
    assert got["customer"]["name"] == "Alice"
    number, email = got["card"]["number"], got["customer"]["email"]
    assert number.count(".") == 4, number
    assert kid_of(number) == kid_of(email) == NEW_KID, "new values are encrypted with the first key"
    assert jwcrypto_decrypt(number, NEW_KID, NEW) == CARD
    assert jwcrypto_decrypt(email, NEW_KID, NEW) == EMAIL
    # The consumer the gateway decrypts for sees the clear values; the tail saw only JWE.
    assert json.loads((await get_one(env.opened)).body) == payment(marker)
    for line in (format_event(followed, as_json=False), format_event(followed, as_json=True)):
        assert marker in line
        assert CARD not in line
        assert EMAIL not in line


async def test_rotation_and_refusals(env: Env) -> None:
    known = {d["id"] for d in await dead_letters(env.http, env.qs.http_port)}
    # A partner's values, encrypted with jwcrypto: under the previous key, altered, under a key we do not hold.
    events = {
        "rotated": {
            "card": {"number": jwcrypto_encrypt(CARD, OLD_KID, OLD)},
            "customer": {"email": jwcrypto_encrypt(EMAIL, OLD_KID, OLD)},
        },
        "altered": {"card": {"number": jwcrypto_encrypt(CARD, NEW_KID, NEW)[:-6] + "AAAAAA"}},
        "stranger": {"card": {"number": jwcrypto_encrypt(CARD, "2024-01", STRANGER)}},
    }
    ids = {}
    for what, data in events.items():
        ids[what] = uuid.uuid4().hex
        headers = {"ce-specversion": "1.0", "ce-id": ids[what], "ce-source": "/partner", "ce-type": SEALED}
        assert await env.post("/events", data, headers) == 202, what
    rotated = await get_one(env.opened)
    assert rotated.message_id == ids["rotated"]
    assert json.loads(rotated.body) == {"card": {"number": CARD}, "customer": {"email": EMAIL}}, "the old key decrypts"
    reasons: dict[str, str] = {}
    seen: list[dict[str, Any]] = []
    try:
        async with asyncio.timeout(15):
            while len(reasons) < 2:
                seen = await dead_letters(env.http, env.qs.http_port)
                reasons = {d["event_id"]: d["reason"] for d in seen if d["id"] not in known and d["route"] == "opened"}
                await asyncio.sleep(0.05)
    except TimeoutError:
        raise AssertionError(f"two dead letters expected; saw {seen}") from None
    assert "decrypt data.card.number: fails authentication under kid '2026-02'" in reasons[ids["altered"]], reasons
    assert (
        "decrypt data.card.number: names kid '2024-01', which keyring 'cards' does not hold" in reasons[ids["stranger"]]
    ), reasons
    listing = json.dumps(seen)
    assert CARD not in listing
    assert EMAIL not in listing
    assert env.daemon.proc is not None
    assert env.daemon.proc.returncode is None


async def test_a_schema_dead_letter_quotes_no_encrypted_value_and_is_kept_encrypted(env: Env) -> None:
    known = {d["id"] for d in await dead_letters(env.http, env.qs.http_port)}
    bad = payment(uuid.uuid4().hex)
    bad["card"]["number"] = BAD_CARD  # the validator's message would quote it
    assert await env.post("/payments", bad) == 202  # on_invalid = "dead_letter": accepted, kept as a dead letter
    seen: list[dict[str, Any]] = []
    try:
        async with asyncio.timeout(15):
            while not (fresh := [d for d in seen if d["id"] not in known and d["inbound"] == "payments-http"]):
                await asyncio.sleep(0.05)
                seen = await dead_letters(env.http, env.qs.http_port)
    except TimeoutError:
        raise AssertionError(f"no dead letter of payments-http; saw {seen}") from None
    assert (
        fresh[0]["reason"]
        == "data does not match schema 'payment' (json): /card/number: (withheld: an encrypted field)"
    )
    assert BAD_CARD not in json.dumps(seen)
