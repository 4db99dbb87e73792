"""The registry of a running daemon (the shipped config: its own listener, SQLite beside the outbox), driven by
Confluent's own client as producers and consumers use it, and by plain HTTP for the error bodies; and a route
that validates against "latest" picking up a version registered a moment before, without a reload."""

from __future__ import annotations

import asyncio
import json
import signal
import sys
from asyncio.subprocess import PIPE, STDOUT
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import aio_pika
import aiohttp
import pytest
import pytest_asyncio
from confluent_kafka.schema_registry import Schema, SchemaRegistryClient
from confluent_kafka.schema_registry.avro import AvroDeserializer
from confluent_kafka.schema_registry.error import SchemaRegistryError
from confluent_kafka.serialization import MessageField, SerializationContext

from mediator.config import load
from mediator.registry import load_specs
from mediator.schemaregistry.check import subject_problems
from tests.e2e.test_quickstart import bound_queue, get_one
from tests.support.daemon import DaemonProcess, Quickstart
from tests.support.net import RABBIT_URL, free_port, unique

pytestmark = [pytest.mark.timeout(60), pytest.mark.asyncio(loop_scope="module")]

T = TypeVar("T")
SR_JSON = "application/vnd.schemaregistry.v1+json"

ORDERS_SCHEMA = """
[[schemas]]
name = "orders-from-registry"
types = ["com.example.order.created"]
schema = {{ subject = "{subject}", version = "latest" }}

[[routes]]
name = "avro-orders"
match = {{ type = ["com.example.avro.order"] }}
to = [{{ outbound = "orders-exchange", address = "orders.avro", convert = {{ to = "avro", subject = "{avro}" }} }}]
"""


@dataclass
class Running:
    daemon: DaemonProcess
    quickstart: Quickstart
    url: str  # the registry's base URL
    http: aiohttp.ClientSession
    subject: str  # the subject the orders route validates against
    avro_subject: str  # the subject the avro-orders route converts with

    def client(self) -> SchemaRegistryClient:
        return SchemaRegistryClient({"url": self.url})

    async def call(self, method: str, path: str, body: object = None) -> tuple[int, Any, str]:
        data = json.dumps(body) if body is not None else None
        async with self.http.request(method, self.url + path, data=data, headers={"Content-Type": SR_JSON}) as r:
            text = await r.text()
            return r.status, json.loads(text) if text else None, r.headers.get("Content-Type", "")


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def running(
    tmp_path_factory: pytest.TempPathFactory, rabbitmq: str, mosquitto: tuple[str, int]
) -> AsyncIterator[Running]:
    tmp = tmp_path_factory.mktemp("registry")
    subject, avro = unique("orders-value"), unique("avro-orders-value")
    qs = Quickstart(tmp, extra_toml=ORDERS_SCHEMA.format(subject=subject, avro=avro))
    daemon = DaemonProcess(qs.write(), qs.http_port, tmp / "daemon.log")
    await daemon.start()
    try:
        async with aiohttp.ClientSession() as http:
            yield Running(daemon, qs, f"http://127.0.0.1:{qs.registry_port}", http, subject, avro)
    finally:
        code = await daemon.stop(signal.SIGTERM)
        assert code == 0, f"daemon exited with {code} on SIGTERM:\n{daemon.logs()}"


async def off_loop(fn: Callable[[], T]) -> T:
    """Confluent's client is synchronous: run it on a thread, never on the loop."""
    return await asyncio.to_thread(fn)


def _avro(*fields: str) -> str:
    return json.dumps(
        {"type": "record", "name": "Order", "fields": [{"name": f, "type": "string", "default": ""} for f in fields]}
    )


def _json(*props: str, closed: bool = True) -> str:
    return json.dumps(
        {"type": "object", "properties": {p: {"type": "string"} for p in props}, "additionalProperties": not closed}
    )


