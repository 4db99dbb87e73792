"""The translation table: which routes match an event and where its deliveries go."""

from __future__ import annotations

from collections.abc import Mapping

from mediator.core.envelope import Envelope, new_event
from mediator.core.patterns import Template, TopicPattern
from mediator.core.router import Delivery, DestinationSpec, Router, RouteSpec, Unroutable


def event(
    *,
    type: str = "com.example.reading",
    source: str = "/sensors/kitchen",
    inbound: str = "edge",
    topic: str = "devices/42/telemetry",
    separator: str = "/",
    attrs: Mapping[str, str] | None = None,
) -> Envelope:
    env = new_event(type=type, source=source, data=b"{}", id="ev-1")
    for name, value in (attrs or {}).items():
        env.attributes[name].ce_string = value
    env.provenance.inbound = inbound
    env.provenance.topic = topic
    env.provenance.topic_separator = separator
    return env


def dest(outbound: str = "out", address: str = "fixed", format: str = "binary") -> DestinationSpec:
    return DestinationSpec(outbound, Template.compile(address), format)


def route(
    name: str = "r",
    *destinations: DestinationSpec,
    inbounds: frozenset[str] = frozenset(),
    types: tuple[str, ...] = (),
    sources: tuple[str, ...] = (),
    topics: tuple[TopicPattern, ...] = (),
    attributes: Mapping[str, str] | None = None,
) -> RouteSpec:
    return RouteSpec(name, destinations or (dest(),), inbounds, types, sources, topics, dict(attributes or {}))


def matched(spec: RouteSpec, env: Envelope) -> bool:
    deliveries, failures = Router([spec]).route(env)
    assert not failures
    return bool(deliveries)


def test_a_route_without_conditions_matches_everything() -> None:
    deliveries, failures = Router([route("all", dest("out", "a.{topic.1}"))]).route(event())
    assert deliveries == [Delivery("all", "out", "a.42", "binary")]
    assert failures == []


def test_match_on_inbound() -> None:
    spec = route(inbounds=frozenset({"edge", "lab"}))
    assert matched(spec, event(inbound="edge"))
    assert matched(spec, event(inbound="lab"))
    assert not matched(spec, event(inbound="other"))


def test_match_on_type_glob() -> None:
    spec = route(types=("com.example.*", "org.exact.type"))
    assert matched(spec, event(type="com.example.reading"))
    assert matched(spec, event(type="com.example.a.b"))
    assert matched(spec, event(type="org.exact.type"))
    assert not matched(spec, event(type="org.exact.typed"))
    assert not matched(spec, event(type="net.example.reading"))


def test_match_on_source() -> None:
    spec = route(sources=("/sensors/*",))
    assert matched(spec, event(source="/sensors/kitchen"))
    assert not matched(spec, event(source="/actuators/kitchen"))


def test_match_on_topic_with_the_events_separator() -> None:
    slash = route(topics=(TopicPattern("devices/+/telemetry"),))
    assert matched(slash, event(topic="devices/42/telemetry"))
    assert not matched(slash, event(topic="devices/42/status"))

    dot = route(topics=(TopicPattern("telemetry.#"),))
    assert matched(dot, event(topic="telemetry.kitchen.temp", separator="."))
    assert not matched(dot, event(topic="metrics.kitchen", separator="."))
    # Without a separator in provenance the topic is split on '/'.
    assert matched(route(topics=(TopicPattern("a/+"),)), event(topic="a/b", separator=""))


def test_match_on_attributes() -> None:
    spec = route(attributes={"region": "eu-*", "subject": "kitchen"})
    assert matched(spec, event(attrs={"region": "eu-west", "subject": "kitchen"}))
    assert not matched(spec, event(attrs={"region": "us-east", "subject": "kitchen"}))
    assert not matched(spec, event(attrs={"region": "eu-west"}))  # absent attribute never matches
    # Required attributes are attributes too.
    assert matched(route(attributes={"id": "ev-*"}), event())


def test_all_conditions_must_hold() -> None:
    spec = route(inbounds=frozenset({"edge"}), types=("com.example.*",), sources=("/sensors/*",))
    assert matched(spec, event())
    assert not matched(spec, event(inbound="lab"))
    assert not matched(spec, event(type="other"))
    assert not matched(spec, event(source="/other"))


def test_fan_out_of_several_routes_in_route_order() -> None:
    router = Router(
        [
            route("mqtt", dest("broker", "t/{topic.1}"), dest("http", "https://example/{type}", "structured")),
            route("nomatch", dest("x"), types=("nothing",)),
            route("amqp", dest("rabbit", "telemetry.{topic.1}", "protobuf")),
        ]
    )
    deliveries, failures = router.route(event())
    assert deliveries == [
        Delivery("mqtt", "broker", "t/42", "binary"),
        Delivery("mqtt", "http", "https://example/com.example.reading", "structured"),
        Delivery("amqp", "rabbit", "telemetry.42", "protobuf"),
    ]
    assert failures == []


def test_identical_destinations_are_delivered_once() -> None:
    router = Router(
        [
            route("first", dest("out", "a.{topic.1}")),
            route("second", dest("out", "a.42"), dest("out", "a.42", "structured"), dest("other", "a.42")),
            route("third", dest("out", "a.{topic.1}")),
        ]
    )
    deliveries, _ = router.route(event())
    assert deliveries == [
        Delivery("first", "out", "a.42", "binary"),  # the first route to claim it owns it
        Delivery("second", "out", "a.42", "structured"),  # another format is another delivery
        Delivery("second", "other", "a.42", "binary"),  # another outbound is another delivery
    ]


def test_unrenderable_destination_is_unroutable_and_others_still_go() -> None:
    router = Router([route("r", dest("out", "x.{subject}"), dest("out", "x.{topic.9}"), dest("out", "ok"))])
    deliveries, failures = router.route(event())
    assert deliveries == [Delivery("r", "out", "ok", "binary")]
    assert [(f.route, f.outbound) for f in failures] == [("r", "out"), ("r", "out")]
    assert all(isinstance(f, Unroutable) for f in failures)
    assert "subject" in failures[0].reason
    assert "segment 9" in failures[1].reason


def test_no_match_is_empty() -> None:
    router = Router([route("r", types=("never.*",)), route("s", inbounds=frozenset({"nobody"}))])
    assert router.route(event()) == ([], [])
    assert Router([]).route(event()) == ([], [])
