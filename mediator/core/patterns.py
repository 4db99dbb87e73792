"""Topic patterns, globs and address templates: compiled once at config load, pure at run time."""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from mediator.core.envelope import Envelope, attribute


def compile_glob(pattern: str) -> Callable[[str], bool]:
    """``*`` matches any run of characters (dots included), ``?`` one; an exact string matches itself."""
    if not any(c in pattern for c in "*?["):
        return pattern.__eq__
    return re.compile(fnmatch.translate(pattern)).match  # type: ignore[return-value]


@dataclass(frozen=True, slots=True)
class TopicPattern:
    """An MQTT-style topic filter applied to a topic split on its own separator.

    ``+`` (or ``*``, as AMQP and NATS write it) matches exactly one segment, ``#`` zero or more trailing
    segments (NATS's ``>``, one or more, is read as ``#``: a route's pattern is a filter over topics, and
    the inbound's own subscription already decided what arrives). The pattern is written with the
    separator of the topics it is meant for (``devices/+/telemetry`` for MQTT and HTTP paths,
    ``telemetry.#`` for AMQP routing keys, ``sensors.*.temperature`` or ``sensors.>`` for NATS subjects).
    """

    text: str

    def segments(self, separator: str) -> tuple[str, ...]:
        return tuple(self.text.split(separator))

    def matches(self, topic: str, separator: str) -> bool:
        pattern = self.segments(separator)
        parts = topic.split(separator)
        for i, seg in enumerate(pattern):
            if seg in ("#", ">"):
                return i == len(pattern) - 1
            if i >= len(parts):
                return False
            if seg in ("+", "*"):
                continue
            if seg != parts[i]:
                return False
        return len(parts) == len(pattern)


def validate_topic_pattern(text: str) -> str | None:
    """A reason the pattern is malformed, or None."""
    for sep in ("/", "."):
        segs = text.split(sep)
        if "#" in segs[:-1] or ">" in segs[:-1]:
            return "'#' (or '>') may only be the last segment"
    return None


class TemplateError(ValueError):
    """An address template referred to something the event does not have."""


_TOKEN = re.compile(r"\{\{|\}\}|\{([^{}]*)\}|[{}]")
_REF = re.compile(r"^(topic(\.-?\d+)?|inbound|[a-z0-9]{1,64})$")


@dataclass(frozen=True, slots=True)
class Template:
    """An address template such as ``telemetry.{topic.1}`` or ``devices/{subject}/commands``.

    Placeholders: ``{topic}`` (the inbound topic, routing key or path), ``{topic.N}`` (its N-th segment,
    0-based, negative from the end), ``{inbound}``, and any context attribute by name (``{type}``,
    ``{source}``, ``{id}``, ``{subject}``, extensions). ``{{`` and ``}}`` are literal braces.
    """

    text: str
    parts: tuple[str, ...]  # alternating literal, reference, literal, ...

    @classmethod
    def compile(cls, text: str) -> Template:
        # Scanned left to right like str.format, so "{{{topic}}}" is "{" + {topic} + "}".
        parts: list[str] = []
        literal: list[str] = []
        pos = 0
        for m in _TOKEN.finditer(text):
            literal.append(text[pos : m.start()])
            pos = m.end()
            token, ref = m.group(0), m.group(1)
            if token in ("{{", "}}"):
                literal.append(token[0])
            elif ref is None:
                raise ValueError(f"unbalanced braces in template {text!r}")
            elif not _REF.match(ref):
                raise ValueError(f"unknown placeholder {{{ref}}} in template {text!r}")
            else:
                parts += ["".join(literal), ref]
                literal = []
        literal.append(text[pos:])
        parts.append("".join(literal))
        return cls(text, tuple(parts))

    @property
    def is_static(self) -> bool:
        return len(self.parts) == 1

    def render(self, env: Envelope) -> str:
        if len(self.parts) == 1:
            return self.parts[0]
        out: list[str] = []
        for i, part in enumerate(self.parts):
            out.append(self._resolve(env, part) if i % 2 else part)
        return "".join(out)

    @staticmethod
    def _resolve(env: Envelope, ref: str) -> str:
        prov = env.provenance
        if ref == "inbound":
            return prov.inbound
        if ref == "topic":
            return prov.topic
        if ref.startswith("topic."):
            segs = prov.topic.split(prov.topic_separator or "/")
            index = int(ref[6:])
            try:
                return segs[index]
            except IndexError:
                raise TemplateError(f"topic {prov.topic!r} has no segment {index}") from None
        value = attribute(env, ref)
        if value is None:
            raise TemplateError(f"event has no attribute {ref!r}")
        return value


def any_of(matchers: Sequence[Callable[[str], bool]], value: str) -> bool:
    return any(m(value) for m in matchers)