def _proto(*fields: str) -> str:
    body = " ".join(f"string {f} = {i};" for i, f in enumerate(fields, 1))
    return f'syntax = "proto3";\npackage shop;\nmessage Order {{ {body} }}\n'


# (type, v1, a compatible v2, an incompatible v2 under BACKWARD)
EVOLUTIONS = {
    "AVRO": (
        _avro("id"),
        _avro("id", "note"),
        json.dumps({"type": "record", "name": "Order", "fields": [{"name": "id", "type": "int"}]}),
    ),
    "JSON": (_json("id"), _json("id", "note"), _json()),
    "PROTOBUF": (_proto("id"), _proto("id", "note"), _proto("id").replace("string id", "int64 id")),
}


@pytest.mark.parametrize("kind", ["AVRO", "JSON", "PROTOBUF"])
async def test_confluent_client_registers_looks_up_fetches_and_tests(running: Running, kind: str) -> None:
    v1, v2, bad = EVOLUTIONS[kind]
    subject, other = unique(f"{kind.lower()}-value"), unique(f"{kind.lower()}-copy")

    def drive() -> None:
        client = running.client()
        first = client.register_schema(subject, Schema(v1, kind))
        assert running.client().register_schema(subject, Schema(v1, kind)) == first  # again: the same id
        assert running.client().register_schema(other, Schema(v1, kind)) == first  # ids are global
        found = client.lookup_schema(subject, Schema(v1, kind))
        assert (found.schema_id, found.version, found.subject) == (first, 1, subject)
        fetched = running.client().get_schema(first)
        assert fetched.schema_type == kind
        assert fetched.schema_str
        assert client.test_compatibility(subject, Schema(v2, kind)) is True
        assert client.test_compatibility(subject, Schema(bad, kind)) is False
        with pytest.raises(SchemaRegistryError) as refused:
            client.register_schema(subject, Schema(bad, kind))
        assert (refused.value.http_status_code, refused.value.error_code) == (409, 409)
        second = client.register_schema(subject, Schema(v2, kind))
        assert second != first
        latest = client.get_latest_version(subject)
        assert (latest.version, latest.schema_id) == (2, second)
        assert client.get_versions(subject) == [1, 2]
        assert client.get_version(subject, 1).schema_id == first
        assert subject in client.get_subjects()
        assert other in client.get_subjects()
        client.set_compatibility(subject, "NONE")
        assert client.get_compatibility(subject) == "NONE"
        third = client.register_schema(subject, Schema(bad, kind))  # NONE lets it in
        assert client.get_version(subject, "latest").schema_id == third
        assert client.delete_version(subject, 3) == 3
        assert client.get_versions(subject) == [1, 2]
        assert client.delete_version(subject, 3, permanent=True) == 3
        assert client.delete_subject(subject) == [1, 2]
        assert subject not in client.get_subjects()
        assert client.delete_subject(subject, permanent=True) == [1, 2]
        with pytest.raises(SchemaRegistryError) as gone:
            running.client().get_latest_version(subject)
        assert gone.value.error_code == 40401
        assert running.client().get_schema(first).schema_type == kind  # still held by `other`

    await off_loop(drive)


