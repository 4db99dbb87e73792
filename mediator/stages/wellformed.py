"""Well-formed or refused: every inbound event, whatever protocol brought it, before routing and commit.

Checks (CloudEvents 1.0.2, spec.md "Type System" and "Context Attributes"):

- the required attributes are there (``id``, ``source``, ``type`` non-empty, ``specversion`` "1.0"); no
  attribute of the map takes one of their names;
- names are lower-case ASCII letters and digits (a MUST). The spec's "SHOULD NOT exceed 20 characters"
  is a recommendation to producers, and a receiver must accept a valid event: names up to 64
  characters pass, as every codec reads them;
- String values hold no control characters (U+0000-U+001F, U+007F-U+009F) and no noncharacters; ``time``
  is an RFC 3339 date-time (a Timestamp in range, or a string of that form), ``dataschema`` an absolute
  URI, ``datacontenttype`` a media type (``type/subtype[;params]``);
- bounded: one value at most ``max_attribute_bytes`` (the required ``id``, ``source`` and ``type``
  too), at most ``max_attributes`` attributes and ``max_context_bytes`` of names and values together (the
  gateway's own ``authcontext`` attributes are not counted), the data at most ``max_data_bytes``;
- data that says JSON (``application/json``, ``text/json``, ``*+json``, or no datacontenttype with data
  present, as CloudEvents reads it: per ``absent_content_type``) parses as strict JSON within
  ``max_depth`` (``batch.data``, so the parse is shared with the stages and routes after this one);
  ``text/*`` data is UTF-8 unless a ``charset`` parameter names another encoding.

A refusal is ``Rejected(INVALID)`` (``TOO_LARGE`` for data over the bound) whose reason names what is
wrong and where (the attribute, the JSON position, the event's index in a batch), with every problem
found in ``errors``.
"""

from __future__ import annotations

import re
from datetime import date

from mediator.core.content import MAX_DEPTH, DataCache, content_type
from mediator.core.envelope import SHOWN_CHARS, Envelope, shown
from mediator.core.errors import ContentError, RejectCode, Rejected
from mediator.core.formats import is_json
from mediator.core.ingress import AUTH_ATTRIBUTES, Batch
from mediator.stages.content_config import ValidationConfig

_NAME = re.compile(r"[a-z0-9]{1,64}")
_REQUIRED = frozenset({"id", "source", "specversion", "type", "spec_version"})
_RESERVED = frozenset({"data", "data_base64"})
_NOT_COUNTED = frozenset(AUTH_ATTRIBUTES)
# CloudEvents String: "Sequence of allowable Unicode characters": no control characters, surrogates or
# noncharacters (U+FDD0-U+FDEF and the last two code points of every plane).
_FORBIDDEN = re.compile(
    "[\x00-\x1f\x7f-\x9f\ufdd0-\ufdef\ufffe\uffff"
    + "".join(f"{chr(p * 0x10000 + 0xFFFE)}{chr(p * 0x10000 + 0xFFFF)}" for p in range(1, 17))
    + "]"
)
_RFC3339 = re.compile(
    r"(\d{4})-(\d{2})-(\d{2})[Tt]([01]\d|2[0-3]):([0-5]\d):([0-5]\d|60)(\.\d{1,9})?([Zz]|[+-]([01]\d|2[0-3]):[0-5]\d)"
)
_ABSOLUTE_URI = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*:\S*")
_TOKEN = r"[!#$%&'*+.^_`|~0-9A-Za-z-]+"
_MEDIA_TYPE = re.compile(rf"{_TOKEN}/{_TOKEN}[ \t]*(;.*)?", re.DOTALL)
_CHARSET = re.compile(r";\s*charset\s*=\s*\"?([^\";\s]+)", re.IGNORECASE)
# google.protobuf.Timestamp's range: 0001-01-01T00:00:00Z to 9999-12-31T23:59:59.999999999Z.
_MIN_SECONDS, _MAX_SECONDS = -62_135_596_800, 253_402_300_799


def _forbidden(text: str) -> bool:
    # ASCII (nearly every value): isprintable is exactly "no C0 control character, no DEL", in C.
    return not text.isprintable() if text.isascii() else _FORBIDDEN.search(text) is not None


