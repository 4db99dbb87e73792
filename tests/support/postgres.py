"""A PostgreSQL database a test owns, on the shared server (127.0.0.1:5432, trust auth): created empty under a
unique name, dropped afterwards. The shared server itself is never reconfigured."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import asyncpg

from tests.support.net import reachable, unique

PG_HOST = "127.0.0.1"
PG_PORT = 5432
PG_USER = os.environ.get("MEDIATOR_TEST_PG_USER", "postgres")
ADMIN_DSN = f"postgresql://{PG_USER}@{PG_HOST}:{PG_PORT}/postgres"


def pg_reachable() -> bool:
    return reachable(PG_HOST, PG_PORT)


@asynccontextmanager
async def fresh_database(prefix: str = "mediator_test") -> AsyncIterator[str]:
    """Yields the DSN of a new, empty database; drops it (closing what is still connected) on exit."""
    name = unique(prefix).replace("-", "_").replace(".", "_").lower()
    admin = await asyncpg.connect(ADMIN_DSN)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    try:
        yield f"postgresql://{PG_USER}@{PG_HOST}:{PG_PORT}/{name}"
    finally:
        admin = await asyncpg.connect(ADMIN_DSN)
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await admin.close()
