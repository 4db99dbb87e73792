"""Events per second over the last minutes, from the daemon's own counters: what the dashboard's overview
chart draws (``GET /admin/rates``).

Every ``INTERVAL_S`` the sampler reads the accepted count of each inbound and the sent count of each
outbound (``Metrics.totals``, a few dozen counters) and keeps the difference as a rate, ``POINTS`` of them
(five minutes). That is one read of in-memory counters every two seconds, whether or not anyone looks.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable, Mapping

INTERVAL_S = 2.0
POINTS = 150

Totals = Callable[[], Mapping[str, Mapping[tuple[str, ...], float]]]


class Rates:
    def __init__(self, totals: Totals, interval_s: float = INTERVAL_S, points: int = POINTS) -> None:
        self._totals = totals
        self.interval_s = interval_s
        self._times: deque[float] = deque(maxlen=points)
        self._series: dict[str, deque[float]] = {}
        self._last: dict[str, float] = {}
        self._last_at: float | None = None

    def _read(self) -> dict[str, float]:
        totals = self._totals()
        out: dict[str, float] = {}
        for metric, prefix in (("events_accepted", "inbound:"), ("deliveries_sent", "outbound:")):
            for labels, value in totals.get(metric, {}).items():
                key = prefix + labels[0]
                out[key] = out.get(key, 0.0) + value
        return out

    def sample(self, now: float | None = None) -> None:
        """One point: the rate of every counter since the previous sample (the first sample only sets the base)."""
        now = time.time() if now is None else now
        values = self._read()
        if self._last_at is not None and now > self._last_at:
            span = now - self._last_at
            self._times.append(now)
            for key in set(values) | set(self._series):
                series = self._series.get(key)
                if series is None:
                    series = self._series[key] = deque([0.0] * (len(self._times) - 1), maxlen=self._times.maxlen)
                series.append(max(0.0, values.get(key, 0.0) - self._last.get(key, 0.0)) / span)
        self._last, self._last_at = values, now

    def snapshot(self) -> dict[str, object]:
        """``{"interval_s", "times" (Unix seconds), "series": {"inbound:NAME" | "outbound:NAME": [events/s]}}``."""
        return {
            "interval_s": self.interval_s,
            "times": [round(t, 3) for t in self._times],
            "series": {k: [round(v, 2) for v in s] for k, s in sorted(self._series.items())},
        }

    async def run(self) -> None:
        """Sample every ``interval_s`` until cancelled."""
        while True:
            self.sample()
            await asyncio.sleep(self.interval_s)