async def test_global_config_and_error_bodies(running: Running) -> None:
    status, body, media = await running.call("GET", "/config")
    assert (status, body) == (200, {"compatibilityLevel": "BACKWARD"})
    assert media.startswith(SR_JSON)
    subject = unique("errors")
    assert (await running.call("GET", f"/subjects/{subject}/versions"))[:2] == (
        404,
        {"error_code": 40401, "message": f"Subject '{subject}' not found."},
    )
    status, body, _ = await running.call("POST", f"/subjects/{subject}/versions", {"schema": '{"type": "nope"}'})
    assert (status, body["error_code"]) == (422, 42201)
    status, body, _ = await running.call(
        "POST", f"/subjects/{subject}/versions", {"schema": "message {", "schemaType": "PROTOBUF"}
    )
    assert (status, body["error_code"]) == (422, 42201)
    status, body, _ = await running.call("POST", f"/subjects/{subject}/versions", {"schema": _avro("id", "code")})
    assert status == 200
    assert isinstance(body["id"], int)
    schema_id = body["id"]
    assert (await running.call("GET", f"/subjects/{subject}/versions/7"))[1]["error_code"] == 40402
    assert (await running.call("GET", f"/subjects/{subject}/versions/zero"))[1]["error_code"] == 42202
    assert (await running.call("GET", "/schemas/ids/999999"))[1]["error_code"] == 40403
    assert (await running.call("POST", f"/subjects/{subject}", {"schema": _avro("other")}))[1]["error_code"] == 40403
    status, body, _ = await running.call("GET", f"/subjects/{subject}/versions/latest/schema")
    assert status == 200
    assert body["name"] == "Order"
    assert (await running.call("GET", f"/schemas/ids/{schema_id}/versions"))[1] == [{"subject": subject, "version": 1}]
    incompatible = json.dumps({"type": "record", "name": "Order", "fields": [{"name": "id", "type": "int"}]})
    status, body, _ = await running.call(
        "POST", f"/compatibility/subjects/{subject}/versions/latest?verbose=true", {"schema": incompatible}
    )
    assert status == 200
    assert body["is_compatible"] is False
    assert "TYPE_MISMATCH" in body["messages"][0]
    status, body, _ = await running.call("POST", f"/subjects/{subject}/versions", {"schema": incompatible})
    assert (status, body["error_code"]) == (409, 409)
    assert "incompatible" in body["message"]
    assert (await running.call("PUT", f"/config/{subject}", {"compatibility": "SIDEWAYS"}))[1]["error_code"] == 42203
    assert (await running.call("GET", f"/config/{subject}"))[1]["error_code"] == 40408
    assert (await running.call("DELETE", f"/subjects/{subject}?permanent=true"))[1]["error_code"] == 40405
    assert (await running.call("DELETE", f"/subjects/{subject}/versions/1?permanent=true"))[1]["error_code"] == 40407
    assert (await running.call("DELETE", f"/subjects/{subject}/versions/1"))[:2] == (200, 1)
    assert (await running.call("DELETE", f"/subjects/{subject}/versions/1"))[1]["error_code"] == 40406
    assert (await running.call("DELETE", f"/subjects/{subject}"))[1]["error_code"] == 40404
    assert (await running.call("GET", f"/subjects/{subject}/versions?deleted=true"))[:2] == (200, [1])
    assert (await running.call("GET", f"/subjects/{subject}/nothing"))[1]["error_code"] == 404


async def test_publish_validated_against_latest_picks_up_a_new_version(running: Running) -> None:
    """The orders route names the subject with version "latest": an event is checked against the version
    registered a moment before (no reload), and carries that version's URL as its dataschema."""
    orders = f"http://127.0.0.1:{running.quickstart.http_port}/orders"
    subject = running.subject
    v1: dict[str, Any] = {"type": "object", "properties": {"order": {"type": "integer"}}, "required": ["order"]}
    v2 = {**v1, "required": ["order", "total"], "properties": {**v1["properties"], "total": {"type": "number"}}}
    conn = await aio_pika.connect(RABBIT_URL)
    async with conn:
        queue = await bound_queue(await conn.channel(), running.quickstart.orders_exchange, "orders.created")

        async def publish(data: object) -> int:
            async with running.http.post(orders, json=data) as resp:
                return resp.status

        assert await publish({"order": 1}) == 422  # no version registered yet: nothing to validate against
        status, body, _ = await running.call(
            "POST", f"/subjects/{subject}/versions", {"schema": json.dumps(v1), "schemaType": "JSON"}
        )
        assert status == 200, body
        assert await publish({"order": 1}) == 202
        message = await get_one(queue)
        dataschema = (message.headers or {}).get("cloudEvents_dataschema") or (message.headers or {}).get(
            "ce-dataschema"
        )
        assert dataschema == f"{running.url}/subjects/{subject}/versions/1", message.headers
        assert await publish({"order": "one"}) == 422
        assert (await running.call("PUT", f"/config/{subject}", {"compatibility": "NONE"}))[0] == 200
        status, body, _ = await running.call(
            "POST", f"/subjects/{subject}/versions", {"schema": json.dumps(v2), "schemaType": "JSON"}
        )
        assert status == 200, body
        assert await publish({"order": 2}) == 422  # v2 requires total: in force at once
        assert await publish({"order": 3, "total": 9.5}) == 202
        message = await get_one(queue)
        assert json.loads(message.body) == {"order": 3, "total": 9.5}
        headers = message.headers or {}
        assert f"/subjects/{subject}/versions/2" in str(headers.get("cloudEvents_dataschema", headers)), headers


