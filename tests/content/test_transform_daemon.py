"""Transformations and format conversion through the real daemon: each field operation and a JSONata
expression as AMQP consumers on the shared RabbitMQ receive them, the untransformed destination of the
same event, a failing (and a runaway) transform dead-lettering only its destination, an inbound's
transform seen by every destination, and JSON -> Protobuf / Avro -> JSON through real consumers: HTTP JSON
in, AMQP Protobuf (Avro) out decoded with the message class (fastavro); gRPC Protobuf (Avro) in, JSON at
a webhook the test runs. Descriptor sets come from grpc_tools.protoc over a .proto the test writes. One
daemon for the module."""

from __future__ import annotations

import asyncio
import importlib.util
import io
import json
import signal
import struct
import sys
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import aio_pika
import aiohttp
import fastavro
import grpc
import pytest
import pytest_asyncio
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage, AbstractQueue
from aiohttp import web

from mediator.v1 import envelope_pb2, service_pb2_grpc
from tests.e2e.test_quickstart import bound_queue, get_one
from tests.support.daemon import DaemonProcess, Quickstart
from tests.support.net import RABBIT_URL, free_port

pytestmark = [pytest.mark.timeout(60), pytest.mark.asyncio(loop_scope="module")]

PROTO = """
syntax = "proto3";
package shoptest;
import "google/protobuf/timestamp.proto";

message Line {
  string sku = 1;
  int32 qty = 2;
  double price = 3;
}

message Order {
  string order_id = 1;
  double total = 2;
  repeated Line lines = 3;
  google.protobuf.Timestamp placed_at = 4;
}
"""

AVRO_SCHEMA = {
    "type": "record",
    "name": "Order",
    "namespace": "shoptest",
    "fields": [
        {"name": "order_id", "type": "string"},
        {"name": "total", "type": "double"},
        {
            "name": "lines",
            "type": {
                "type": "array",
                "items": {
                    "type": "record",
                    "name": "Line",
                    "fields": [{"name": "sku", "type": "string"}, {"name": "qty", "type": "int"}],
                },
            },
        },
        {"name": "note", "type": ["null", "string"], "default": None},
    ],
}
SCHEMA_ID = 7

ORDER = {
    "order_id": "o-1",
    "total": 1500.5,
    "lines": [{"sku": "a", "qty": 2, "price": 3.5}, {"sku": "b", "qty": 1, "price": 10.0}],
    "placed_at": "2024-05-01T12:00:00Z",
}
AVRO_ORDER = {"order_id": "o-2", "total": 99.0, "lines": [{"sku": "c", "qty": 3}], "note": "gift"}


def routes(hook: str) -> str:
    return f"""
[inbound.shaped-http]
kind = "http"
listener = "http"
path = "/shaped"
type = "com.example.shop.shaped"
source = "/shaped"
transform = {{ remove = ["data.internal"], add = {{ "data.via" = "{{inbound}}" }} }}

[outbound.hook]
kind = "http"
url = "{hook}"

[[routes]]
name = "ops"
match = {{ type = ["com.example.shop.ops"] }}

[[routes.to]]
outbound = "orders-exchange"
address = "t.ops"

[routes.to.transform]
remove = ["data.secret", "color"]
rename = {{ "data.cust" = "data.customer", "data.deviceId" = "subject" }}
replace = {{ "data.status" = "seen-on-{{topic}}", "data.absent" = "never" }}
add = {{ "data.total" = 0, "data.tags" = ["a", "b"], "data.meta.route" = "ops", "region" = "{{subject}}" }}
promote = {{ "data.orderId" = "orderid" }}

[[routes.to]]
outbound = "orders-exchange"
address = "t.plain"

[[routes]]
name = "summary"
match = {{ type = ["com.example.shop.summary"] }}

[[routes.to]]
outbound = "orders-exchange"
address = "t.summary"
transform.jsonata = '{{"id": orderId, "lines": $count(items), "sum": $sum(items.(qty * price)), "who": $event.subject}}'

[[routes]]
name = "fragile"
match = {{ type = ["com.example.shop.fragile"] }}

[[routes.to]]
outbound = "orders-exchange"
address = "t.fragile.ok"

[[routes.to]]
outbound = "orders-exchange"
address = "t.fragile.promoted"
transform = {{ promote = {{ "data.obj" = "objattr" }} }}

[[routes.to]]
outbound = "orders-exchange"
address = "t.fragile.loop"
transform = {{ jsonata = "( $f := function($x){{ $f($x + 1) }}; $f(1) )", jsonata_timeout_s = 0.05 }}

[[routes]]
name = "shaped"
match = {{ type = ["com.example.shop.shaped"] }}
to = [{{ outbound = "orders-exchange", address = "t.shaped" }}, {{ outbound = "hook", address = "/shaped" }}]

[[routes]]
name = "to-protobuf"
match = {{ type = ["com.example.shop.proto"] }}

[[routes.to]]
outbound = "orders-exchange"
address = "t.proto"
convert.to = "protobuf"
convert.descriptor_set = "orders.pb"
convert.message = "shoptest.Order"
convert.dataschema = "https://schemas.example.com/shoptest.Order"

[[routes]]
name = "from-protobuf"
match = {{ type = ["com.example.shop.proto-in"] }}

[[routes.to]]
outbound = "hook"
address = "/orders"
convert = {{ to = "json", descriptor_set = "orders.pb", message = "shoptest.Order" }}

[[routes]]
name = "to-avro"
match = {{ type = ["com.example.shop.avro"] }}

[[routes.to]]
outbound = "orders-exchange"
address = "t.avro"
convert = {{ to = "avro", avro_schema = "order.avsc", schema_id = {SCHEMA_ID} }}

[[routes]]
name = "from-avro"
match = {{ type = ["com.example.shop.avro-in"] }}

[[routes.to]]
outbound = "hook"
address = "/avro"
convert = {{ to = "json", avro_schema = "order.avsc", schema_id = {SCHEMA_ID} }}
"""


