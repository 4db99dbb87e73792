"""CloudEvents HTTP protocol binding (spec v1.0.2, http-protocol-binding.md). Pure functions, no I/O.

Binary mode: every context attribute travels as a ``ce-<name>`` header whose value is percent-encoded
(section 3.1.3.2); ``datacontenttype`` is the ``Content-Type`` header; the body is the data, untouched.
Structured, batch and Protobuf modes carry the whole event in the body (``mediator.core.formats``).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from datetime import UTC
from email.utils import parsedate_to_datetime
from urllib.parse import unquote_to_bytes

from mediator.core import formats
from mediator.core.envelope import Envelope, data_bytes, from_context_attributes, iter_attributes
from mediator.core.errors import RejectCode, Rejected

CE_PREFIX = "ce-"
CONTENT_TYPE = "content-type"

# Printable ASCII minus space, double-quote and percent: the only characters sent as they are.
_SAFE = frozenset(chr(c) for c in range(0x21, 0x7F)) - {'"', "%"}
_NEEDS_ENCODING = re.compile(r"[^\x21\x23-\x24\x26-\x7e]")


def encode_header_value(value: str) -> str:
    """Percent-encode an attribute value for an HTTP header (section 3.1.3.2): space, ``"``, ``%`` and
    everything outside U+0021..U+007E as the upper-case ``%XY`` of each UTF-8 byte."""
    if _NEEDS_ENCODING.search(value) is None:
        return value
    out: list[str] = []
    for ch in value:
        if ch in _SAFE:
            out.append(ch)
        else:
            out.extend(f"%{b:02X}" for b in ch.encode("utf-8"))
    return "".join(out)


def decode_header_value(value: str) -> str:
    """Undo ``encode_header_value``: unquote an RFC 7230 quoted-string, then one round of
    percent-decoding; byte sequences that are not valid UTF-8 are rejected (``Rejected(INVALID)``)."""
    value = value.strip(" \t")
    if len(value) >= 2 and value[0] == '"' and value[-1] == '"':
        value = _unquote_string(value[1:-1])
    if "%" not in value:
        if not value.isascii():
            # Header bytes that are not ASCII: aiohttp hands them over as UTF-8 (surrogate-escaped when
            # invalid); accept valid UTF-8, reject the rest.
            try:
                value.encode("utf-8")
            except UnicodeEncodeError as exc:
                raise Rejected(RejectCode.INVALID, "header value is not valid UTF-8") from exc
        return value
    try:
        raw = unquote_to_bytes(value.encode("utf-8"))
        return raw.decode("utf-8")
    except UnicodeError as exc:
        raise Rejected(RejectCode.INVALID, "percent-encoded header value is not valid UTF-8") from exc


def _unquote_string(inner: str) -> str:
    if "\\" not in inner:
        return inner
    out: list[str] = []
    escaped = False
    for ch in inner:
        if escaped:
            out.append(ch)
            escaped = False
        elif ch == "\\":
            escaped = True
        else:
            out.append(ch)
    return "".join(out)


def media_type(content_type: str | None) -> str:
    """The lower-case media type of a Content-Type value, without parameters ("" when absent)."""
    if not content_type:
        return ""
    return content_type.split(";", 1)[0].strip().lower()


def content_type_of(headers: Mapping[str, str]) -> str | None:
    """The Content-Type value; case-insensitive even over a plain dict."""
    value = headers.get("Content-Type")
    if value is None:
        value = next((v for k, v in headers.items() if k.lower() == CONTENT_TYPE), None)
    return value


def has_ce_headers(headers: Iterable[str]) -> bool:
    return any(name[:3].lower() == CE_PREFIX for name in headers)


def from_binary(headers: Mapping[str, str], body: bytes) -> Envelope:
    """A binary-mode request (``ce-*`` headers + Content-Type + body) as a validated envelope.

    Raises ``Rejected(INVALID)`` when a required attribute is missing, a name or value is malformed, or an
    attribute is given twice with different values."""
    attrs: dict[str, str] = {}
    content_type: str | None = None
    for name, raw in headers.items():
        lname = name.lower()
        if lname == CONTENT_TYPE:
            if content_type is None:
                content_type = raw
        elif lname[:3] == CE_PREFIX:
            attr = lname[3:]
            value = decode_header_value(raw)
            previous = attrs.setdefault(attr, value)
            if previous != value:
                raise Rejected(RejectCode.INVALID, f"header {name!r} given twice with different values")
    # Section 3.1.1: Content-Type *is* datacontenttype; a ce-datacontenttype header must not be sent, but
    # when it is (and Content-Type is absent) it is the sender's evident intent.
    if content_type is not None:
        attrs["datacontenttype"] = content_type
    return from_context_attributes(attrs, body)


def to_binary(env: Envelope) -> tuple[dict[str, str], bytes]:
    """Headers (``ce-*`` and ``Content-Type`` when the event has a datacontenttype) and body of a
    binary-mode message. Provenance is never written."""
    headers: dict[str, str] = {}
    for name, value in iter_attributes(env):
        if name == "datacontenttype":
            headers["Content-Type"] = value
        else:
            headers[CE_PREFIX + name] = encode_header_value(value)
    return headers, data_bytes(env)


def to_envelopes(headers: Mapping[str, str], body: bytes, *, max_batch: int) -> list[Envelope]:
    """Decode a CloudEvents HTTP request in whichever mode it uses, decided by Content-Type first (structured,
    batch, Protobuf), then by the presence of ``ce-`` headers (binary).

    Raises ``Rejected``: UNSUPPORTED_MEDIA when it is no CloudEvent at all, TOO_LARGE for a batch over
    ``max_batch`` events, INVALID for anything malformed (a batch is all-or-nothing)."""
    media = media_type(content_type_of(headers))
    if media == formats.JSON_CONTENT_TYPE:
        return [formats.from_structured(body)]
    if media == formats.BATCH_CONTENT_TYPE:
        return from_batch(body, max_batch=max_batch)
    if media == formats.PROTOBUF_CONTENT_TYPE:
        return [formats.from_protobuf(body)]
    if has_ce_headers(headers.keys()):
        return [from_binary(headers, body)]
    raise Rejected(
        RejectCode.UNSUPPORTED_MEDIA,
        f"not a CloudEvent: Content-Type {media or 'absent'!r} and no ce- headers; expected binary mode, "
        f"{formats.JSON_CONTENT_TYPE}, {formats.BATCH_CONTENT_TYPE} or {formats.PROTOBUF_CONTENT_TYPE}",
    )


def to_envelope(headers: Mapping[str, str], body: bytes) -> Envelope:
    """Decode one CloudEvent (binary, structured or Protobuf mode); a batch is refused here."""
    if media_type(content_type_of(headers)) == formats.BATCH_CONTENT_TYPE:
        raise Rejected(RejectCode.UNSUPPORTED_MEDIA, "a batch is not accepted here; send one event")
    return to_envelopes(headers, body, max_batch=1)[0]


def from_batch(body: bytes, *, max_batch: int) -> list[Envelope]:
    """A JSON batch, all-or-nothing; the refusal names the offending event's index."""
    items = formats.loads(body)
    if not isinstance(items, list):
        raise Rejected(RejectCode.INVALID, "a CloudEvents batch must be a JSON array")
    if len(items) > max_batch:
        raise Rejected(RejectCode.TOO_LARGE, f"batch of {len(items)} events exceeds the limit of {max_batch}")
    events: list[Envelope] = []
    for i, item in enumerate(items):
        try:
            events.append(formats.from_json_dict(item))
        except Rejected as exc:
            raise Rejected(exc.code, f"event [{i}]: {exc.reason}") from exc
    return events