def _utf8_len(text: str) -> int:
    return len(text) if text.isascii() else len(text.encode("utf-8"))


def _shown_name(name: str) -> str:
    return name if len(name) <= SHOWN_CHARS else f"{name[:SHOWN_CHARS]}..."


def rfc3339_problem(text: str) -> str | None:
    """Why ``text`` is not an RFC 3339 date-time (section 5.6), or None."""
    m = _RFC3339.fullmatch(text)
    if m is None:
        return "is not an RFC 3339 date-time (YYYY-MM-DDTHH:MM:SS[.fraction](Z|+HH:MM))"
    try:
        date(int(m[1]), int(m[2]), int(m[3]))
    except ValueError:
        return f"names no calendar day ({m[1]}-{m[2]}-{m[3]})"
    return None


class WellFormed:
    """The ``wellformed`` stage (``[validation]``). Pure CPU, bounded by the limits it enforces."""

    name = "wellformed"

    def __init__(self, cfg: ValidationConfig) -> None:
        self.cfg = cfg
        self._max_value = cfg.max_attribute_bytes
        self._max_count = cfg.max_attributes
        self._max_context = cfg.max_context_bytes
        self._max_data = cfg.max_data_bytes
        self._depth = cfg.max_depth
        self._absent_json = cfg.absent_content_type == "json"
        self._broker_absent_json = cfg.broker_absent_content_type == "json"

    async def run(self, batch: Batch) -> None:
        if self._depth != MAX_DEPTH:
            # The first stage that reads the data: the batch's parses are bounded by [validation] max_depth.
            batch.data = DataCache(self._depth)
        absent_json = self._broker_absent_json if batch.origin.broker else self._absent_json
        events = batch.events
        for i, env in enumerate(events):
            try:
                self.check(env, batch.data, absent_json)
            except Rejected as exc:
                if len(events) > 1:
                    raise Rejected(exc.code, f"event [{i}]: {exc.reason}", errors=exc.errors) from None
                raise

    def check(self, env: Envelope, data: DataCache, absent_json: bool = True) -> None:
        """Raise ``Rejected`` unless ``env`` is well-formed (see the module's docstring)."""
        errors = self._attribute_errors(env)
        if errors:
            reason = "; ".join(f"attribute {e.attribute!r} {e.message}" if e.attribute else e.message for e in errors)
            raise Rejected(RejectCode.INVALID, reason, errors=tuple(errors))
        kind = env.WhichOneof("data")
        if kind is None:
            return
        if kind == "proto_data":
            size = len(env.proto_data.value)
        elif kind == "text_data":
            size = _utf8_len(env.text_data)
        else:
            size = len(env.binary_data)
        if size > self._max_data:
            raise Rejected(RejectCode.TOO_LARGE, f"data of {size} bytes exceeds the limit of {self._max_data}")
        if kind == "proto_data" or not size:
            return  # Protobuf data is typed by its Any (a schema can check it); no data is well-formed
        ct = content_type(env)
        if ct is None or is_json(ct):
            if ct is not None or absent_json:
                try:
                    data.get(env)  # the batch's shared parse; Rejected(INVALID) names the position
                except Rejected as exc:
                    said = f"datacontenttype {ct!r}" if ct else "no datacontenttype: JSON, as CloudEvents reads it"
                    reason = f"{exc.reason} ({said})"
                    raise Rejected(exc.code, reason, errors=(ContentError(exc.reason, pointer=""),)) from None
            return
        if kind == "binary_data" and ct[:5].lower() == "text/":
            charset = _CHARSET.search(ct)
            if charset is not None and charset[1].lower() not in ("utf-8", "utf8", "us-ascii", "ascii"):
                return  # another encoding, as declared
            try:
                env.binary_data.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise Rejected(
                    RejectCode.INVALID,
                    f"data is not valid UTF-8 at byte {exc.start} (datacontenttype {ct!r})",
                    errors=(ContentError(f"not valid UTF-8 at byte {exc.start}"),),
                ) from None

    def _attribute_errors(self, env: Envelope) -> list[ContentError]:
        errors: list[ContentError] = []
        max_value = self._max_value
        for name, required in (("id", env.id), ("source", env.source), ("type", env.type)):
            # The required attributes are bounded like every other value (a 10,000-character id was accepted).
            if not required:
                errors.append(ContentError("is required", attribute=name))
            elif (size := _utf8_len(required)) > max_value:
                errors.append(ContentError(f"is {size} bytes, over the limit of {max_value}", attribute=name))
            elif _forbidden(required):
                errors.append(ContentError("holds a control character or noncharacter", attribute=name))
        if env.spec_version != "1.0":
            what = f"is {shown(env.spec_version)}, expected '1.0'" if env.spec_version else "is required"
            errors.append(ContentError(what, attribute="specversion"))
        count = 4
        total = _utf8_len(env.id) + _utf8_len(env.source) + _utf8_len(env.type) + 26  # + the names and "1.0"
        for name, value in env.attributes.items():
            if name in _NOT_COUNTED:
                continue  # the gateway's own, from a verified principal
            count += 1
            kind = value.WhichOneof("attr")
            text = ""
            if kind == "ce_string":
                text = value.ce_string
            elif kind == "ce_uri":
                text = value.ce_uri
            elif kind == "ce_uri_ref":
                text = value.ce_uri_ref
            size = _utf8_len(text) if text else (len(value.ce_bytes) if kind == "ce_bytes" else 12)
            total += len(name) + size
            if _NAME.fullmatch(name) is None:
                errors.append(
                    ContentError("is not a valid name: lower-case a-z and 0-9 only, 1-64", attribute=_shown_name(name))
                )
                continue
            if name in _REQUIRED or name in _RESERVED:
                errors.append(ContentError("cannot be an extension attribute: the name is reserved", attribute=name))
                continue
            if kind is None:
                errors.append(ContentError("has no value", attribute=name))
                continue
            if size > max_value:
                errors.append(ContentError(f"is {size} bytes, over the limit of {max_value}", attribute=name))
                continue
            if text and _forbidden(text):
                errors.append(ContentError("holds a control character or noncharacter", attribute=name))
                continue
            problem = _typed_problem(name, kind, text, value.ce_timestamp if kind == "ce_timestamp" else None)
            if problem is not None:
                errors.append(ContentError(problem, attribute=name))
        if count > self._max_count:
            errors.append(ContentError(f"the event has {count} attributes, over the limit of {self._max_count}"))
        if total > self._max_context:
            errors.append(ContentError(f"the attributes take {total} bytes, over the limit of {self._max_context}"))
        return errors