@dataclass
class Hooked:
    path: str
    headers: dict[str, str]
    body: bytes


@dataclass
class Env:
    daemon: DaemonProcess
    qs: Quickstart
    base: str
    http: aiohttp.ClientSession
    channel: AbstractChannel
    hook: asyncio.Queue[Hooked]
    orders_pb2: ModuleType

    async def post(self, type_: str, data: Any, subject: str | None = None, path: str = "/events", **attrs: str) -> str:
        event_id = uuid.uuid4().hex
        headers = {"ce-specversion": "1.0", "ce-id": event_id, "ce-source": "/test", "ce-type": type_}
        headers["Content-Type"] = "application/json"
        if subject is not None:
            headers["ce-subject"] = subject
        headers.update({f"ce-{k}": v for k, v in attrs.items()})
        async with self.http.post(self.base + path, data=json.dumps(data), headers=headers) as resp:
            assert resp.status == 202, await resp.text()
            if path != "/events":
                event_id = (await resp.json())["id"]
        return event_id

    async def queue(self, key: str) -> AbstractQueue:
        return await bound_queue(self.channel, self.qs.orders_exchange, key)

    async def publish_grpc(self, type_: str, data: bytes, content_type: str) -> str:
        env = envelope_pb2.Envelope(
            id=uuid.uuid4().hex, source="/grpc-test", spec_version="1.0", type=type_, binary_data=data
        )
        env.attributes["datacontenttype"].ce_string = content_type
        async with grpc.aio.insecure_channel(f"127.0.0.1:{self.qs.grpc_port}") as channel:
            stub = service_pb2_grpc.MediatorStub(channel)
            await stub.Publish(env, timeout=10)
        return env.id

    async def dead_letters(self, event_id: str, expect: int = 1, timeout_s: float = 15.0) -> list[dict[str, Any]]:
        """The dead letters of one event (one per destination that failed), once there are ``expect`` of them:
        polled with a deadline, since a destination dead-letters after its publish was accepted."""
        deadline = time.monotonic() + timeout_s
        while True:
            async with self.http.get(f"{self.base}/admin/dead-letters", params={"limit": "1000"}) as resp:
                assert resp.status == 200
                letters = [d for d in (await resp.json())["dead_letters"] if d["event_id"] == event_id]
            if len(letters) >= expect:
                return letters
            assert time.monotonic() < deadline, f"{expect} dead letters of {event_id} expected, got {letters}"
            await asyncio.sleep(0.05)


