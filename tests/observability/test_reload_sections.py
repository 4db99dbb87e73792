"""Every reload tells the truth: each config section is applied live or named in ``restart_required``.

The table (mediator/reloadable.py) must decide every field of the root model and of ``[daemon]``; each
field's classification is then checked against what a reload reports and what stays in force. End to end,
the real daemon is reloaded and its reported outcome compared with what it does: tracing turned on by a
reload exports spans to an OTLP receiver this test runs and ``mediator_spans_total`` appears in /metrics,
a moved endpoint gets the next spans, ``sample_ratio`` applies, tracing turned off stops exporting (its
exporter is closed and a span-free event stays so), and the restart-only sections ([metrics], [outbox],
log_level) are named on every reload until a restart while their old values keep serving."""

from __future__ import annotations

import asyncio
import hashlib
import json
import sys
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aio_pika
import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from mediator.config import DaemonConfig, RootConfig
from mediator.daemon import RELOAD_STATUS_FILE
from mediator.reloadable import DAEMON_KEYS, LIVE, RESTART, SECTIONS, in_force, restart_required, unclassified
from tests.observability.test_reload_whole import events
from tests.observability.test_tracing_e2e import OtlpReceiver, attrs
from tests.support.daemon import ROOT, DaemonProcess, Quickstart
from tests.support.net import RABBIT_URL

# ---------------------------------------------------------------------------------------------- the table


def test_every_field_of_the_config_models_is_classified() -> None:
    assert unclassified() == [], "decide in mediator/reloadable.py whether a reload applies these"


class _Changed:
    """A value equal to nothing else: set on one field (``model_copy`` does not validate) to change it."""

    def __eq__(self, other: object) -> bool:
        return other is self

    __hash__ = object.__hash__


@pytest.mark.parametrize("section", sorted(RootConfig.model_fields))
def test_a_changed_root_section_is_live_or_named(section: str) -> None:
    started = RootConfig()
    if section == "daemon":  # a section of keys of both kinds: each is checked below
        return
    changed = _Changed()
    new = started.model_copy(update={section: changed})
    now = in_force(started, new)
    if SECTIONS[section] == RESTART:
        assert restart_required(started, new) == [section]
        assert getattr(now, section) == getattr(started, section)  # still what the process started with
        assert restart_required(started, now) == []  # and what is in force is the started value
    else:
        assert restart_required(started, new) == []
        assert getattr(now, section) is changed


@pytest.mark.parametrize("key", sorted(DaemonConfig.model_fields))
def test_a_changed_daemon_key_is_live_or_named(key: str) -> None:
    started = RootConfig()
    changed = _Changed()
    new = started.model_copy(update={"daemon": started.daemon.model_copy(update={key: changed})})
    now = in_force(started, new)
    if DAEMON_KEYS[key] == RESTART:
        assert restart_required(started, new) == [f"daemon.{key}"]
        assert getattr(now.daemon, key) == getattr(started.daemon, key)
    else:
        assert restart_required(started, new) == []
        assert getattr(now.daemon, key) is changed


def test_restart_required_names_each_section_that_waits() -> None:
    started = RootConfig()
    new = RootConfig.model_validate(
        {
            "daemon": {"log_level": "debug", "drain_timeout_s": 3.0},
            "metrics": {"path": "/m"},
            "outbox": {"max_batch": 7},
        }
    )
    assert restart_required(started, new) == ["outbox", "metrics", "daemon.log_level"]
    now = in_force(started, new)
    assert (now.daemon.log_level, now.daemon.drain_timeout_s, now.metrics.path) == ("info", 3.0, "/metrics")


# ---------------------------------------------------------------------------------------------- end to end

METRICS2 = '[metrics]\npath = "/metrics2"\n'


def tracing_toml(receiver: OtlpReceiver, **keys: object) -> str:
    lines = [
        "[tracing]",
        "enabled = true",
        f'endpoint = "http://127.0.0.1:{receiver.port}/v1/traces"',
        'service_name = "mediator-test"',
        "schedule_delay_s = 0.05",
    ]
    lines += [f"{k} = {json.dumps(v)}" for k, v in keys.items()]
    return "\n".join(lines) + "\n"