def from_envelope(env: Envelope, format: str = "binary") -> tuple[dict[str, str], bytes]:
    """Headers and body of an HTTP request carrying ``env`` in ``format`` ("binary", "structured" or
    "protobuf"). Raises ValueError for an unknown format."""
    if format == "binary":
        return to_binary(env)
    if format == "structured":
        return {"Content-Type": formats.JSON_CONTENT_TYPE}, formats.to_structured(env)
    if format == "protobuf":
        return {"Content-Type": formats.PROTOBUF_CONTENT_TYPE}, formats.to_protobuf(env)
    raise ValueError(f"unknown format {format!r}; expected one of {', '.join(formats.FORMATS)}")


def parse_retry_after(value: str | None, now: float) -> float | None:
    """Retry-After in seconds from ``now`` (RFC 9110 section 10.2.3: delay-seconds or an HTTP-date);
    None when absent or unreadable, never negative."""
    if not value:
        return None
    value = value.strip()
    if value.isascii() and value.isdigit():  # str.isdigit alone takes '²', which int() refuses
        return float(int(value))
    try:
        when = parsedate_to_datetime(value)
    except (
        TypeError,
        ValueError,
        IndexError,
        OverflowError,
    ):  # OverflowError: a year beyond a C long (found by make fuzz)
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, when.timestamp() - now)
