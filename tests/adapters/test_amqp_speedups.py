"""FastProperties encodes exactly what pamqp's Basic.Properties encodes (see adapters/amqp/speedups.py)."""

from __future__ import annotations

import datetime
import random
import string
from decimal import Decimal
from typing import Any

import pytest
from aiormq.abc import ChannelFrame
from pamqp import frame, header
from pamqp.body import ContentBody
from pamqp.commands import Basic

from adapters.amqp.speedups import FastProperties, publish_frames, str_table

TS = datetime.datetime(2024, 5, 6, 7, 8, 9, tzinfo=datetime.UTC)

CASES: list[dict[str, Any]] = [
    {},
    {"delivery_mode": 2},
    {
        "content_type": "application/json",
        "headers": {
            "cloudEvents_specversion": "1.0",
            "cloudEvents_id": "7f674d9e-a193-468b-b441-f49c084a5e53",
            "cloudEvents_source": "/orders",
            "cloudEvents_type": "com.example.order.created",
            "cloudEvents_time": "2024-05-06T07:08:09.500Z",
        },
        "delivery_mode": 2,
        "message_id": "7f674d9e",
        "timestamp": TS,
        "message_type": "com.example.order.created",
    },
    {"headers": {}},
    {"headers": {"ce-subject": "", "ce-data": "é ü 漢字 \u2028", "a": "x" * 70_000}},
    {"headers": {"zeta": "1", "alpha": "2", "Beta": "3", "_": "4"}},  # sorted by key on the wire
    # Not all strings: pamqp encodes these itself.
    {"headers": {"n": 1, "b": True, "f": 1.5, "d": Decimal("1.25"), "t": TS, "m": {"x": "y"}, "l": ["a", 2]}},
    {"headers": {"k" * 200: "long key: pamqp truncates it to 128 bytes"}},
    {
        "content_type": "text/plain",
        "content_encoding": "gzip",
        "headers": {"h": "v"},
        "delivery_mode": 1,
        "priority": 5,
        "correlation_id": "c-1",
        "reply_to": "amq.rabbitmq.reply-to",
        "expiration": "60000",
        "message_id": "m-1",
        "timestamp": TS,
        "message_type": "t",
        "user_id": "guest",
        "app_id": "mediator",
    },
]


@pytest.mark.parametrize("props", CASES)
def test_same_bytes_as_pamqp(props: dict[str, Any]) -> None:
    assert FastProperties(**props).marshal() == Basic.Properties(**props).marshal()


def test_same_bytes_for_random_string_tables() -> None:
    rng = random.Random(7)
    alphabet = string.printable + "éüß漢字🙂"
    for _ in range(300):
        headers = {
            "".join(rng.choices(alphabet, k=rng.randint(1, 40))): "".join(rng.choices(alphabet, k=rng.randint(0, 300)))
            for _ in range(rng.randint(0, 12))
        }
        props: dict[str, Any] = {"headers": headers, "message_id": "id", "delivery_mode": 2}
        assert FastProperties(**props).marshal() == Basic.Properties(**props).marshal()


def test_the_shortcut_is_taken_only_for_string_tables() -> None:
    assert str_table({"a": "b"}) is not None
    assert str_table({"a": 1}) is None
    assert str_table({"k" * 129: "v"}) is None


def test_a_whole_content_header_frame_decodes_back() -> None:
    props = FastProperties(**CASES[2])
    data = frame.marshal(header.ContentHeader(0, 1024, props), 1)
    _, channel, decoded = frame.unmarshal(data)
    assert channel == 1
    assert isinstance(decoded, header.ContentHeader)
    assert decoded.body_size == 1024
    assert decoded.properties.headers == CASES[2]["headers"]
    assert decoded.properties.message_id == "7f674d9e"
    assert decoded.properties.timestamp == TS


def _pamqp_publish_frames(channel: int, exchange: str, routing_key: str, props: Basic.Properties, body: bytes) -> bytes:
    return ChannelFrame.marshall(
        channel_number=channel,
        frames=[
            Basic.Publish(exchange=exchange, routing_key=routing_key, mandatory=True),
            header.ContentHeader(properties=props, body_size=len(body)),
            *([ContentBody(body)] if body else []),  # no body frame for an empty body (aiormq sends none)
        ],
    ).payload


def test_publish_frames_are_the_frames_pamqp_marshals() -> None:
    rng = random.Random(11)
    exchange_chars = string.ascii_letters + string.digits + "-_.:"
    for i in range(300):
        channel = rng.choice([1, 2, 255, 65535])
        exchange = "".join(rng.choices(exchange_chars, k=rng.choice([0, 1, 20, 127])))
        routing_key = "".join(rng.choices(string.printable + "éü漢🙂", k=rng.randint(0, 60)))
        body = rng.randbytes(rng.choice([0, 1, 1024, 70_000]))
        props = CASES[i % len(CASES)]
        expected = _pamqp_publish_frames(channel, exchange, routing_key, Basic.Properties(**props), body)
        assert publish_frames(channel, exchange, routing_key, FastProperties(**props), body) == expected


def test_publish_frames_refuse_what_pamqp_refuses() -> None:
    with pytest.raises(ValueError, match="Invalid value for exchange"):
        publish_frames(1, "bad exchange name!", "k", FastProperties(), b"")
    with pytest.raises(ValueError, match="Max length exceeded for exchange"):
        publish_frames(1, "x" * 128, "k", FastProperties(), b"")
    with pytest.raises(ValueError, match="routing key longer than 255 bytes"):
        publish_frames(1, "ok", "k" * 256, FastProperties(), b"")
