"""The push adapter's own logic: address patterns, subscribe rules, the ring (a real SQLite file) and the
hub's seam between backlog and live."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from adapters.push.config import SubscribeRuleConfig, validate_address_pattern
from adapters.push.hub import DEFAULT_DENY, Hub, Subscriber, SubscribeRule, covers, refusing_rule
from adapters.push.ring import Ring, ring_path
from mediator.core.envelope import Envelope
from mediator.core.errors import RetryableDeliveryError
from mediator.core.ingress import Principal

pytestmark = pytest.mark.timeout(30)


def event(n: int, source: str = "/t") -> Envelope:
    env = Envelope(id=f"e{n}", source=source, spec_version="1.0", type="com.example.t")
    env.binary_data = f'{{"n": {n}}}'.encode()
    return env


@pytest.mark.parametrize(
    ("pattern", "ok"),
    [
        ("orders", True),
        ("orders.*", True),
        ("orders.#", True),
        ("#", True),
        ("*.created", True),
        ("", False),
        ("orders.", False),
        ("orders..x", False),
        ("or*", False),
        ("#.orders", False),
        ("a.#x", False),
    ],
)
def test_address_patterns(pattern: str, ok: bool) -> None:
    assert (validate_address_pattern(pattern) is None) is ok


@pytest.mark.parametrize(
    ("rule", "pattern", "covered"),
    [
        ("orders.#", "orders", True),
        ("orders.#", "orders.eu.paid", True),
        ("orders.#", "orders.*", True),
        ("orders.*", "orders.eu", True),
        ("orders.*", "orders.*", True),
        ("orders.*", "orders.#", False),
        ("orders.*", "orders", False),
        ("orders", "orders.*", False),
        ("orders.eu", "orders.*", False),
        ("#", "#", True),
        ("orders.#", "#", False),
    ],
)
def test_a_rule_covers_a_subscription_only_when_it_matches_everything_the_subscription_does(
    rule: str, pattern: str, covered: bool
) -> None:
    assert covers(rule, pattern) is covered


def test_subscribe_rules_default_deny_with_auth_and_deny_first() -> None:
    dash = Principal("dash", "api_key", "keys", frozenset({"dashboard"}))
    carol = Principal("carol", "api_key", "keys", frozenset({"dashboard"}))
    anon = Principal("", "unauthenticated", "anonymous")
    rules = [
        SubscribeRule.compile(
            SubscribeRuleConfig(name="no-carol", effect="deny", principals=["carol"], addresses=["orders.secret"])
        ),
        SubscribeRule.compile(SubscribeRuleConfig(name="dash", roles=["dashboard"], addresses=["orders.#"])),
    ]
    assert refusing_rule(rules, dash, "orders.*", auth=True) is None
    assert refusing_rule(rules, dash, "telemetry", auth=True) == DEFAULT_DENY
    assert refusing_rule(rules, carol, "orders.#", auth=True) == "no-carol"  # reaches into orders.secret
    assert refusing_rule(rules, carol, "orders.eu", auth=True) is None
    assert refusing_rule(rules, anon, "orders", auth=True) == DEFAULT_DENY
    assert refusing_rule([], anon, "orders", auth=False) is None
    assert refusing_rule([], dash, "orders", auth=True) == DEFAULT_DENY


async def test_the_ring_keeps_its_events_cursors_and_floor_across_a_reopen(tmp_path: Path) -> None:
    path = ring_path(str(tmp_path / "outbox.sqlite"), "b")
    assert path.endswith("outbox.push.b.sqlite")
    seen: list[int] = []
    ring = Ring("b", path, max_events=5, max_age_s=3600, on_append=lambda e: seen.append(e.cursor))
    await ring.open()
    entries = [await ring.append(event(i), "orders") for i in range(8)]
    assert [e.cursor for e in entries] == list(range(1, 9))
    assert seen == list(range(1, 9))
    assert [e.cursor for e in ring.after(0)] == [4, 5, 6, 7, 8]
    assert ring.floor == 3
    again = await ring.append(event(7), "orders")  # a redelivery: the same source and id
    assert again.cursor == 8
    assert len(ring.entries) == 5
    await ring.close()
    with pytest.raises(RetryableDeliveryError):
        await ring.append(event(99), "orders")

    reopened = Ring("b", path, max_events=5, max_age_s=3600)
    await reopened.open()
    assert [e.cursor for e in reopened.after(0)] == [4, 5, 6, 7, 8]
    assert [e.event.id for e in reopened.after(6)] == ["e6", "e7"]
    assert reopened.floor == 3
    assert (await reopened.append(event(8), "orders")).cursor == 9
    await reopened.close()

    # Everything expired: the cursors still go on from where they were, never reused.
    expired = Ring("b", path, max_events=5, max_age_s=0.001)
    await asyncio.sleep(0.01)  # let the events grow older than max_age_s
    await expired.open()
    assert not expired.entries
    assert expired.floor == 9
    assert (await expired.append(event(50), "orders")).cursor == 10
    await expired.close()


async def test_the_seam_between_backlog_and_live_has_no_gap_and_no_duplicate() -> None:
    ring = Ring("m", None, max_events=100, max_age_s=3600)
    hub = Hub("m", ring, max_subscribers=10, max_per_principal=10)
    ring.on_append = hub.publish
    await ring.open()
    for i in range(5):
        await ring.append(event(i), "orders.eu" if i % 2 else "orders.us")
    sub = Subscriber("orders.*", "k", "peer", "sse", limit=3, cursor=0)
    attached = hub.attach(sub, after=1)
    assert [e.cursor for e in attached.backlog] == [2, 3, 4, 5]
    assert attached.missed is None
    await ring.append(event(5), "orders.eu")
    await ring.append(event(6), "telemetry")  # not matched
    assert [e.cursor for e in sub.buffer] == [6]
    # A full buffer disconnects the subscriber instead of waiting.
    for i in range(7, 11):
        await ring.append(event(i), "orders.eu")
    assert sub.kicked == "slow_consumer"
    assert not sub.buffer
    hub.detach(sub, "client_closed")
    assert hub.disconnects["slow_consumer"] == 1
    assert hub.count == 0


async def test_a_cursor_older_than_the_ring_is_a_gap_and_a_limit_refuses() -> None:
    ring = Ring("m", None, max_events=3, max_age_s=3600)
    hub = Hub("m", ring, max_subscribers=2, max_per_principal=1)
    ring.on_append = hub.publish
    await ring.open()
    for i in range(6):
        await ring.append(event(i), "a")
    sub = Subscriber("a", "alice", "peer", "sse", limit=10, cursor=0)
    attached = hub.attach(sub, after=1)
    assert attached.missed == (1, 3)
    assert [e.cursor for e in attached.backlog] == [4, 5, 6]
    assert hub.gaps == 1
    assert hub.full("alice") is not None
    assert hub.full("bob") is None
    ahead = Subscriber("a", "bob", "peer", "sse", limit=10, cursor=0)
    assert hub.attach(ahead, after=99).ahead
    assert hub.full("carol") is not None  # two subscribers in all