def compile_proto(tmp: Path) -> ModuleType:
    """orders.pb (with its imports) and orders_pb2.py from the .proto, by grpc_tools' protoc."""
    import grpc_tools  # type: ignore[import-untyped]
    from grpc_tools import protoc

    (tmp / "orders.proto").write_text(PROTO)
    include = Path(grpc_tools.__file__).parent / "_proto"
    code = protoc.main(
        [
            "protoc",
            f"-I{tmp}",
            f"-I{include}",
            "--include_imports",
            f"--descriptor_set_out={tmp / 'orders.pb'}",
            f"--python_out={tmp}",
            str(tmp / "orders.proto"),
        ]
    )
    assert code == 0, "protoc failed"
    spec = importlib.util.spec_from_file_location("orders_pb2", tmp / "orders_pb2.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["orders_pb2"] = module
    spec.loader.exec_module(module)
    return module


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def env(
    tmp_path_factory: pytest.TempPathFactory, rabbitmq: str, mosquitto: tuple[str, int]
) -> AsyncIterator[Env]:
    tmp = tmp_path_factory.mktemp("transform")
    orders_pb2 = compile_proto(tmp)
    (tmp / "order.avsc").write_text(json.dumps(AVRO_SCHEMA))

    hooked: asyncio.Queue[Hooked] = asyncio.Queue()

    async def receive(request: web.Request) -> web.Response:
        hooked.put_nowait(Hooked(request.path, dict(request.headers), await request.read()))
        return web.Response(status=204)

    app = web.Application()
    app.router.add_post("/{tail:.*}", receive)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()

    qs = Quickstart(tmp, extra_toml=routes(f"http://127.0.0.1:{port}"))
    daemon = DaemonProcess(qs.write(), qs.http_port, tmp / "daemon.log")
    await daemon.start()
    conn = await aio_pika.connect(RABBIT_URL)
    try:
        async with conn, aiohttp.ClientSession() as http:
            channel = await conn.channel()
            yield Env(daemon, qs, f"http://127.0.0.1:{qs.http_port}", http, channel, hooked, orders_pb2)
    finally:
        code = await daemon.stop(signal.SIGTERM)
        await runner.cleanup()
        assert code == 0, daemon.logs()


def headers_of(msg: AbstractIncomingMessage) -> dict[str, Any]:
    return {k: (v.decode() if isinstance(v, bytes) else v) for k, v in (msg.headers or {}).items()}


async def nothing_at(queue: AbstractQueue, wait_s: float = 0.5) -> None:
    await asyncio.sleep(wait_s)
    assert await queue.get(fail=False) is None


async def hooked(env: Env, path: str, timeout_s: float = 15.0) -> Hooked:
    async with asyncio.timeout(timeout_s):
        while True:
            got = await env.hook.get()
            if got.path == path:
                return got


async def test_field_operations_in_order_and_the_other_destination_untouched(env: Env) -> None:
    ops, plain = await env.queue("t.ops"), await env.queue("t.plain")
    data = {
        "orderId": "o-9",
        "cust": "c1",
        "deviceId": "dev-7",
        "secret": "s3cr3t",
        "status": "new",
        "total": 12.5,
    }
    event_id = await env.post("com.example.shop.ops", data, subject="web", color="red")
    got = await get_one(ops)
    assert got.message_id == event_id
    assert json.loads(got.body) == {
        "orderId": "o-9",
        "customer": "c1",  # renamed
        "status": "seen-on-events",  # replaced (present), template over the inbound topic (the path)
        "total": 12.5,  # add only where absent
        "tags": ["a", "b"],
        "meta": {"route": "ops"},
    }, "secret removed, deviceId moved to subject, 'absent' not replaced into existence"
    attrs = headers_of(got)
    assert attrs["cloudEvents_subject"] == "dev-7", "renamed from data into the subject"
    assert attrs["cloudEvents_region"] == "dev-7", "add ran after rename: {subject} is the new subject"
    assert attrs["cloudEvents_orderid"] == "o-9", "promoted (copied) into an attribute"
    assert "cloudEvents_color" not in attrs, "an attribute removed"
    assert got.content_type == "application/json"

    untouched = await get_one(plain)
    assert untouched.message_id == event_id
    assert json.loads(untouched.body) == data, "another destination of the same event gets it as sent"
    assert headers_of(untouched)["cloudEvents_subject"] == "web"
    assert headers_of(untouched)["cloudEvents_color"] == "red"


async def test_jsonata_reshapes_the_data(env: Env) -> None:
    summary = await env.queue("t.summary")
    items = [{"sku": "a", "qty": 2, "price": 3.5}, {"sku": "b", "qty": 1, "price": 10}]
    event_id = await env.post("com.example.shop.summary", {"orderId": "o-3", "items": items}, subject="alice")
    got = await get_one(summary)
    assert got.message_id == event_id
    assert json.loads(got.body) == {"id": "o-3", "lines": 2, "sum": 17, "who": "alice"}


async def test_a_failing_transform_dead_letters_only_its_destination(env: Env) -> None:
    ok, promoted, loop = [await env.queue(f"t.fragile.{k}") for k in ("ok", "promoted", "loop")]
    good = [await env.post("com.example.shop.fragile", {"obj": f"v{i}"}) for i in range(2)]
    bad = [await env.post("com.example.shop.fragile", {"obj": {"nested": i}}) for i in range(2)]
    got_ok = sorted([(await get_one(ok)).message_id or "" for _ in range(4)])
    assert got_ok == sorted(good + bad), "the untransformed destination gets every event"
    got_promoted = [await get_one(promoted) for _ in range(2)]
    assert sorted(m.message_id or "" for m in got_promoted) == sorted(good)
    assert {headers_of(m)["cloudEvents_objattr"] for m in got_promoted} == {"v0", "v1"}
    await nothing_at(promoted)
    await nothing_at(loop, 0.1)
    runaway = "transform failed: jsonata ran longer than 0.05 s"
    for event_id in good:
        assert [d["reason"] for d in await env.dead_letters(event_id)] == [runaway]
    for event_id in bad:
        letters = await env.dead_letters(event_id, expect=2)
        assert {(d["route"], d["outbound"]) for d in letters} == {("fragile", "orders-exchange")}
        reasons = {d["reason"] for d in letters}
        assert reasons == {runaway, "transform failed: a dict cannot become an attribute"}
    assert "transform.failed" in env.daemon.logs()


async def test_an_inbound_transform_is_seen_by_every_destination(env: Env) -> None:
    queue = await env.queue("t.shaped")
    event_id = await env.post("com.example.shop.shaped", {"a": 1, "internal": "x"}, path="/shaped")
    expected = {"a": 1, "via": "shaped-http"}
    got = await get_one(queue)
    assert got.message_id == event_id
    assert json.loads(got.body) == expected
    hook = await hooked(env, "/shaped")
    assert hook.headers["ce-id"] == event_id
    assert json.loads(hook.body) == expected


async def test_json_to_protobuf_at_an_amqp_consumer(env: Env) -> None:
    queue = await env.queue("t.proto")
    event_id = await env.post("com.example.shop.proto", ORDER, dataschema="https://schemas.example.com/order.json")
    got = await get_one(queue)
    assert got.message_id == event_id
    assert got.content_type == "application/protobuf"
    assert headers_of(got)["cloudEvents_dataschema"] == "https://schemas.example.com/shoptest.Order"
    order = env.orders_pb2.Order()
    order.ParseFromString(got.body)
    assert (order.order_id, order.total) == ("o-1", 1500.5)
    assert [(line.sku, line.qty, line.price) for line in order.lines] == [("a", 2, 3.5), ("b", 1, 10.0)]
    assert order.placed_at.ToJsonString() == "2024-05-01T12:00:00Z"

    # A JSON order the message cannot hold dead-letters that destination, with the reason.
    wrong = await env.post("com.example.shop.proto", {"order_id": "o-x", "colour": "red"})
    await nothing_at(queue, 0.3)
    (letter,) = await env.dead_letters(wrong)
    assert letter["reason"].startswith("transform failed: cannot convert to Protobuf shoptest.Order: "), letter
    assert "colour" in letter["reason"]


async def test_protobuf_from_grpc_to_json_at_a_webhook(env: Env) -> None:
    order = env.orders_pb2.Order(order_id="o-1", total=1500.5)
    order.lines.add(sku="a", qty=2, price=3.5)
    order.lines.add(sku="b", qty=1, price=10.0)
    order.placed_at.FromJsonString("2024-05-01T12:00:00Z")
    event_id = await env.publish_grpc("com.example.shop.proto-in", order.SerializeToString(), "application/protobuf")
    hook = await hooked(env, "/orders")
    assert hook.headers["ce-id"] == event_id
    assert hook.headers["Content-Type"].startswith("application/json")
    assert json.loads(hook.body) == ORDER, "JSON -> Protobuf -> JSON gives the original order back"


async def test_avro_both_ways_with_the_confluent_header(env: Env) -> None:
    queue = await env.queue("t.avro")
    event_id = await env.post("com.example.shop.avro", AVRO_ORDER)
    got = await get_one(queue)
    assert got.message_id == event_id
    assert got.content_type == "application/avro"
    magic, schema_id = struct.unpack(">bI", got.body[:5])
    assert (magic, schema_id) == (0, SCHEMA_ID)
    parsed = fastavro.parse_schema(AVRO_SCHEMA)
    assert fastavro.schemaless_reader(io.BytesIO(got.body[5:]), parsed, None) == AVRO_ORDER

    # The consumer's bytes, published over gRPC, come out at the webhook as the JSON they started as.
    back = await env.publish_grpc("com.example.shop.avro-in", got.body, "application/avro")
    hook = await hooked(env, "/avro")
    assert hook.headers["ce-id"] == back
    assert json.loads(hook.body) == AVRO_ORDER

    # Bytes without the frame (or of another schema id) dead-letter that destination.
    buf = io.BytesIO()
    fastavro.schemaless_writer(buf, parsed, AVRO_ORDER)
    unframed = await env.publish_grpc("com.example.shop.avro-in", buf.getvalue(), "application/avro")
    (letter,) = await env.dead_letters(unframed)
    assert "Confluent wire format" in letter["reason"], letter
