"""RFC 7240 ``Prefer: wait=N``, as HTTP headers and gRPC metadata carry it (``mediator/status.py`` waits)."""

from __future__ import annotations

import re

# ``wait``: delta-seconds (a decimal fraction is taken too), among other preferences ("respond-async, wait=5").
_WAIT = re.compile(r"(?:^|[,;\s])wait\s*=\s*\"?(\d+(?:\.\d+)?)\"?", re.IGNORECASE)


def prefer_wait(value: str | None) -> float | None:
    """The ``wait`` preference of a ``Prefer`` value, in seconds; None without one."""
    if not value:
        return None
    match = _WAIT.search(value)
    return float(match.group(1)) if match else None


def applied(seconds: float) -> str:
    """The ``Preference-Applied`` value for a wait of ``seconds``."""
    return f"wait={int(seconds)}" if seconds == int(seconds) else f"wait={seconds:g}"
