"""CloudEvents event formats, independent of any protocol: JSON (structured and batch) and Protobuf.

Pure functions, no I/O. The JSON format follows CloudEvents 1.0 json-format.md: ``data`` holds JSON when
the content type is JSON (or absent), a string for other text, and ``data_base64`` for anything else.
"""

from __future__ import annotations

import base64
import json
import math
from typing import Any

from mediator.core.envelope import (
    Envelope,
    data_bytes,
    set_attribute,
    validate,
    value_to_str,
)
from mediator.core.errors import RejectCode, Rejected

JSON_CONTENT_TYPE = "application/cloudevents+json"
BATCH_CONTENT_TYPE = "application/cloudevents-batch+json"
PROTOBUF_CONTENT_TYPE = "application/cloudevents+protobuf"

FORMATS = ("binary", "structured", "protobuf")
"""What a destination can ask for: ``binary`` (attributes in protocol metadata, payload untouched),
``structured`` (the whole event as CloudEvents JSON) or ``protobuf`` (the whole event as CloudEvents Protobuf)."""


def is_json(content_type: str | None) -> bool:
    """True for JSON media types, and for an absent content type (which CloudEvents reads as JSON)."""
    if not content_type:
        return True
    media = content_type.split(";", 1)[0].strip().lower()
    return media == "application/json" or media == "text/json" or media.endswith("+json")


def is_text(content_type: str | None) -> bool:
    if not content_type:
        return False
    media = content_type.split(";", 1)[0].strip().lower()
    return media.startswith("text/") or media in ("application/xml",) or media.endswith("+xml")


def to_json_dict(env: Envelope) -> dict[str, Any]:
    out: dict[str, Any] = {
        "specversion": env.spec_version,
        "id": env.id,
        "source": env.source,
        "type": env.type,
    }
    for name, value in env.attributes.items():
        kind = value.WhichOneof("attr")
        if kind == "ce_boolean":
            out[name] = value.ce_boolean
        elif kind == "ce_integer":
            out[name] = value.ce_integer
        else:
            out[name] = value_to_str(value)
    data_kind = env.WhichOneof("data")
    if data_kind is None or (data_kind == "binary_data" and not env.binary_data):
        return out  # no data (an empty body is "no data", not JSON null)
    data = data_bytes(env)
    content_type = out.get("datacontenttype")
    ct = content_type if isinstance(content_type, str) else None
    if data_kind == "text_data" and not is_json(ct):
        out["data"] = env.text_data
    elif data_kind != "proto_data" and is_json(ct):
        try:
            out["data"] = json.loads(data) if data else None
        except ValueError:
            out["data_base64"] = base64.b64encode(data).decode("ascii")
    elif data_kind != "proto_data" and is_text(ct):
        try:
            out["data"] = data.decode("utf-8")
        except UnicodeDecodeError:
            out["data_base64"] = base64.b64encode(data).decode("ascii")
    else:
        out["data_base64"] = base64.b64encode(data).decode("ascii")
    return out


def from_json_dict(obj: object) -> Envelope:
    try:
        return _from_json_dict(obj)
    except UnicodeEncodeError as exc:
        # A JSON escape of half a surrogate pair ("\ud800") parses to a str that is not Unicode text: protobuf
        # and UTF-8 refuse it. It was a bare UnicodeEncodeError (dead letters on broker inbounds with
        # "cannot decode: ..."), seen through the mqtt_inbound fuzz target.
        raise Rejected(
            RejectCode.INVALID, f"a string holds a lone surrogate (a \\u{ord(exc.object[exc.start]):04x} escape)"
        ) from None