async def mediator(*args: str, timeout_s: float = 60.0) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "mediator",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        cwd=ROOT,
    )
    async with asyncio.timeout(timeout_s):
        out, err = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


class Reloader:
    """Writes the daemon's config file and runs ``mediator reload`` on it, as an operator does."""

    def __init__(self, qs: Quickstart, daemon: DaemonProcess) -> None:
        self.qs = qs
        self.daemon = daemon

    async def __call__(self, extra: str = "", **overrides: dict[str, object]) -> dict[str, Any]:
        base: dict[str, dict[str, object]] = {"daemon": {"drain_timeout_s": 3.0}}
        qs = Quickstart(
            self.qs.tmp,
            uid=self.qs.uid,
            http_port=self.qs.http_port,
            grpc_port=self.qs.grpc_port,
            extra_toml=extra,
            overrides=base | overrides,
        )
        text = qs.render()
        self.daemon.config.write_text(text)
        code, out, err = await mediator("reload", "--config", str(self.daemon.config))
        assert code == 0, (out, err, self.daemon.logs())
        outcome: dict[str, Any] = json.loads(out)
        # The daemon also notices the file's change by itself: an outcome of the file it saw then may be
        # the one printed. Either way the outcome wanted is of this text.
        version = hashlib.sha256(text.encode()).hexdigest()[:12]
        status = qs.tmp / RELOAD_STATUS_FILE
        async with asyncio.timeout(20):
            while outcome.get("version") != version:
                await asyncio.sleep(0.05)
                outcome = json.loads(status.read_text())
        assert outcome["outcome"] == "applied", outcome
        return outcome


@pytest.fixture
async def receivers() -> AsyncIterator[tuple[OtlpReceiver, OtlpReceiver]]:
    first, second = OtlpReceiver(), OtlpReceiver()
    await first.start()
    await second.start()
    try:
        yield first, second
    finally:
        await first.stop()
        await second.stop()


@pytest.fixture
async def running(tmp_path: Path, rabbitmq: str, mosquitto: tuple[str, int]) -> AsyncIterator[Reloader]:
    qs = Quickstart(tmp_path, overrides={"daemon": {"drain_timeout_s": 3.0}})
    proc = DaemonProcess(qs.write(), qs.http_port, tmp_path / "daemon.log")
    await proc.start()
    try:
        yield Reloader(qs, proc)
    finally:
        code = await proc.stop()
        assert code == 0, proc.logs()


async def post_order(port: int, traceparent: str | None = None) -> str:
    headers = {"traceparent": traceparent} if traceparent else {}
    async with (
        aiohttp.ClientSession() as http,
        http.post(f"http://127.0.0.1:{port}/orders", json={"order": 1}, headers=headers) as resp,
    ):
        assert resp.status == 202, await resp.text()
        event_id: str = (await resp.json())["id"]
        return event_id


async def span_counts(port: int) -> dict[str, float] | None:
    """``mediator_spans_total`` by outcome, or None when /metrics has no such family."""
    async with aiohttp.ClientSession() as http, http.get(f"http://127.0.0.1:{port}/metrics") as resp:
        assert resp.status == 200
        text = await resp.text()
    for family in text_string_to_metric_families(text):
        if family.name == "mediator_spans":
            return {s.labels["outcome"]: s.value for s in family.samples if s.name == "mediator_spans_total"}
    return None


def with_event(receiver: OtlpReceiver, event_id: str) -> list[str]:
    """The names of the spans ``receiver`` got that carry ``event_id``."""
    return [s.name for s in receiver.spans if attrs(s).get("messaging.message.id") == event_id]


