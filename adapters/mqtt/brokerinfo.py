"""What the broker says about itself on ``$SYS``, for the logs and ``/readyz``.

Mosquitto publishes its version and how many messages it dropped (``$SYS/broker/version``,
``$SYS/broker/publish/messages/dropped``) as retained messages, refreshed every ``sys_interval`` (10 s by
default), so a subscriber gets both at once and the count again whenever it changes. The count is the
broker's, for all its clients, and it is the only sign of the loss Mosquitto causes silently: a QoS 1
message it acknowledged and then dropped for a subscriber that is behind by ``max_queued_messages``
(1000 as Debian installs it; see adapters/mqtt/connection.py ``_BufferedSocket``). Its config cannot be
read at all. A broker that does not publish these (or refuses the subscription) only leaves the detail
without them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

VERSION_TOPIC = "$SYS/broker/version"
DROPPED_TOPIC = "$SYS/broker/publish/messages/dropped"
TOPICS = (VERSION_TOPIC, DROPPED_TOPIC)

MOSQUITTO_NOTE = (
    "Mosquitto drops, silently, QoS 1 messages it has acknowledged when a subscriber is max_queued_messages "
    "behind (1000 as Debian installs it): its max_queued_messages decides what a burst can lose before the "
    "daemon sees it; set max_queued_messages 0 (or your bursts' size) in mosquitto.conf (README quickstart)"
)


def wanted(topics: list[str]) -> bool:
    """Whether an inbound with these filters may subscribe to ``TOPICS`` for itself: not when the admin
    subscribed to ``$SYS`` (those messages are theirs, to become events)."""
    for topic in topics:
        levels = topic.split("/")
        if levels[0] == "$share":
            levels = levels[2:]
        if levels[0] == "$SYS":
            return False
    return True


class BrokerInfo:
    """The ``$SYS`` values of one connection.

    ``take`` is given every message the connection receives and keeps the ones on ``TOPICS`` (returns
    True: they are not events). ``on_change`` is called (on the loop) once a value changed, after the
    log lines: ``broker.identified`` for the first version of this inbound's life (with what Mosquitto's
    limits mean), ``broker.dropped`` (a warning) each time the dropped count grows while connected.
    """

    __slots__ = ("_identified", "_log", "_on_change", "dropped", "dropped_at_connect", "version")

    def __init__(self, log: Any, on_change: Callable[[], None]) -> None:
        self._log = log
        self._on_change = on_change
        self._identified = False
        self.version: str | None = None
        self.dropped: int | None = None
        self.dropped_at_connect: int | None = None

    def connected(self) -> None:
        """A new connection: the count it first reports is the baseline for the warning."""
        self.dropped_at_connect = None
        self.dropped = None

    def take(self, topic: str, payload: object) -> bool:
        if topic not in TOPICS:
            return False
        text = payload.decode("utf-8", "replace") if isinstance(payload, bytes | bytearray) else str(payload)
        if topic == VERSION_TOPIC:
            self.version = text.strip()
            if not self._identified:
                self._identified = True
                mosquitto = self.version.lower().startswith("mosquitto")
                self._log.info("broker.identified", version=self.version, note=MOSQUITTO_NOTE if mosquitto else None)
        else:
            try:
                count = int(text.strip())
            except ValueError:
                return True
            if self.dropped_at_connect is None:
                self.dropped_at_connect = count
            elif self.dropped is not None and count > self.dropped:
                grown = count - self.dropped_at_connect
                self._log.warning("broker.dropped", dropped=count, since_connected=grown, new=count - self.dropped)
            self.dropped = count
        self._on_change()
        return True

    @property
    def dropped_since_connect(self) -> int:
        if self.dropped is None or self.dropped_at_connect is None:
            return 0
        return self.dropped - self.dropped_at_connect

    def detail(self) -> str:
        """What ``/readyz`` adds to the connection's detail: the version, the dropped count, and a warning
        line once it grew while we were connected."""
        parts = []
        if self.version is not None:
            parts.append(f"broker {self.version}")
        if self.dropped is not None:
            parts.append(f"broker dropped {self.dropped} messages (all clients, since it started)")
        grown = self.dropped_since_connect
        if grown:
            parts.append(
                f"WARNING: the broker dropped {grown} messages (for any of its clients) since we connected: its "
                "queue limit for a subscriber that is behind (Mosquitto: max_queued_messages) is too small"
            )
        return "; ".join(parts)
