"""The dead-letter classes: one table, one classifier. A test per class over the reason texts the daemon
writes (the producers' own code where it is pure: the router, the dispatcher over the in-memory outbox),
and the metrics counting each under its class. The real-broker side (AMQP NO_ROUTE, a webhook's 400 and
503, an undecodable AMQP message, an enrichment miss) is tests/observability/test_dead_letter_classes_e2e.py
and tests/adapters/test_amqp.py::test_outbound_unroutable_is_terminal."""

from __future__ import annotations

import pytest

from mediator.core import deadletter
from mediator.core.deadletter import CLASSES, DELIVERY_CLASSES, EVENT_CLASSES, classify
from mediator.core.egress import Egress
from mediator.core.envelope import new_event
from mediator.core.errors import RetryableDeliveryError, TerminalDeliveryError
from mediator.core.patterns import Template
from mediator.core.router import DestinationSpec, Router, RouteSpec
from mediator.core.transform import Transform, TransformConfig
from mediator.observability.metrics import REASONS_DEAD, Metrics
from mediator.outbox.base import Accepted
from tests.core.test_dispatch import FakeOutbound, event, running

# (reason as the daemon writes it, outbound, class)
CASES = [
    (
        "unroutable: exchange 'orders' has no queue bound for routing key 'orders.priority' (NO_ROUTE)",
        "o",
        "unroutable",
    ),
    ("unroutable: event has no attribute 'subject'", "o", "unroutable"),
    ("unroutable: invalid MQTT topic 'a/+/b': wildcards are not allowed", "mqtt", "unroutable"),
    ("unroutable: routing key longer than 255 bytes: 'xx'...", "o", "unroutable"),
    ("unroutable: invalid URL 'http://[::1'", "hook", "unroutable"),
    (
        "transform failed: cannot convert to Avro shop.Order: field 'extra' is not in shop.Order",
        "o",
        "transform_failed",
    ),
    ("transform failed: jsonata timed out", "o", "transform_failed"),
    ("gave up after 10 attempts: HTTP 503 Service Unavailable", "hook", "exhausted"),
    ("gave up after 3 attempts: unroutable: not a real prefix here", "o", "exhausted"),
    ("removed: outbound 'old' was removed from the config", "old", "removed"),
    ("removed: outbound 'old' is no longer configured", "old", "removed"),
    ("HTTP 404 Not Found: no such hook", "hook", "terminal"),
    ("broker refused the message: Quota exceeded (0x97)", "mqtt", "terminal"),
    ("unknown format 'xml'", "o", "terminal"),
    ("no route matched", "", "unmatched"),
    ("undecodable: malformed structured event: Expecting property name", "", "ingress"),
    ("rejected: invalid: missing type", "", "ingress"),
    ("enrich:crm: no entry for 'customer:c9'", "", "stage"),
    ("aggregate:orders: the aggregation is no longer configured", "", "stage"),
    ("data/qty: 0 is less than the minimum of 1", "", "stage"),
]


@pytest.mark.parametrize(("reason", "outbound", "cls"), CASES)
def test_each_reason_is_classified(reason: str, outbound: str, cls: str) -> None:
    assert classify(reason, outbound) == cls


def test_one_table_covers_the_metric_and_every_class_has_a_case_and_a_meaning() -> None:
    assert tuple(c.name for c in CLASSES) == REASONS_DEAD
    assert set(DELIVERY_CLASSES) | set(EVENT_CLASSES) == set(REASONS_DEAD)
    assert not set(DELIVERY_CLASSES) & set(EVENT_CLASSES)
    assert {cls for _, _, cls in CASES} == set(REASONS_DEAD), "a test per class"
    for c in CLASSES:
        assert len(c.meaning) > 20, c
    # Each scope has exactly one default (a class without prefixes), and it is listed last in its scope.
    for scope in (deadletter.DELIVERY, deadletter.EVENT):
        names = [c for c in CLASSES if c.scope == scope]
        assert [c.name for c in names if not c.prefixes] == [names[-1].name]


def test_the_router_writes_unroutable_and_transform_failed_reasons() -> None:
    env = new_event(type="t", source="/s", data=b"not json", content_type="application/json")
    egress = Egress(Transform(TransformConfig(remove=["data.x"])), None)  # data that is not JSON: it fails
    spec = RouteSpec(
        "r",
        (
            DestinationSpec("o", Template.compile("a.{subject}")),
            DestinationSpec("o", Template.compile("b"), egress=egress),
        ),
    )
    deliveries, failures = Router([spec]).route(env)
    assert deliveries == []
    assert [classify(f.reason, f.outbound) for f in failures] == ["unroutable", "transform_failed"]
    assert failures[1].address == "b", "an egress failure names its destination's address"


async def test_the_dispatcher_counts_terminal_unroutable_and_exhausted_under_their_classes() -> None:
    metrics = Metrics()
    out = FakeOutbound(
        "out",
        [
            TerminalDeliveryError("HTTP 400 Bad Request"),
            TerminalDeliveryError("unroutable: exchange 'x' has no queue bound for routing key 'out/2'"),
        ],
    )
    fails = RetryableDeliveryError("connection refused")
    async with running(out, metrics=metrics) as h:
        await h.pipeline.accept([event(1)])
        await h.settled()
        await h.pipeline.accept([event(2)])
        await h.settled()
        out.failures = [fails] * 5
        await h.pipeline.accept([event(3)])
        await h.settled()
        letters = await h.outbox.dead_letters()
    assert [classify(d.reason, d.outbound) for d in letters] == ["terminal", "unroutable", "exhausted"]
    counted = metrics.totals()["dead_letters"]
    assert {k: v for k, v in counted.items() if v} == {
        ("out", "terminal"): 1.0,
        ("out", "unroutable"): 1.0,
        ("out", "exhausted"): 1.0,
    }


def test_whole_event_dead_letters_are_counted_by_their_reason() -> None:
    metrics = Metrics()
    inbound = metrics.inbound("in")
    items = [
        Accepted(event(1), (), (), dead_reason=deadletter.UNMATCHED_REASON),
        Accepted(event(2), (), (), dead_reason="enrich:crm: no entry for 'c:1'"),
    ]
    metrics.committed(items, [], inbound)
    metrics.dead_letter("", "undecodable: not JSON")
    metrics.dead_letter("", "aggregate:a: cannot make the composite: x")  # a stage, not an inbound's refusal
    metrics.dead_letter("gone", "removed: outbound 'gone' was removed from the config")
    counted = {k: v for k, v in metrics.totals()["dead_letters"].items() if v}
    assert counted == {
        ("", "unmatched"): 1.0,
        ("", "stage"): 2.0,
        ("", "ingress"): 1.0,
        ("gone", "removed"): 1.0,
    }
    assert metrics.totals()["events_unmatched"] == {("in",): 1.0}