async def traced_order(port: int, receiver: OtlpReceiver) -> tuple[str, str]:
    """POST an order in a new sampled trace; return (trace id, event id) once ``receiver`` has its receive
    span and both send spans."""
    trace_id = uuid.uuid4().hex
    event_id = await post_order(port, f"00-{trace_id}-{uuid.uuid4().hex[:16]}-01")
    wanted = {"POST /orders", "send orders-exchange", "send mqtt"}
    await receiver.wait(trace_id, lambda spans: wanted <= {s.name for s in spans})
    return trace_id, event_id


@pytest.mark.timeout(120)
@pytest.mark.broker
async def test_tracing_turned_on_moved_sampled_and_off_by_reload(
    running: Reloader, receivers: tuple[OtlpReceiver, OtlpReceiver]
) -> None:
    port = running.qs.http_port
    first, second = receivers
    assert await span_counts(port) is None  # started without [tracing]

    # On: spans exported at once, and counted.
    outcome = await running(tracing_toml(first))
    assert outcome["restart_required"] == []
    trace_a, _ = await traced_order(port, first)
    async with asyncio.timeout(15):
        while ((counts := await span_counts(port)) or {}).get("exported", 0) < 3:
            await asyncio.sleep(0.05)
    assert counts is not None
    assert counts["failed"] == 0

    # Moved: the next trace goes to the new endpoint only; the counter keeps counting rather than resetting.
    before = counts["exported"]
    outcome = await running(tracing_toml(second))
    assert outcome["restart_required"] == []
    trace_b, _ = await traced_order(port, second)
    assert first.of_trace(trace_b) == []
    async with asyncio.timeout(15):
        while ((counts := await span_counts(port)) or {}).get("exported", 0) < before + 3:
            await asyncio.sleep(0.05)
    await wait_log(running.daemon, "tracing.stopped", 1)  # the first exporter was closed

    # sample_ratio 0: a trace started here is not sampled (a caller's sampled flag still is: parent-based).
    await running(tracing_toml(second, sample_ratio=0.0))
    unsampled = await post_order(port)
    await traced_order(port, second)  # exported after the unsampled event, in the same order
    await wait_log(running.daemon, "tracing.stopped", 2)
    assert with_event(second, unsampled) == []

    # Off: nothing is recorded, and the exporter is stopped (flushed, logged); the counts stay in /metrics.
    outcome = await running()
    assert outcome["restart_required"] == []
    await wait_log(running.daemon, "tracing.stopped", 3)
    silent = await post_order(port)
    assert await span_counts(port) is not None
    # Back on, to the first endpoint: the next trace arrives there, and the event sent while off never did.
    await running(tracing_toml(first))
    await traced_order(port, first)
    await wait_log(running.daemon, "tracing.stopped", 3)
    assert with_event(first, silent) == []
    assert with_event(second, silent) == []
    assert first.of_trace(trace_a)
    assert second.of_trace(trace_a) == []


async def wait_log(daemon: DaemonProcess, name: str, count: int, timeout_s: float = 20.0) -> None:
    async with asyncio.timeout(timeout_s):
        while len(events(daemon, name)) < count:
            await asyncio.sleep(0.05)


async def get(port: int, path: str) -> int:
    async with aiohttp.ClientSession() as http, http.get(f"http://127.0.0.1:{port}{path}") as resp:
        return resp.status


@pytest.mark.timeout(120)
@pytest.mark.broker
async def test_restart_only_sections_are_named_until_a_restart_and_keep_serving(running: Reloader) -> None:
    port = running.qs.http_port
    # [metrics]: named, and the old endpoint keeps serving (the new path is not served).
    outcome = await running(METRICS2)
    assert outcome["restart_required"] == ["metrics"]
    assert (await get(port, "/metrics"), await get(port, "/metrics2")) == (200, 404)
    # Another reload that changes something live still names what waits.
    outcome = await running(METRICS2, outbox={"dedup_window_s": 10.0}, daemon={"log_level": "debug"})
    assert outcome["restart_required"] == ["outbox", "metrics", "daemon.log_level"]
    await post_order(port)
    assert not events(running.daemon, "envelope.accepted")  # debug lines: not logged until a restart
    # Live keys of [daemon] are not named; back to the started values, nothing waits.
    outcome = await running(daemon={"drain_timeout_s": 4.0, "removed_outbound": "keep"})
    assert outcome["restart_required"] == []
    assert (await get(port, "/metrics"), await get(port, "/metrics2")) == (200, 404)

    # After a restart the new [metrics] is in force.
    running.daemon.config.write_text(
        Quickstart(
            running.qs.tmp,
            uid=running.qs.uid,
            http_port=port,
            grpc_port=running.qs.grpc_port,
            extra_toml=METRICS2,
        ).render()
    )
    assert await running.daemon.stop() == 0
    await running.daemon.start()
    assert (await get(port, "/metrics"), await get(port, "/metrics2")) == (404, 200)


