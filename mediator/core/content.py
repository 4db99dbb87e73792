"""The event data as content stages, routes and transforms see it: parsed once per event, strictly.

``parsed(env)`` is what a CEL ``when``, a schema or a transform reads: the data decoded as JSON when the
event's ``datacontenttype`` says JSON (or says nothing and the data is there), else ``NOT_JSON``. Parsing
is strict (UTF-8 only, no NaN or Infinity, no duplicate-free guarantee beyond the last key winning, as
orjson does) and bounded in nesting. ``DataCache`` keeps one parse per event across the stages and the
router of one ``Sink.accept``.
"""

from __future__ import annotations

from typing import Any, Final

import orjson

from mediator.core.envelope import Envelope, data_bytes
from mediator.core.errors import RejectCode, Rejected
from mediator.core.formats import is_json

NOT_JSON: Final = object()
"""The data is not JSON (its content type says something else, or there is no data)."""

MAX_DEPTH = 64


class InvalidJson(ValueError):
    """Data that says it is JSON and is not; ``reason`` names what and where."""


def _depth_ok(value: Any, limit: int) -> bool:
    # orjson itself refuses more than 1024 levels; documents nest shallowly, so this walk is short.
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if depth > limit:
            return False
        if isinstance(item, dict):
            stack.extend((v, depth + 1) for v in item.values() if isinstance(v, dict | list))
        elif isinstance(item, list):
            stack.extend((v, depth + 1) for v in item if isinstance(v, dict | list))
    return True


def parse_json(data: bytes, max_depth: int = MAX_DEPTH) -> Any:
    """Strict JSON (RFC 8259, UTF-8): raises ``InvalidJson`` naming the problem and its position."""
    try:
        value = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise InvalidJson(f"data is not valid JSON: {exc}") from None
    # Fewer brackets than the limit cannot nest deeper than it: bytes.count is C, the walk is Python and
    # was most of the cost of a 1 KiB document (see the README's "Content validation").
    deep = isinstance(value, dict | list) and data.count(b"[") + data.count(b"{") > max_depth
    if deep and not _depth_ok(value, max_depth):
        raise InvalidJson(f"data nests deeper than {max_depth} levels")
    return value


def content_type(env: Envelope) -> str | None:
    value = env.attributes.get("datacontenttype")
    return value.ce_string if value is not None else None


def parsed(env: Envelope, max_depth: int = MAX_DEPTH) -> Any:
    """The data as JSON, ``NOT_JSON`` when it is not JSON; raises ``Rejected(INVALID)`` for data that
    says JSON and is not."""
    if env.WhichOneof("data") == "proto_data" or not is_json(content_type(env)):
        return NOT_JSON
    data = data_bytes(env)
    if not data:
        return NOT_JSON
    try:
        return parse_json(data, max_depth)
    except InvalidJson as exc:
        raise Rejected(RejectCode.INVALID, str(exc)) from None


class DataCache:
    """One parse per event for the stages and the router of one call; keyed by the envelope object."""

    __slots__ = ("_max_depth", "_values")

    def __init__(self, max_depth: int = MAX_DEPTH) -> None:
        self._values: dict[int, tuple[Envelope, Any]] = {}
        self._max_depth = max_depth

    def get(self, env: Envelope) -> Any:
        hit = self._values.get(id(env))
        if hit is not None and hit[0] is env:
            return hit[1]
        value = parsed(env, self._max_depth)
        self._values[id(env)] = (env, value)  # the envelope is held, so its id is not reused meanwhile
        return value

    def forget(self, env: Envelope) -> None:
        """After a stage changed ``env``'s data."""
        self._values.pop(id(env), None)
