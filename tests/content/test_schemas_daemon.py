"""``[[schemas]]`` through the real daemon: JSON Schema (2020-12 and draft 7), a Protobuf descriptor set
the test generates with grpc_tools.protoc, and Avro with the Confluent wire header; valid events pass,
invalid ones are refused with every error and its JSON pointer (HTTP 422, gRPC INVALID_ARGUMENT), kept
as dead letters (dead_letter) or routed and logged (warn). ``mediator check`` names an unreadable or
uncompilable schema file by its key path."""

from __future__ import annotations

import asyncio
import io
import json
import signal
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aio_pika
import aiohttp
import fastavro
import grpc
import pytest
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

from mediator.v1 import envelope_pb2, service_pb2_grpc
from tests.e2e.test_quickstart import bound_queue, get_one
from tests.support.daemon import ROOT, DaemonProcess, Quickstart
from tests.support.net import RABBIT_URL

pytestmark = pytest.mark.timeout(90)

ORDER = "com.example.order.created"
PROTO = 'syntax = "proto3";\npackage shop;\nmessage Line { string sku = 1; int32 qty = 2; }\n'
PROTO += "message Order { string id = 1; repeated Line lines = 2; }\n"
AVRO = {
    "type": "record",
    "name": "Reading",
    "namespace": "dev",
    "fields": [{"name": "device", "type": "string"}, {"name": "temp", "type": "double"}],
}
ORDERS_2020 = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "type": "object",
    "required": ["id", "qty"],
    "properties": {
        "id": {"type": "string"},
        "qty": {"type": "integer", "minimum": 1},
        "items": {"type": "array", "prefixItems": [{"type": "string"}], "items": {"type": "string"}},
    },
}
LEGACY_7 = {
    "$schema": "http://json-schema.org/draft-07/schema#",
    "type": "object",
    "required": ["code"],
    "properties": {"code": {"type": "string", "pattern": "^[A-Z]{3}$"}},
    "additionalProperties": False,
}


def schema_toml() -> str:
    return """
[[schemas]]
name = "orders"
kind = "json"
file = "schemas/orders.json"
types = ["com.example.order.*"]

[[schemas]]
name = "legacy"
kind = "json"
file = "schemas/legacy.json"
types = ["com.example.legacy"]
on_invalid = "dead_letter"

[[schemas]]
name = "noted"
kind = "json"
file = "schemas/legacy.json"
types = ["com.example.noted"]
on_invalid = "warn"

[[schemas]]
name = "shop-order-pb"
kind = "protobuf"
file = "schemas/shop.desc"
message = "shop.Order"
dataschema = "urn:example:shop.Order"

[[schemas]]
name = "readings"
kind = "avro"
file = "schemas/reading.avsc"
types = ["com.example.reading"]
confluent = true
schema_id = 7

[[routes]]
name = "content"
match = { type = ["com.example.legacy", "com.example.noted", "com.example.reading", "com.example.pb"] }
to = [{ outbound = "orders-exchange", address = "content.checked" }]
"""


def write_schemas(tmp: Path) -> None:
    d = tmp / "schemas"
    d.mkdir()
    (d / "orders.json").write_text(json.dumps(ORDERS_2020))
    (d / "legacy.json").write_text(json.dumps(LEGACY_7))
    (d / "reading.avsc").write_text(json.dumps(AVRO))
    (d / "shop.proto").write_text(PROTO)
    subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", f"-I{d}", f"--descriptor_set_out={d / 'shop.desc'}", "shop.proto"],
        check=True,
    )


def order_class(tmp: Path) -> Any:
    fds = descriptor_pb2.FileDescriptorSet.FromString((tmp / "schemas" / "shop.desc").read_bytes())
    pool = descriptor_pool.DescriptorPool()
    for f in fds.file:
        pool.Add(f)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("shop.Order"))


def avro(record: dict[str, Any], schema_id: int = 7) -> bytes:
    buf = io.BytesIO()
    fastavro.schemaless_writer(buf, fastavro.parse_schema(AVRO), record)
    return b"\x00" + schema_id.to_bytes(4, "big") + buf.getvalue()