# ------------------------------------------------------------------- live sections, each against behaviour


class Orders:
    """What reaches the quickstart's orders exchange (every routing key), by the ``mark`` in its body."""

    def __init__(self) -> None:
        self.got: list[tuple[str, bytes, dict[str, object]]] = []

    async def consume(self, message: aio_pika.abc.AbstractIncomingMessage) -> None:
        self.got.append((str(message.routing_key), message.body, dict(message.headers)))
        await message.ack()

    async def arrived(self, key: str, mark: str, timeout_s: float = 15.0) -> dict[str, object]:
        """The headers of the ``key`` message whose body holds ``mark``, once it is there."""
        try:
            async with asyncio.timeout(timeout_s):
                while True:
                    for k, body, headers in self.got:
                        if k == key and mark.encode() in body:
                            return headers
                    await asyncio.sleep(0.05)
        except TimeoutError:
            got = [(k, body) for k, body, _ in self.got]
            raise AssertionError(f"no {key} message marked {mark} within {timeout_s} s; got {got}") from None


@dataclass
class Probe:
    port: int
    http: aiohttp.ClientSession
    orders: Orders

    async def post(self, path: str, body: dict[str, object], type_: str | None = None, **attributes: str) -> int:
        headers = {}
        if type_ is not None:  # a binary-mode CloudEvent to /events
            headers = {"ce-specversion": "1.0", "ce-id": uuid.uuid4().hex, "ce-source": "/t", "ce-type": type_}
            headers |= {f"ce-{k}": v for k, v in attributes.items()}
        async with self.http.post(f"http://127.0.0.1:{self.port}{path}", json=body, headers=headers) as resp:
            return resp.status


async def validation(p: Probe, after: bool) -> None:
    assert await p.post("/orders", {"pad": "x" * 100}) == (413 if after else 202)


async def schemas(p: Probe, after: bool) -> None:
    assert await p.post("/orders", {"no": "qty"}) == (422 if after else 202)
    assert await p.post("/orders", {"qty": 2}) == 202


async def rate_limits(p: Probe, after: bool) -> None:
    codes = [await p.post("/orders", {"n": i}) for i in range(3)]
    assert codes == ([202, 429, 429] if after else [202, 202, 202])


async def routing(p: Probe, after: bool) -> None:
    mark = uuid.uuid4().hex
    assert await p.post("/orders", {"total": 5000.0, "mark": mark}) == 202
    await p.orders.arrived("orders.created", mark)
    if after:  # mode "all" again: the second matching route contributes too
        await p.orders.arrived("orders.priority", mark)


async def dead_letters(p: Probe, after: bool) -> None:
    mark = uuid.uuid4().hex
    assert await p.post("/events", {"mark": mark}, type_="com.example.unrouted") == 202
    if after:  # forwarded to the destination the reload added
        await p.orders.arrived("dead.letters", mark)


async def security(p: Probe, after: bool) -> None:
    mark = uuid.uuid4().hex
    assert await p.post("/events", {"mark": mark}, type_="com.example.order.created", tenant="acme") == 202
    headers = await p.orders.arrived("orders.created", mark)
    # reserved_attributes: stripped from what arrives, as authcontext's are
    assert ("cloudEvents_tenant" in headers) is not after, headers


