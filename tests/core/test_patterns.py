"""Topic filters, globs and address templates."""

from __future__ import annotations

import pytest

from mediator.core.envelope import Envelope, new_event
from mediator.core.patterns import Template, TemplateError, TopicPattern, compile_glob, validate_topic_pattern


def event(topic: str = "devices/42/telemetry", separator: str = "/", inbound: str = "edge") -> Envelope:
    env = new_event(type="com.example.reading", source="/sensors", data=b"{}", id="ev-1", subject="kitchen")
    env.attributes["region"].ce_string = "eu"
    env.attributes["seq"].ce_integer = 7
    env.provenance.inbound = inbound
    env.provenance.topic = topic
    env.provenance.topic_separator = separator
    return env


# ---------------------------------------------------------------------------------------------- topic patterns
@pytest.mark.parametrize(
    ("pattern", "topic", "expected"),
    [
        ("devices/+/telemetry", "devices/42/telemetry", True),
        ("devices/+/telemetry", "devices/42/status", False),
        ("devices/+/telemetry", "devices/42/x/telemetry", False),
        ("devices/+/telemetry", "devices/telemetry", False),
        ("devices/*/telemetry", "devices/42/telemetry", True),
        ("devices/+", "devices", False),
        ("devices/+", "devices/", True),  # an empty segment is still a segment
        ("devices/#", "devices/42/telemetry", True),
        ("devices/#", "devices", True),  # '#' also matches zero segments (MQTT 4.7.1.2)
        ("devices/#", "other/42", False),
        ("#", "anything/at/all", True),
        ("#", "", True),
        ("+/+/#", "a/b", True),
        ("+/+/#", "a", False),
        ("devices/42/telemetry", "devices/42/telemetry", True),
        ("devices/42/telemetry", "devices/42/telemetry/", False),
        ("devices/42", "devices/42/telemetry", False),
    ],
)
def test_topic_pattern_with_slash(pattern: str, topic: str, expected: bool) -> None:
    assert TopicPattern(pattern).matches(topic, "/") is expected


@pytest.mark.parametrize(
    ("pattern", "topic", "expected"),
    [
        ("telemetry.*.temp", "telemetry.kitchen.temp", True),
        ("telemetry.+.temp", "telemetry.kitchen.temp", True),
        ("telemetry.*.temp", "telemetry.kitchen.humidity", False),
        ("telemetry.#", "telemetry.kitchen.temp", True),
        ("telemetry.#", "telemetry", True),
        ("telemetry.#", "metrics.kitchen", False),
        ("telemetry.*", "telemetry.kitchen.temp", False),
    ],
)
def test_topic_pattern_with_dot(pattern: str, topic: str, expected: bool) -> None:
    assert TopicPattern(pattern).matches(topic, ".") is expected


def test_topic_pattern_splits_only_on_the_given_separator() -> None:
    # With '/' as separator, a dotted routing key is ONE segment.
    assert TopicPattern("telemetry.*").matches("telemetry.kitchen", "/") is False
    assert TopicPattern("+").matches("telemetry.kitchen", "/") is True
    assert TopicPattern("+").matches("telemetry.kitchen", ".") is False


@pytest.mark.parametrize(
    ("text", "valid"),
    [("a/#", True), ("#", True), ("a.#", True), ("a/#/b", False), ("#.a", False), ("a/+/b", True)],
)
def test_validate_topic_pattern(text: str, valid: bool) -> None:
    assert (validate_topic_pattern(text) is None) is valid


# ---------------------------------------------------------------------------------------------- globs
@pytest.mark.parametrize(
    ("pattern", "value", "expected"),
    [
        ("com.example.*", "com.example.reading", True),
        ("com.example.*", "com.example.a.b.c", True),  # '*' crosses dots
        ("com.example.*", "org.example.reading", False),
        ("com.example.reading", "com.example.reading", True),
        ("com.example.reading", "com.example.readings", False),
        ("com.example.reading", "com.example.readin", False),
        ("com.?xample", "com.example", True),
        ("com.?xample", "com.xample", False),
        ("*", "", True),
        ("/sensors/[ab]", "/sensors/a", True),
        ("/sensors/[ab]", "/sensors/c", False),
    ],
)
def test_compile_glob(pattern: str, value: str, expected: bool) -> None:
    assert bool(compile_glob(pattern)(value)) is expected


def test_glob_matches_the_whole_string() -> None:
    match = compile_glob("a*b")
    assert match("axxb")
    assert not match("axxbc")
    assert not match("xaxxb")


# ---------------------------------------------------------------------------------------------- templates
@pytest.mark.parametrize("text", ["a{b", "a}b", "{", "}", "{topic", "topic}", "{{topic}", "x{topic}}y}"])
def test_template_rejects_unbalanced_braces(text: str) -> None:
    with pytest.raises(ValueError, match="unbalanced"):
        Template.compile(text)


@pytest.mark.parametrize("text", ["{}", "{Type}", "{topic.x}", "{topic.}", "{sub ject}", "{a-b}", "x{topic.1.2}"])
def test_template_rejects_unknown_placeholders(text: str) -> None:
    with pytest.raises(ValueError, match="unknown placeholder"):
        Template.compile(text)


def test_template_compile_errors_are_not_template_errors() -> None:
    # A bad template is a config error (ValueError), not a per-event TemplateError.
    with pytest.raises(ValueError, match="unknown placeholder") as info:
        Template.compile("{Nope}")
    assert not isinstance(info.value, TemplateError)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("static.address", "static.address"),
        ("{topic}", "devices/42/telemetry"),
        ("t.{topic.0}", "t.devices"),
        ("t.{topic.1}", "t.42"),
        ("t.{topic.-1}", "t.telemetry"),
        ("t.{topic.-3}", "t.devices"),
        ("{inbound}/{type}", "edge/com.example.reading"),
        ("{source}|{id}|{specversion}", "/sensors|ev-1|1.0"),
        ("devices/{subject}/commands", "devices/kitchen/commands"),
        ("{region}-{seq}", "eu-7"),
        ("{{literal}}", "{literal}"),
        ("{{{topic.1}}}", "{42}"),
        ("a{{b}}c{topic.1}", "a{b}c42"),
        ("", ""),
    ],
)
def test_template_render(text: str, expected: str) -> None:
    assert Template.compile(text).render(event()) == expected


def test_template_topic_segments_use_the_events_separator() -> None:
    env = event(topic="telemetry.kitchen.temp", separator=".")
    assert Template.compile("{topic.1}/{topic.-1}").render(env) == "kitchen/temp"


def test_template_topic_separator_defaults_to_slash() -> None:
    env = event(topic="a/b/c", separator="")
    assert Template.compile("{topic.2}").render(env) == "c"


def test_template_is_static() -> None:
    assert Template.compile("fixed").is_static
    assert Template.compile("{{fixed}}").is_static
    assert not Template.compile("x.{topic}").is_static


@pytest.mark.parametrize(
    ("text", "fragment"),
    [("{nosuch}", "nosuch"), ("x.{topic.3}", "segment 3"), ("x.{topic.-4}", "segment -4")],
)
def test_template_render_missing_reference_raises_template_error(text: str, fragment: str) -> None:
    with pytest.raises(TemplateError, match=fragment):
        Template.compile(text).render(event())
