"""How a target reads structure out of one fuzzer input, and how seeds are written in the same form.

The fuzzer mutates bytes; the targets read them as a small text-like format a mutation keeps meaningful:
an HTTP-style header block (``Name: value`` lines, a blank line, then the body) and length-prefixed
fields. The same functions encode the seeds, so a seed is read exactly as written, with or without
atheris (atheris' ``FuzzedDataProvider`` has no inverse to write seeds with, and the regression tests
in ``make test`` run without atheris).
"""

from __future__ import annotations

import re
from collections.abc import Iterable

# RFC 9110 token: what aiohttp's parser lets through as a header name (others are a 400 before our code).
_TOKEN = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
# What aiohttp refuses in a header value before our code sees it.
_VALUE_FORBIDDEN = re.compile(rb"[\x00\r\n]")


def split_head(data: bytes) -> tuple[list[tuple[str, str]], bytes]:
    """``Name: value`` lines up to the first blank line, as an HTTP server hands them over: names that are
    tokens, values trimmed of spaces and tabs and decoded from UTF-8 with surrogate escapes (aiohttp's
    reading of header bytes); then the body. Lines that no HTTP server would deliver are dropped."""
    head, sep, body = data.partition(b"\r\n\r\n")
    if not sep:
        head, sep, body = data.partition(b"\n\n")
        if not sep:
            return [], data
    headers: list[tuple[str, str]] = []
    for line in re.split(rb"\r?\n", head):
        name, colon, value = line.partition(b":")
        if not colon or _TOKEN.fullmatch(name) is None or _VALUE_FORBIDDEN.search(value):
            continue
        headers.append(
            (name.decode("ascii"), value.strip(b" \t").decode("utf-8", "surrogateescape")),
        )
    return headers, body


def join_head(headers: Iterable[tuple[str, str]], body: bytes) -> bytes:
    """The input ``split_head`` reads back as ``headers`` and ``body``."""
    head = b"".join(f"{name}: {value}\r\n".encode() for name, value in headers)
    return (head or b"\r\n") + b"\r\n" + body


def split_fields(data: bytes, count: int) -> list[bytes]:
    """``count`` fields: each but the last prefixed by its length in two big-endian bytes (cut short at
    the end of the input), the last one the rest."""
    fields: list[bytes] = []
    pos = 0
    for _ in range(count - 1):
        size = int.from_bytes(data[pos : pos + 2], "big")
        pos += 2
        fields.append(data[pos : pos + size])
        pos += size
    fields.append(data[pos:])
    return fields


def join_fields(*fields: bytes) -> bytes:
    """The input ``split_fields`` reads back as ``fields``."""
    out = b"".join(len(f).to_bytes(2, "big") + f for f in fields[:-1])
    return out + fields[-1]
