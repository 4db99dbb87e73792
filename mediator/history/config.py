"""``[store]``: the event store's backend, retention and bounds (mediator/history/)."""

from __future__ import annotations

import re
from fnmatch import fnmatchcase
from typing import Literal

from pydantic import Field, field_validator, model_validator

from mediator.core.seams import ConfigModel

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d|w)?\s*$")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 604800.0}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(B|KB|MB|GB|TB|KiB|MiB|GiB|TiB)?\s*$")
_SIZE_UNITS = {
    **{"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12},
    **{"KiB": 2**10, "MiB": 2**20, "GiB": 2**30, "TiB": 2**40},
}


def parse_duration(text: str) -> float:
    """Seconds of ``"7d"``, ``"12h"``, ``"10m"``, ``"30s"``, ``"250ms"``, ``"2w"``, or a bare number of
    seconds; raises ValueError naming what it takes."""
    found = _DURATION.match(text)
    if found is None:
        raise ValueError(f"{text!r} is not a duration: a number with a unit ms, s, m, h, d or w, e.g. '7d' or '10m'")
    return float(found[1]) * _DURATION_UNITS[found[2] or "s"]


def parse_size(value: int | str) -> int:
    """Bytes of ``1073741824``, ``"1GiB"``, ``"500MB"``."""
    if isinstance(value, int):
        return value
    found = _SIZE.match(value)
    if found is None:
        raise ValueError(f"{value!r} is not a size: a number of bytes or one with B, KB, MB, GB, KiB, MiB, GiB")
    return int(float(found[1]) * _SIZE_UNITS[found[2] or "B"])


class StoreOverrideConfig(ConfigModel):
    type: str = Field(min_length=1, description="an event type, or a glob over it ('com.example.audit.*')")
    retention: str = Field(description="how long events of this type are kept; '0': not stored at all")

    @field_validator("retention")
    @classmethod
    def _retention(cls, value: str) -> str:
        parse_duration(value)
        return value


class StoreConfig(ConfigModel):
    """Every accepted event kept for ``retention`` (docs/history.md)."""

    backend: Literal["sqlite", "postgresql"] = Field(
        default="sqlite",
        description="sqlite: a table in the outbox's database, written in the outbox's own transaction; "
        "postgresql: one history shared by several daemons (dsn_env names the DSN's variable)",
    )
    dsn_env: str | None = Field(
        default=None, description="backend = 'postgresql': the environment variable holding the DSN"
    )
    retention: str = Field(
        default="0",
        description="how long an event is kept ('7d', '12h', '30m'); '0' turns the store off",
    )
    max_events: int | None = Field(default=None, ge=1, description="events kept at most (the oldest expire first)")
    max_bytes: int | str | None = Field(
        default=None, description="envelope bytes kept at most, e.g. '2GiB' (the oldest expire first)"
    )
    overrides: list[StoreOverrideConfig] = Field(
        default=[], description="per-type retention, first match wins: [[store.overrides]] type = ..., retention = ..."
    )
    # Measured over 1,000,000 stored events (bench.store_query, a loaded 2-core machine): 2,000 rows took
    # 100-360 ms with the fsync, which a commit of intake may wait for; 500 keep that a quarter.
    expiry_batch: int = Field(default=500, ge=1, le=100_000, description="events one expiry statement deletes at most")
    expiry_interval_s: float = Field(
        default=1.0, gt=0, description="how often expiry runs (again at once while a batch came back full)"
    )
    query_max_examined: int = Field(
        default=5000, ge=1, description="rows a page of GET /admin/events with a `where` examines at most"
    )
    pg_batch: int = Field(default=500, ge=1, le=10_000, description="postgresql: events one insert carries at most")

    @field_validator("retention")
    @classmethod
    def _retention(cls, value: str) -> str:
        parse_duration(value)
        return value

    @field_validator("max_bytes")
    @classmethod
    def _max_bytes(cls, value: int | str | None) -> int | str | None:
        if value is not None and parse_size(value) < 1:
            raise ValueError("must be at least 1 byte")
        return value

    @model_validator(mode="after")
    def _dsn(self) -> StoreConfig:
        if self.backend == "postgresql" and not self.dsn_env:
            raise ValueError("backend = 'postgresql' needs dsn_env: the environment variable that holds the DSN")
        return self

    @property
    def enabled(self) -> bool:
        return self.retention_s > 0 or any(parse_duration(o.retention) > 0 for o in self.overrides)

    @property
    def retention_s(self) -> float:
        return parse_duration(self.retention)

    @property
    def max_bytes_value(self) -> int | None:
        return None if self.max_bytes is None else parse_size(self.max_bytes)

    def retention_for(self, event_type: str) -> float:
        """Seconds an event of ``event_type`` is kept (0: not stored)."""
        for o in self.overrides:
            if fnmatchcase(event_type, o.type):
                return parse_duration(o.retention)
        return self.retention_s
