"""The benchmark's message body: 1 KiB of JSON carrying a sequence number and the send time.

``{"s":"<16 digits>","t":"<19 digits>","p":"xxx…"}``: ``s`` is the sequence number (run id * RUN_SPAN +
position), ``t`` the sender's ``time.monotonic_ns()`` (CLOCK_MONOTONIC is one clock for every process of
the machine) or all zeros when the sender cannot take one per message (wrk). The fields are strings of fixed
width so that the body has the same size for every message and JSON round trips (Node-RED parses and
re-serialises it) keep it byte for byte.
"""

from __future__ import annotations

SIZE = 1024
RUN_SPAN = 10**10
"""Sequence numbers of run ``r`` are ``r * RUN_SPAN + i``; run 0 is the warm-up."""

_HEAD = b'{"s":"'
_MID = b'","t":"'
_TAIL = b'","p":"'
_PAD_LEN = SIZE - len(_HEAD) - 16 - len(_MID) - 19 - len(_TAIL) - 2
_PAD = b"x" * _PAD_LEN
_S_KEY = b'"s":"'
_T_KEY = b'"t":"'


def make(seq: int, ts_ns: int) -> bytes:
    return b"".join((_HEAD, b"%016d" % seq, _MID, b"%019d" % ts_ns, _TAIL, _PAD, b'"}'))


def parse(body: bytes) -> tuple[int, int]:
    """(seq, send time in ns or 0); raises ValueError for a body that is not ours."""
    if body[:6] == _HEAD:  # the usual case: our own layout, untouched
        return int(body[6:22]), int(body[29:48])
    i = body.find(_S_KEY)
    j = body.find(_T_KEY)
    if i < 0 or j < 0:
        raise ValueError("not a benchmark payload")
    return int(body[i + 5 : i + 21]), int(body[j + 5 : j + 24])


def lua_format() -> str:
    """The same layout as a Lua ``string.format`` pattern for wrk (seq as %016.0f, t = 0)."""
    return '{"s":"%016.0f","t":"0000000000000000000","p":"' + "x" * _PAD_LEN + '"}'


assert len(make(1, 2)) == SIZE