async def aggregate(p: Probe, after: bool) -> None:
    mark = uuid.uuid4().hex
    for line in (1, 2):
        assert await p.post("/events", {"orderId": mark, "line": line}, type_="com.example.line") == 202
    if after:  # the two lines make one composite, routed by its key
        await p.orders.arrived(f"agg.{mark}", mark)


async def routes(p: Probe, after: bool) -> None:
    mark = uuid.uuid4().hex
    assert await p.post("/events", {"mark": mark}, type_="com.example.added") == 202
    if after:
        await p.orders.arrived("added.key", mark)


SCHEMA = {"type": "object", "required": ["qty"], "properties": {"qty": {"type": "integer"}}}

# section: (its TOML at start, its TOML after the reload, the probe). The other live sections are shown
# applied by a reload elsewhere: [tracing] above; listeners, brokers, inbound, outbound in
# test_reload_whole.py; [[authorization]] and the API keys of [auth.NAME] in tests/security/test_auth_e2e.py;
# [[enrich]] in tests/content/test_enrich_daemon.py.
LIVE_CASES: dict[str, tuple[str, str, Callable[[Probe, bool], Awaitable[None]]]] = {
    "validation": ("", "[validation]\nmax_data_bytes = 64\n", validation),
    "schemas": (
        "",
        '[[schemas]]\nname = "qty"\nkind = "json"\nfile = "qty.json"\ntypes = ["com.example.order.created"]\n',
        schemas,
    ),
    "rate_limits": ("", '[[rate_limits]]\nname = "all"\nper = "global"\nrate = 0.01\nburst = 1\n', rate_limits),
    "routing": ('[routing]\nmode = "first"\n', "", routing),
    "dead_letters": (
        "",
        '[dead_letters]\nforward = { outbound = "orders-exchange", address = "dead.letters" }\n',
        dead_letters,
    ),
    "security": ("", '[security]\nreserved_attributes = ["tenant"]\n', security),
    "aggregate": (
        "",
        '[[aggregate]]\nname = "lines"\ntypes = ["com.example.line"]\nkey = "{data.orderId}"\ncount = 2\n'
        'type = "com.example.assembled"\nsource = "/aggregate"\n\n'
        '[[routes]]\nname = "assembled"\nmatch = { type = ["com.example.assembled"] }\n'
        'to = [{ outbound = "orders-exchange", address = "agg.{aggregatekey}" }]\n',
        aggregate,
    ),
    "routes": (
        "",
        '[[routes]]\nname = "added"\nmatch = { type = ["com.example.added"] }\n'
        'to = [{ outbound = "orders-exchange", address = "added.key" }]\n',
        routes,
    ),
}


@pytest.mark.timeout(90)
@pytest.mark.broker
@pytest.mark.parametrize("section", sorted(LIVE_CASES))
async def test_a_live_section_applies_at_once(
    section: str, tmp_path: Path, rabbitmq: str, mosquitto: tuple[str, int]
) -> None:
    """The outcome says applied with nothing waiting, and the next event already meets the new section."""
    assert SECTIONS[section] == LIVE
    start, reloaded, probe = LIVE_CASES[section]
    (tmp_path / "qty.json").write_text(json.dumps(SCHEMA))
    qs = Quickstart(tmp_path, extra_toml=start, overrides={"daemon": {"drain_timeout_s": 3.0}})
    proc = DaemonProcess(qs.write(), qs.http_port, tmp_path / "daemon.log")
    orders = Orders()
    async with await aio_pika.connect(RABBIT_URL) as amqp, aiohttp.ClientSession() as http:
        channel = await amqp.channel()
        exchange = await channel.declare_exchange(qs.orders_exchange, aio_pika.ExchangeType.TOPIC, durable=True)
        queue = await channel.declare_queue(exclusive=True)
        await queue.bind(exchange, "#")
        await queue.consume(orders.consume)
        await proc.start()
        try:
            p = Probe(qs.http_port, http, orders)
            await probe(p, False)
            outcome = await Reloader(qs, proc)(reloaded)
            assert outcome["restart_required"] == []
            await probe(p, True)
        finally:
            assert await proc.stop() == 0, proc.logs()
