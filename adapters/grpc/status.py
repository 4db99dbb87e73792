"""Delivery status over gRPC: ``GetStatus``, and ``Publish`` with metadata ``prefer: wait=N``.

The status document (``mediator/status.py``, the JSON of ``GET /events/{id}/status``) as the
``EventStatus`` message; its times (ISO 8601) become Timestamps."""

from __future__ import annotations

from google.protobuf.timestamp_pb2 import Timestamp

from mediator.v1.service_pb2 import DestinationStatus, EventStatus


def _timestamp(value: object) -> Timestamp | None:
    if not isinstance(value, str):
        return None
    ts = Timestamp()
    ts.FromJsonString(value)
    return ts


def to_message(doc: dict[str, object]) -> EventStatus:
    msg = EventStatus(
        id=str(doc.get("id", "")),
        source=str(doc.get("source", "")),
        inbound=str(doc.get("inbound", "")),
        state=str(doc.get("state", "")),
        settled=bool(doc.get("settled")),
        reason=str(doc.get("reason") or ""),
    )
    for field, key in (("received", "received_at"), ("settled_at", "settled_at")):
        ts = _timestamp(doc.get(key))
        if ts is not None:
            getattr(msg, field).CopyFrom(ts)
    destinations = doc.get("destinations")
    for d in destinations if isinstance(destinations, list) else ():
        attempts = d.get("attempts", 0)
        dest = DestinationStatus(
            route=str(d.get("route", "")),
            outbound=str(d.get("outbound", "")),
            address=str(d.get("address", "")),
            state=str(d.get("state", "")),
            attempts=attempts if isinstance(attempts, int) else 0,
            reason=str(d.get("reason") or ""),
        )
        ts = _timestamp(d.get("delivered_at") or d.get("dead_at"))
        if ts is not None:
            dest.at.CopyFrom(ts)
        msg.destinations.append(dest)
    return msg