async def _check(config: Path) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "mediator", "check", "--config", str(config), stdout=PIPE, stderr=STDOUT
    )
    async with asyncio.timeout(30):
        out, _ = await proc.communicate()
    return proc.returncode or 0, out.decode()


async def test_check_verifies_named_subjects_when_the_registry_answers(running: Running) -> None:
    text = running.daemon.config.read_text()
    missing = unique("missing-value")
    named = running.daemon.config.with_name("check-missing.toml")
    named.write_text(text.replace(running.subject, missing))
    code, out = await _check(named)
    assert code != 0, out
    assert f"schemas[0].schema: the registry at {running.url} has no {missing!r} version latest" in out
    unreachable = running.daemon.config.with_name("check-unreachable.toml")
    unreachable.write_text(text.replace(f"port = {running.quickstart.registry_port}", f"port = {free_port()}"))
    problems, warnings = await subject_problems(load(unreachable, load_specs()))  # what check prints: a warning
    assert problems == []
    assert len(warnings) == 1
    assert "registry subjects not verified" in warnings[0]


async def test_avro_conversion_frames_data_with_the_registry_id(running: Running) -> None:
    """JSON in, Avro out with the Confluent wire header: Confluent's own deserializer reads it, and a version
    registered a moment before is the one used for the next event."""
    v1 = {
        "type": "record",
        "name": "Order",
        "fields": [{"name": "id", "type": "string"}, {"name": "qty", "type": "int"}],
    }
    v2 = {**v1, "fields": [*v1["fields"], {"name": "note", "type": "string", "default": "-"}]}
    deserializer = AvroDeserializer(running.client())
    context = SerializationContext("orders", MessageField.VALUE)
    conn = await aio_pika.connect(RABBIT_URL)
    async with conn:
        queue = await bound_queue(await conn.channel(), running.quickstart.orders_exchange, "orders.avro")
        for n, schema in enumerate((v1, v2), 1):
            status, body, _ = await running.call(
                "POST", f"/subjects/{running.avro_subject}/versions", {"schema": json.dumps(schema)}
            )
            assert status == 200, body
            headers = {
                "ce-specversion": "1.0",
                "ce-id": unique("avro"),
                "ce-source": "/tests/registry",
                "ce-type": "com.example.avro.order",
                "Content-Type": "application/json",
            }
            events = f"http://127.0.0.1:{running.quickstart.http_port}/events"
            async with running.http.post(events, json={"id": f"o-{n}", "qty": n}, headers=headers) as resp:
                assert resp.status == 202, await resp.text()
            message = await get_one(queue)
            assert message.body[0] == 0
            assert int.from_bytes(message.body[1:5], "big") == body["id"]
            value = await off_loop(partial(deserializer, message.body, context))
            expected: dict[str, object] = {"id": f"o-{n}", "qty": n}
            if n == 2:
                expected["note"] = "-"
            assert value == expected
