"""systemd's notification protocol (``Type=notify``): READY=1, STOPPING=1, STATUS=..., WATCHDOG=1.

The protocol is one datagram of ``KEY=VALUE`` lines sent to the AF_UNIX socket named by ``$NOTIFY_SOCKET``
(``sd_notify(3)``); a name starting with ``@`` is in the abstract namespace (a leading NUL byte). That is a
few lines with the socket module, so no dependency (python-systemd needs libsystemd and a C build, sdnotify
is unmaintained) and nothing to install on machines without systemd, where ``$NOTIFY_SOCKET`` is not set and
every call is a no-op. The socket is non-blocking and a send that would block or fails is dropped: a
notification must never stall the event loop, and systemd does not acknowledge them anyway.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping

import structlog

log = structlog.get_logger(__name__)


class Notifier:
    """Sends notifications to the service manager, if there is one (``$NOTIFY_SOCKET``)."""

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        address = env.get("NOTIFY_SOCKET", "")
        self._address = "\0" + address[1:] if address.startswith("@") else address
        self._socket: socket.socket | None = None
        self._failed = False
        self.watchdog_s = _watchdog_interval(env)

    @property
    def enabled(self) -> bool:
        return bool(self._address)

    def notify(self, *states: str) -> None:
        """Send ``states`` (``"READY=1"``, ``"STATUS=..."``) as one datagram; never raises, never blocks."""
        if not self._address:
            return
        try:
            if self._socket is None:
                self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                self._socket.setblocking(False)
            self._socket.sendto("\n".join(states).encode("utf-8"), self._address)
        except OSError as exc:
            if not self._failed:  # once: a missing socket would otherwise log every watchdog ping
                self._failed = True
                log.warning("systemd.notify_failed", socket=os.environ.get("NOTIFY_SOCKET"), error=str(exc))

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None


def _watchdog_interval(env: Mapping[str, str]) -> float | None:
    """Half of ``$WATCHDOG_USEC`` in seconds (sd_watchdog_enabled(3) advises pinging at half the timeout),
    or None when the watchdog is off or meant for another process (``$WATCHDOG_PID``)."""
    usec = env.get("WATCHDOG_USEC", "")
    pid = env.get("WATCHDOG_PID", "")
    if not usec.isdigit() or int(usec) == 0 or (pid and pid != str(os.getpid())):
        return None
    return int(usec) / 2e6
