"""An HTTP repeat is answered as one: a real aiohttp client against the real daemon (shipped config),
the events read by an AMQP consumer on the shared RabbitMQ. A new event answers 202
``{"id": ..., "duplicate": false}`` (what gRPC's PublishReply says); a repeat within the dedup window
(the same ``Idempotency-Key`` on a plain inbound, the same ``ce-source`` + ``ce-id`` for a CloudEvent,
structured mode too) answers 202 ``{"id": ..., "duplicate": true}`` with ``Idempotent-Replayed: true``
and is not delivered again; a batch answers a flag per event."""

from __future__ import annotations

import json
import uuid
from typing import Any

import aio_pika
import aiohttp
from aio_pika.abc import AbstractQueue

from tests.e2e.test_quickstart import amqp, bound_queue, get_one
from tests.support.daemon import DaemonProcess, Quickstart

__all__ = ["amqp"]  # a fixture of the quickstart tests this module uses

TYPE = "com.example.order.created"  # routed to orders.created by the shipped config


async def post(
    http: aiohttp.ClientSession, url: str, body: bytes, headers: dict[str, str]
) -> tuple[int, Any, str | None]:
    async with http.post(url, data=body, headers=headers) as resp:
        return resp.status, await resp.json(), resp.headers.get("Idempotent-Replayed")


def binary(event_id: str, source: str = "/dup-test") -> dict[str, str]:
    return {
        "ce-specversion": "1.0",
        "ce-id": event_id,
        "ce-source": source,
        "ce-type": TYPE,
        "Content-Type": "application/json",
    }


async def delivered_until(queue: AbstractQueue, last: str) -> list[str]:
    """The message ids the queue receives up to and including ``last`` (each waited for with a deadline)."""
    ids: list[str] = []
    while not ids or ids[-1] != last:
        message = await get_one(queue)
        assert message.message_id is not None
        ids.append(message.message_id)
    return ids


async def test_http_repeats_are_answered_as_duplicates_and_not_delivered_again(
    daemon: DaemonProcess, quickstart: Quickstart, amqp: aio_pika.abc.AbstractChannel
) -> None:
    queue = await bound_queue(amqp, quickstart.orders_exchange, "orders.created")
    base = f"http://127.0.0.1:{quickstart.http_port}"
    key = f"order-{uuid.uuid4().hex}"
    ce_id = uuid.uuid4().hex
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http:
        # Plain inbound, Idempotency-Key: the key is the event id; the route's source makes the pair.
        plain = {"Content-Type": "application/json", "Idempotency-Key": key}
        assert await post(http, base + "/orders", b'{"order": 1}', plain) == (
            202,
            {"id": key, "duplicate": False},
            None,
        )
        again = await post(http, base + "/orders", b'{"order": 1}', plain)
        assert again == (202, {"id": key, "duplicate": True}, "true")

        # Binary CloudEvent: ce-source + ce-id. The same id from another source is another event.
        assert await post(http, base + "/events", b"{}", binary(ce_id)) == (
            202,
            {"id": ce_id, "duplicate": False},
            None,
        )
        assert await post(http, base + "/events", b"{}", binary(ce_id)) == (
            202,
            {"id": ce_id, "duplicate": True},
            "true",
        )
        other = await post(http, base + "/events", b"{}", binary(ce_id, "/elsewhere"))
        assert other == (202, {"id": ce_id, "duplicate": False}, None)

        # Structured mode: the same pair in the body.
        structured = {"Content-Type": "application/cloudevents+json"}
        doc = json.dumps({"specversion": "1.0", "id": ce_id, "source": "/dup-test", "type": TYPE}).encode()
        assert await post(http, base + "/events", doc, structured) == (202, {"id": ce_id, "duplicate": True}, "true")

        # A batch: one flag per event, in order; the header only when every event was a repeat.
        fresh = uuid.uuid4().hex
        batch = [
            {"specversion": "1.0", "id": ce_id, "source": "/dup-test", "type": TYPE},
            {"specversion": "1.0", "id": fresh, "source": "/dup-test", "type": TYPE},
        ]
        headers = {"Content-Type": "application/cloudevents-batch+json"}
        status = [f"/events/{ce_id}/status", f"/events/{fresh}/status"]  # one status URL per event (issue 21)
        reply = await post(http, base + "/events", json.dumps(batch).encode(), headers)
        assert reply == (202, {"ids": [ce_id, fresh], "duplicate": [True, False], "status": status}, None)
        reply = await post(http, base + "/events", json.dumps(batch).encode(), headers)
        assert reply == (202, {"ids": [ce_id, fresh], "duplicate": [True, True], "status": status}, "true")

        sentinel = uuid.uuid4().hex
        assert (await post(http, base + "/events", b"{}", binary(sentinel)))[:2] == (
            202,
            {"id": sentinel, "duplicate": False},
        )
        async with http.get(base + "/metrics") as resp:
            metrics = await resp.text()
    # Delivered once each: the plain event, the two first CloudEvents (two sources), the fresh one, the sentinel.
    assert await delivered_until(queue, sentinel) == [key, ce_id, ce_id, fresh, sentinel]
    assert 'mediator_events_duplicate_total{inbound="orders-http"} 1.0' in metrics
    assert 'mediator_events_duplicate_total{inbound="cloudevents-http"} 5.0' in metrics