def _from_json_dict(obj: object) -> Envelope:
    if not isinstance(obj, dict):
        raise Rejected(RejectCode.INVALID, "a structured CloudEvent must be a JSON object")
    env = Envelope()
    data: Any = None
    has_data = False
    for name, value in obj.items():
        if name == "data":
            data, has_data = value, True
        elif name == "data_base64":
            if not isinstance(value, str):
                raise Rejected(RejectCode.INVALID, "data_base64 must be a string")
            try:
                env.binary_data = base64.b64decode(value, validate=True)
            except ValueError as exc:
                raise Rejected(RejectCode.INVALID, "data_base64 is not valid base64") from exc
        elif isinstance(value, bool):
            if name in ("id", "source", "specversion", "type"):
                raise Rejected(RejectCode.INVALID, f"attribute {name!r} must be a string")
            set_attribute(env, name, "x")  # validates the name
            env.attributes[name].ce_boolean = value
        elif isinstance(value, int):
            if name in ("id", "source", "specversion", "type"):
                raise Rejected(RejectCode.INVALID, f"attribute {name!r} must be a string")
            if not -(2**31) <= value < 2**31:
                raise Rejected(RejectCode.INVALID, f"attribute {name!r} is outside the 32-bit Integer range")
            set_attribute(env, name, "x")
            env.attributes[name].ce_integer = value
        elif isinstance(value, str):
            set_attribute(env, name, value)
        elif value is None:
            continue
        else:
            raise Rejected(RejectCode.INVALID, f"attribute {name!r} must be a string, integer or boolean")
    if has_data and "data_base64" in obj:
        raise Rejected(RejectCode.INVALID, "an event cannot carry both data and data_base64")
    if has_data:
        content_type = obj.get("datacontenttype")
        ct = content_type if isinstance(content_type, str) else None
        if isinstance(data, str) and not is_json(ct):
            env.binary_data = data.encode("utf-8")
        else:
            env.binary_data = json.dumps(data, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    validate(env)
    return env


def to_structured(env: Envelope) -> bytes:
    return json.dumps(to_json_dict(env), separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def from_structured(body: bytes) -> Envelope:
    return from_json_dict(loads(body))


def to_batch(events: list[Envelope]) -> bytes:
    return json.dumps([to_json_dict(e) for e in events], separators=(",", ":"), ensure_ascii=False).encode()


def from_batch(body: bytes) -> list[Envelope]:
    obj = loads(body)
    if not isinstance(obj, list):
        raise Rejected(RejectCode.INVALID, "a CloudEvents batch must be a JSON array")
    return [from_json_dict(item) for item in obj]


def to_protobuf(env: Envelope) -> bytes:
    """CloudEvents Protobuf bytes: the envelope without the gateway-only provenance."""
    if not env.HasField("provenance"):
        return env.SerializeToString()
    copy = Envelope()
    copy.CopyFrom(env)
    copy.ClearField("provenance")
    return copy.SerializeToString()


def from_protobuf(body: bytes) -> Envelope:
    env = Envelope()
    try:
        env.ParseFromString(body)
    except Exception as exc:  # protobuf raises DecodeError, a bare Exception subclass in upb
        raise Rejected(RejectCode.INVALID, "body is not a CloudEvents Protobuf message") from exc
    env.ClearField("provenance")  # a sender cannot forge gateway facts
    validate(env)
    return env


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON value (RFC 8259 has no NaN or Infinity)")


def _finite(text: str) -> float:
    value = float(text)
    if math.isinf(value):
        raise ValueError(f"the number {text[:24]} is beyond a double")
    return value


def loads(body: bytes) -> Any:
    """A structured or batch body: JSON by RFC 8259, which Python's json module is not by default (it reads
    NaN, Infinity and 1e400 as floats that json.dumps writes back as NaN and Infinity, invalid JSON for
    every consumer; seen through the fuzz targets). Raises ``Rejected(INVALID)``."""
    try:
        return json.loads(body, parse_constant=_no_constant, parse_float=_finite)
    except ValueError as exc:
        raise Rejected(RejectCode.INVALID, f"body is not valid JSON: {exc}") from exc
    except RecursionError:  # the json module recurses per nesting level: 100,000 brackets are a 400, not a 500
        raise Rejected(RejectCode.INVALID, "body is not valid JSON: nested too deeply") from None