def _typed_problem(name: str, kind: str, text: str, ts: object) -> str | None:
    """The attributes the spec types: ``time`` Timestamp, ``dataschema`` URI, ``datacontenttype`` and
    ``subject`` String; an absolute URI wherever the sender typed the value URI."""
    if kind == "ce_timestamp":
        if name in ("dataschema", "datacontenttype", "subject"):
            return "must be a String (or URI), not a Timestamp"
        seconds, nanos = getattr(ts, "seconds", 0), getattr(ts, "nanos", 0)
        if not (_MIN_SECONDS <= seconds <= _MAX_SECONDS and 0 <= nanos < 1_000_000_000):
            return "is a Timestamp outside 0001-01-01 to 9999-12-31"
        return None
    if name == "time":
        if kind != "ce_string":
            return "must be a Timestamp"
        problem = rfc3339_problem(text)
        return f"{shown(text)} {problem}" if problem else None
    if name == "dataschema":
        if kind not in ("ce_string", "ce_uri"):
            return "must be a URI"
        return None if _ABSOLUTE_URI.fullmatch(text) else f"{shown(text)} is not an absolute URI"
    if name == "datacontenttype":
        if kind != "ce_string":
            return "must be a String"
        return None if _MEDIA_TYPE.fullmatch(text) else f"{shown(text)} is not a media type (type/subtype)"
    if name == "subject" and kind != "ce_string":
        return "must be a String"
    if kind == "ce_uri" and _ABSOLUTE_URI.fullmatch(text) is None:
        return f"{shown(text)} is not an absolute URI"
    return None
