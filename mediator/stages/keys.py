"""Key templates: an address template (``mediator.core.patterns.Template``) that may also name fields of
the event's JSON data, for lookup keys and correlation keys: ``customer:{data.customerId}``,
``{source}/{data.order.id}``, ``{data.lines.0.sku}``.

``{data.a.b}`` walks objects by member name and arrays by a 0-based index; a string renders as itself,
a number or boolean as its JSON text. Anything else (no such field, an object, null, data that is not
JSON) cannot make a key: ``TemplateError``. The other placeholders are the address template's.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import orjson

from mediator.core.content import NOT_JSON
from mediator.core.envelope import Envelope
from mediator.core.patterns import Template, TemplateError

_TOKEN = re.compile(r"\{\{|\}\}|\{([^{}]*)\}|[{}]")
_SEGMENT = re.compile(r"^[A-Za-z0-9_\-$@:]+$")


def _field(data: Any, path: tuple[str, ...]) -> str:
    value = data
    for seg in path:
        if isinstance(value, dict):
            if seg not in value:
                raise TemplateError(f"event data has no field {'.'.join(path)!r}")
            value = value[seg]
        elif isinstance(value, list) and seg.isascii() and seg.isdigit() and int(seg) < len(value):
            value = value[int(seg)]
        else:
            raise TemplateError(f"event data has no field {'.'.join(path)!r}")
    if isinstance(value, str):
        return value
    if isinstance(value, bool | int | float):
        return orjson.dumps(value).decode()
    raise TemplateError(f"event data field {'.'.join(path)!r} is {type(value).__name__}, not a string or number")


@dataclass(frozen=True, slots=True)
class KeyTemplate:
    """``text`` compiled: literals, address-template placeholders and data paths, in order."""

    text: str
    parts: tuple[str | Template | tuple[str, ...], ...]
    uses_data: bool

    @classmethod
    def compile(cls, text: str) -> KeyTemplate:
        parts: list[str | Template | tuple[str, ...]] = []
        pos = 0
        uses_data = False
        literal: list[str] = []
        for m in _TOKEN.finditer(text):
            literal.append(text[pos : m.start()])
            pos = m.end()
            token, ref = m.group(0), m.group(1)
            if token in ("{{", "}}"):
                literal.append(token[0])
                continue
            if ref is None:
                raise ValueError(f"unbalanced braces in template {text!r}")
            if literal:
                parts.append("".join(literal))
                literal = []
            if ref == "data" or ref.startswith("data."):
                path = tuple(ref.split(".")[1:])
                if not path or not all(_SEGMENT.match(s) for s in path):
                    raise ValueError(f"bad data path {{{ref}}} in template {text!r}: use {{data.field.sub}}")
                parts.append(path)
                uses_data = True
            else:
                parts.append(Template.compile("{" + ref + "}"))  # validates the placeholder
        literal.append(text[pos:])
        if "".join(literal):
            parts.append("".join(literal))
        return cls(text, tuple(parts), uses_data)

    def render(self, env: Envelope, data: Any = NOT_JSON) -> str:
        """The key for ``env`` whose parsed data is ``data`` (``Batch.data.get(env)``); raises
        ``TemplateError`` when a placeholder cannot be filled."""
        out: list[str] = []
        for part in self.parts:
            if isinstance(part, str):
                out.append(part)
            elif isinstance(part, Template):
                out.append(part.render(env))
            else:
                if data is NOT_JSON:
                    raise TemplateError("event data is not JSON")
                out.append(_field(data, part))
        return "".join(out)