@pytest.fixture
async def daemon(
    tmp_path: Path, rabbitmq: str, mosquitto: tuple[str, int]
) -> AsyncIterator[tuple[Quickstart, DaemonProcess]]:
    write_schemas(tmp_path)
    qs = Quickstart(tmp_path, extra_toml=schema_toml())
    proc = DaemonProcess(qs.write(), qs.http_port, tmp_path / "daemon.log")
    await proc.start()
    try:
        yield qs, proc
    finally:
        assert await proc.stop(signal.SIGTERM) == 0, proc.logs()


async def send(
    http: aiohttp.ClientSession, base: str, type_: str, body: bytes, ct: str, **attrs: str
) -> tuple[int, dict[str, Any]]:
    headers = {"ce-specversion": "1.0", "ce-id": uuid.uuid4().hex, "ce-source": "/t", "ce-type": type_}
    headers |= {f"ce-{k}": v for k, v in attrs.items()} | {"Content-Type": ct}
    async with http.post(base + "/events", data=body, headers=headers) as resp:
        return resp.status, await resp.json(content_type=None)


async def test_schemas_json_protobuf_avro_and_the_three_modes(
    daemon: tuple[Quickstart, DaemonProcess], tmp_path: Path
) -> None:
    qs, proc = daemon
    base = f"http://127.0.0.1:{qs.http_port}"
    j = "application/json"
    conn = await aio_pika.connect(RABBIT_URL)
    async with conn, aiohttp.ClientSession() as http:
        channel = await conn.channel()
        checked = await bound_queue(channel, qs.orders_exchange, "content.checked")

        # JSON Schema 2020-12, on_invalid = "reject": 422 with every error and its pointer.
        status, reply = await send(http, base, ORDER, b'{"id": "o-1", "qty": 2, "items": ["a"]}', j)
        assert status == 202, reply
        status, reply = await send(http, base, ORDER, b'{"id": 1, "qty": 0, "items": ["a", 2]}', j)
        assert status == 422, reply
        assert reply["type"] == "urn:mediator:problem:unprocessable"
        assert (reply["status"], reply["error"]) == (422, "unprocessable")
        assert sorted(e["pointer"] for e in reply["errors"]) == ["/id", "/items/1", "/qty"], reply
        assert "schema 'orders'" in reply["detail"]
        status, reply = await send(http, base, ORDER, b'{"qty": 1}', j)
        assert [(e["pointer"], "id" in e["detail"]) for e in reply["errors"]] == [("", True)], reply
        status, reply = await send(http, base, ORDER, b"<order/>", "application/xml")
        assert status == 422
        assert "not JSON" in reply["errors"][0]["detail"]

        # Draft 7, on_invalid = "dead_letter": accepted (202), kept as a dead letter with the reasons.
        status, reply = await send(http, base, "com.example.legacy", b'{"code": "ABC"}', j)
        assert status == 202
        status, reply = await send(http, base, "com.example.legacy", b'{"code": "abcd", "extra": 1}', j)
        assert status == 202
        dead_id = reply["id"]
        # on_invalid = "warn": accepted and routed (and logged).
        status, _ = await send(http, base, "com.example.noted", b'{"code": 5}', j)
        assert status == 202

        # Protobuf, selected by the dataschema attribute.
        order = order_class(tmp_path)
        good_pb = order(id="o-9", lines=[{"sku": "x", "qty": 1}]).SerializeToString()
        pb = "application/protobuf"
        status, reply = await send(http, base, "com.example.pb", good_pb, pb, dataschema="urn:example:shop.Order")
        assert status == 202, reply
        status, reply = await send(
            http, base, "com.example.pb", b"\xff\xff\xff", pb, dataschema="urn:example:shop.Order"
        )
        assert status == 422
        assert "does not parse as shop.Order" in reply["errors"][0]["detail"]
        # field 2's Line with an unknown field 9 (a varint): its pointer is /lines/0.
        foreign = bytes([0x0A, 0x01, 0x61, 0x12, 0x02, 0x48, 0x01])
        status, reply = await send(http, base, "com.example.pb", foreign, pb, dataschema="urn:example:shop.Order")
        assert status == 422, reply
        assert [e["pointer"] for e in reply["errors"]] == ["/lines/0"]
        assert "field number 9" in reply["errors"][0]["detail"]
        # The same bytes without the dataschema attribute: no schema applies.
        status, _ = await send(http, base, "com.example.pb", foreign, pb)
        assert status == 202

        # Avro behind the Confluent wire header.
        av = "application/avro"
        status, reply = await send(http, base, "com.example.reading", avro({"device": "d1", "temp": 21.5}), av)
        assert status == 202, reply
        status, reply = await send(http, base, "com.example.reading", avro({"device": "d1", "temp": 1.0}, 8), av)
        assert status == 422
        assert "schema id 8, expected 7" in reply["errors"][0]["detail"]
        status, reply = await send(http, base, "com.example.reading", avro({"device": "d", "temp": 1.0})[:-3], av)
        assert status == 422
        assert "ends before the record" in reply["errors"][0]["detail"]

        # gRPC: the same refusal is INVALID_ARGUMENT with the same text.
        async with grpc.aio.insecure_channel(f"127.0.0.1:{qs.grpc_port}") as ch:
            env = envelope_pb2.Envelope(
                id="g-1", source="/g", spec_version="1.0", type=ORDER, binary_data=b'{"qty": 0}'
            )
            env.attributes["datacontenttype"].ce_string = j
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await service_pb2_grpc.MediatorStub(ch).Publish(env, timeout=10)
            assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "schema 'orders'" in (refused.value.details() or "")
            assert "/qty: 0 is less than the minimum of 1" in (refused.value.details() or "")

        # What was routed: the valid legacy event, the warned one, the two Protobuf ones, the Avro one.
        got = [await get_one(checked) for _ in range(5)]
        assert sorted(m.headers["cloudEvents_type"] for m in got) == sorted(  # type: ignore[type-var]
            ["com.example.legacy", "com.example.noted", "com.example.pb", "com.example.pb", "com.example.reading"]
        )
        await asyncio.sleep(0.3)
        assert await checked.get(fail=False) is None, "an invalid event was routed"
        async with http.get(base + "/admin/dead-letters") as resp:
            # (The valid orders are dead letters too, at the orders exchange nobody here is bound to.)
            letters = [d for d in (await resp.json())["dead_letters"] if not d["reason"].startswith("unroutable")]
        assert [d["event_id"] for d in letters] == [dead_id]
        assert "schema 'legacy'" in letters[0]["reason"]
        assert "/code" in letters[0]["reason"]
        assert "additional" in letters[0]["reason"].lower()
    assert "schema.invalid" in proc.logs()


def test_check_names_a_schema_file_it_cannot_read_or_compile(tmp_path: Path) -> None:
    (tmp_path / "broken.json").write_text('{"type": "object", "properties": {"a": {"type": 12}}}')
    qs = Quickstart(
        tmp_path,
        extra_toml='[[schemas]]\nname = "gone"\nkind = "json"\nfile = "missing.json"\ntypes = ["t"]\n\n'
        '[[schemas]]\nname = "broken"\nkind = "json"\nfile = "broken.json"\ntypes = ["t"]\n\n'
        '[[schemas]]\nname = "pb"\nkind = "protobuf"\nfile = "broken.json"\nmessage = "a.B"\ntypes = ["t"]\n',
    )
    out = subprocess.run(
        [sys.executable, "-m", "mediator", "check", "--config", str(qs.write())],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )
    assert out.returncode != 0
    assert "schemas[0].file: cannot read" in out.stderr, out.stderr
    assert "schemas[1].file: 'broken.json' is not a usable json schema" in out.stderr, out.stderr
    assert "schemas[2].file: 'broken.json' is not a usable protobuf schema" in out.stderr, out.stderr
