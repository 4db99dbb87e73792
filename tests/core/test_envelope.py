"""Event construction helpers."""

from __future__ import annotations

import time
import uuid

from mediator.core.envelope import attribute, new_event, new_id


def test_new_id_is_a_canonical_version_4_uuid() -> None:
    ids = [new_id() for _ in range(2000)]
    assert len(set(ids)) == len(ids)
    for value in ids:
        parsed = uuid.UUID(value)
        assert parsed.version == 4
        assert parsed.variant == uuid.RFC_4122
        assert str(parsed) == value


def test_new_event_is_stamped_with_now() -> None:
    before = time.time_ns()
    env = new_event(type="t", source="/s", data=b"x", content_type="text/plain")
    after = time.time_ns()
    ts = env.attributes["time"].ce_timestamp
    assert before <= ts.seconds * 1_000_000_000 + ts.nanos <= after
    assert attribute(env, "datacontenttype") == "text/plain"
    assert env.spec_version == "1.0"
    assert env.binary_data == b"x"
