"""A route's ``when``: a CEL expression over an event, compiled once at config load, evaluated per event.

Variables: every context attribute by name (``id``, ``source``, ``type``, ``specversion``, ``subject``,
``time``, extensions such as ``authid``), ``data`` (the event data parsed as JSON), ``inbound`` and
``topic``. Attributes are their canonical strings (``time`` too: ``timestamp(time)`` compares it), except
Integer and Boolean extensions, which are CEL ints and bools. A variable the event does not have is
undefined, and an expression that reads it fails; so does one that reads a field ``data`` lacks, or
compares values of the wrong types. A failure counts as "no match" (the caller logs and counts it).

Cost (timeit, this machine): the CEL program itself runs in about 1.5 us; what costs is converting the
Python values it reads into CEL values (about 2.5 us per string, more for nested data). So an expression is
given only the variables it names, and when it reads ``data`` only through fields (``data.total``, never
``data`` whole, ``data[...]`` or a method on ``data``), only those top-level fields of the data.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import cel

FUNCTIONS = frozenset(
    {
        "size",
        "contains",
        "startsWith",
        "endsWith",
        "matches",
        "int",
        "uint",
        "double",
        "string",
        "bytes",
        "timestamp",
        "duration",
        "type",
        "dyn",
        "getFullYear",
        "getMonth",
        "getDate",
        "getDayOfMonth",
        "getDayOfWeek",
        "getDayOfYear",
        "getHours",
        "getMinutes",
        "getSeconds",
        "getMilliseconds",
    }
)
"""The functions the CEL library (common-expression-language) defines; macros (``has``, ``all``,
``exists``, ``exists_one``, ``map``, ``filter``) expand before this check and operators start with ``_``,
``!`` or ``@``. tests/core/test_predicate.py checks this list against the library."""

# CEL tokens, enough to tell where the identifier ``data`` occurs outside string literals and comments.
_TOKENS = re.compile(
    r"""
    (?P<skip>\s+|//[^\n]*)
  | (?P<string>
        [rR][bB]?('''.*?'''|\"\"\".*?\"\"\"|'[^'\n]*'|"[^"\n]*")
      | [bB]?[rR]('''.*?'''|\"\"\".*?\"\"\"|'[^'\n]*'|"[^"\n]*")
      | [bB]?('''(?:\\.|[^\\])*?'''|\"\"\"(?:\\.|[^\\])*?\"\"\"|'(?:\\.|[^'\\\n])*'|"(?:\\.|[^"\\\n])*")
    )
  | (?P<ident>[A-Za-z_][A-Za-z0-9_]*)
  | (?P<number>\d[\w.]*)
  | (?P<other>.)
    """,
    re.VERBOSE | re.DOTALL,
)


_SYNTAX = re.compile(r"<input>:(\d+:\d+): (.*)")


class PredicateError(Exception):
    """The expression could not be evaluated for this event (a missing field, mismatched types)."""


def data_fields(source: str) -> tuple[str, ...] | None:
    """The top-level data fields ``source`` reads when it reads ``data`` only as ``data.NAME`` (a field,
    not a method call), else None (it needs the whole data). Only called on an expression that compiled."""
    tokens = [(m.lastgroup, m.group()) for m in _TOKENS.finditer(source) if m.lastgroup != "skip"]
    fields: list[str] = []
    for i, (kind, text) in enumerate(tokens):
        if kind != "ident" or text != "data":
            continue
        if i and tokens[i - 1][1] == ".":
            return None  # ``x.data`` or CEL's root-scoped ``.data``: not worth telling apart
        nxt = tokens[i + 1 : i + 4]
        if len(nxt) < 2 or nxt[0][1] != "." or nxt[1][0] != "ident":
            return None
        if len(nxt) > 2 and nxt[2][1] == "(":
            return None  # a method of data itself, e.g. data.exists(k, ...)
        if nxt[1][1] not in fields:
            fields.append(nxt[1][1])
    return tuple(fields)


@dataclass(frozen=True, slots=True)
class Predicate:
    """A compiled ``when``. ``variables``: the names it reads; ``fields``: the top-level data fields it
    reads (None: the whole data)."""

    source: str
    program: Any  # cel.Program (the library ships no usable type for it)
    variables: tuple[str, ...]
    fields: tuple[str, ...] | None

    @classmethod
    def compile(cls, source: str) -> Predicate:
        """Compile ``source``; raises ValueError naming a syntax error, an unknown function, or (where a
        probe with string attributes shows one) a type error."""
        try:
            program = cel.compile(source)
        except Exception as exc:  # the library raises ValueError; be safe against others
            text = str(exc)
            found = _SYNTAX.search(text)
            raise ValueError(f"{found[1]}: {found[2]}" if found else _first_line(text)) from None
        unknown = sorted(f for f in program.functions() if f not in FUNCTIONS and not f.startswith(("_", "!", "@")))
        if unknown:
            raise ValueError(
                f"unknown function(s) {', '.join(unknown)}; CEL here has {', '.join(sorted(FUNCTIONS))} "
                "and the macros has, all, exists, exists_one, map, filter"
            )
        names = tuple(program.variables())
        pred = cls(source, program, names, data_fields(source) if "data" in names else None)
        pred._probe()
        return pred

    def _probe(self) -> None:
        """Evaluate once against placeholder values to catch what CEL would reject for every event: a
        result that is not a boolean, or an operator applied to types it has no overload for (with the
        string attributes typed as they always are). Anything else (a missing field) depends on the event."""
        probe: dict[str, Any] = {n: "" for n in self.variables if n in _STRING_ATTRIBUTES}
        if "time" in probe:
            probe["time"] = "1970-01-01T00:00:00Z"
        try:
            result = self.program.execute(probe)
        except Exception as exc:
            if "No such overload" in str(exc):
                raise ValueError(f"type error: {_first_line(str(exc)).split('. ', 1)[0]}") from None
            return
        if not isinstance(result, bool):
            raise ValueError(f"must be a boolean expression, not one of type {type(result).__name__}")

    def evaluate(self, variables: Mapping[str, Any]) -> bool:
        """True when the expression holds for these variables; raises PredicateError when it cannot be
        evaluated or does not give a boolean."""
        try:
            result = self.program.execute(variables)
        except KeyError as exc:
            raise PredicateError(f"no such field: {exc}") from None
        except Exception as exc:  # ValueError, TypeError, RuntimeError from the library
            raise PredicateError(_first_line(str(exc)) or type(exc).__name__) from None
        if result is True:
            return True
        if result is False:
            return False
        raise PredicateError(f"gave {type(result).__name__}, not a boolean")


_STRING_ATTRIBUTES = frozenset(
    {"id", "source", "type", "specversion", "subject", "time", "datacontenttype", "dataschema", "inbound", "topic"}
)


def _first_line(text: str) -> str:
    return text.strip().split("\n", 1)[0]
