"""Where the registry keeps schemas: SQLite (a file beside the outbox, on a thread of its own) or
PostgreSQL (asyncpg; several daemons share it).

Three tables: ``registry_schemas`` (one row per distinct schema: id, type, canonical text, references,
and the fingerprint that makes the same schema the same id under any subject), ``registry_versions``
(subject, version, schema id, soft-deleted flag) and ``registry_config`` (compatibility per subject;
the subject "" is the global level).

``register`` is the one write that must be atomic across daemons: it reads the subject's versions, runs
the caller's compatibility check on them, and inserts, in one transaction. SQLite takes the database's
write lock first (``BEGIN IMMEDIATE``); PostgreSQL takes a transaction-scoped advisory lock, so two
daemons registering at once are serialised and ids and version numbers never collide (the unique
constraints would refuse a collision anyway).
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

from mediator.schemaregistry.schemas import ParsedSchema, Reference, SchemaType

T = TypeVar("T")

_LOCK_KEY = 0x6D656469  # "medi": the advisory lock of registrations (PostgreSQL)

_DDL = (
    """CREATE TABLE IF NOT EXISTS registry_schemas (
        id {id} PRIMARY KEY,
        fingerprint TEXT NOT NULL UNIQUE,
        schema_type TEXT NOT NULL,
        schema TEXT NOT NULL,
        refs TEXT NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS registry_versions (
        subject TEXT NOT NULL,
        version INTEGER NOT NULL,
        schema_id BIGINT NOT NULL REFERENCES registry_schemas (id),
        deleted BOOLEAN NOT NULL DEFAULT FALSE,
        PRIMARY KEY (subject, version))""",
    "CREATE INDEX IF NOT EXISTS registry_versions_schema ON registry_versions (schema_id)",
    "CREATE TABLE IF NOT EXISTS registry_config (subject TEXT PRIMARY KEY, compatibility TEXT NOT NULL)",
)


class StoreError(Exception):
    """The backend failed (the registry's 50001)."""


class Incompatible(Exception):
    def __init__(self, messages: list[str]) -> None:
        super().__init__("; ".join(messages))
        self.messages = messages


@dataclass(frozen=True, slots=True)
class Stored:
    id: int
    type: SchemaType
    schema: str
    references: tuple[Reference, ...]


@dataclass(frozen=True, slots=True)
class Version:
    subject: str
    version: int
    deleted: bool
    schema: Stored


Check = Callable[[list[Version]], list[str]]
"""Given a subject's live versions (oldest first), why the new schema may not follow them ([]: it may)."""


class SchemaStore(Protocol):
    async def open(self) -> None: ...

    async def close(self) -> None: ...

    async def register(self, subject: str, parsed: ParsedSchema, check: Check) -> tuple[Version, bool]:
        """The live version of ``subject`` holding ``parsed`` (False: it was there already), else a new one
        (True) once ``check`` passed. Raises ``Incompatible`` with ``check``'s messages."""
        ...

    async def subjects(self, deleted: bool) -> list[str]: ...

    async def versions(self, subject: str) -> list[Version]:
        """Every version of ``subject``, soft-deleted ones too, oldest first."""
        ...

    async def schema(self, schema_id: int) -> Stored | None:
        """The schema with that id while some version (soft-deleted or not) holds it."""
        ...

    async def usages(self, schema_id: int) -> list[tuple[str, int, bool]]:
        """(subject, version, deleted) of every version holding the schema."""
        ...

    async def mark_deleted(self, subject: str, versions: Sequence[int]) -> None: ...

    async def purge(self, subject: str, versions: Sequence[int]) -> None: ...

    async def get_config(self, subject: str) -> str | None: ...

    async def set_config(self, subject: str, level: str | None) -> None: ...


def _refs(text: str) -> tuple[Reference, ...]:
    return tuple(Reference(r["name"], r["subject"], int(r["version"])) for r in json.loads(text))


def _refs_json(parsed: ParsedSchema) -> str:
    return json.dumps([r.to_json() for r in parsed.references], separators=(",", ":"))


def _version(row: Sequence[Any]) -> Version:
    subject, version, deleted, sid, kind, schema, refs = row
    return Version(subject, int(version), bool(deleted), Stored(int(sid), kind, schema, _refs(refs)))


_VERSIONS = (
    "SELECT v.subject, v.version, v.deleted, s.id, s.schema_type, s.schema, s.refs FROM registry_versions v "
    "JOIN registry_schemas s ON s.id = v.schema_id WHERE v.subject = {p1} ORDER BY v.version"
)


class SqliteSchemaStore:
    """One connection on one thread of its own: every call is handed to it, the loop never waits on disk."""

    def __init__(self, path: str) -> None:
        self._path = path
        self._pool: ThreadPoolExecutor | None = None
        self._conn: sqlite3.Connection | None = None

    async def _call(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        if self._pool is None or self._conn is None:
            raise StoreError("the schema store is not open")
        conn = self._conn
        try:
            return await asyncio.get_running_loop().run_in_executor(self._pool, fn, conn)
        except sqlite3.Error as exc:
            raise StoreError(f"sqlite: {exc}") from exc

    async def open(self) -> None:
        if self._path != ":memory:":
            Path(self._path).parent.mkdir(parents=True, exist_ok=True)
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="schema-store")

        def connect() -> sqlite3.Connection:
            conn = sqlite3.connect(self._path, isolation_level=None, check_same_thread=False, timeout=5.0)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA foreign_keys=ON")
            for ddl in _DDL:
                conn.execute(ddl.format(id="INTEGER"))
            return conn

        try:
            self._conn = await asyncio.get_running_loop().run_in_executor(self._pool, connect)
        except sqlite3.Error as exc:
            raise StoreError(f"sqlite: cannot open {self._path}: {exc}") from exc

    async def close(self) -> None:
        pool, conn = self._pool, self._conn
        self._pool = self._conn = None
        if pool is not None:
            if conn is not None:
                await asyncio.get_running_loop().run_in_executor(pool, conn.close)
            pool.shutdown(wait=False)

    async def register(self, subject: str, parsed: ParsedSchema, check: Check) -> tuple[Version, bool]:
        fingerprint = parsed.fingerprint

        def run(conn: sqlite3.Connection) -> tuple[Version, bool]:
            conn.execute("BEGIN IMMEDIATE")
            try:
                rows = [_version(r) for r in conn.execute(_VERSIONS.format(p1="?"), (subject,))]
                found = _same(rows, fingerprint, conn)
                if found is not None:
                    conn.execute("ROLLBACK")
                    return found, False
                problems = check([v for v in rows if not v.deleted])
                if problems:
                    raise Incompatible(problems)
                conn.execute(
                    "INSERT INTO registry_schemas (fingerprint, schema_type, schema, refs) VALUES (?, ?, ?, ?) "
                    "ON CONFLICT (fingerprint) DO NOTHING",
                    (fingerprint, parsed.type, parsed.canonical, _refs_json(parsed)),
                )
                (sid,) = conn.execute(
                    "SELECT id FROM registry_schemas WHERE fingerprint = ?", (fingerprint,)
                ).fetchone()
                number = max((v.version for v in rows), default=0) + 1
                conn.execute(
                    "INSERT INTO registry_versions (subject, version, schema_id) VALUES (?, ?, ?)",
                    (subject, number, sid),
                )
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
            stored = Stored(int(sid), parsed.type, parsed.canonical, parsed.references)
            return Version(subject, number, False, stored), True

        return await self._call(run)

    async def subjects(self, deleted: bool) -> list[str]:
        where = "" if deleted else " WHERE NOT deleted"
        sql = f"SELECT DISTINCT subject FROM registry_versions{where} ORDER BY subject"
        return await self._call(lambda c: [r[0] for r in c.execute(sql)])

    async def versions(self, subject: str) -> list[Version]:
        sql = _VERSIONS.format(p1="?")
        return await self._call(lambda c: [_version(r) for r in c.execute(sql, (subject,))])

    async def schema(self, schema_id: int) -> Stored | None:
        def run(c: sqlite3.Connection) -> Stored | None:
            row = c.execute(
                "SELECT s.id, s.schema_type, s.schema, s.refs FROM registry_schemas s WHERE s.id = ? AND EXISTS "
                "(SELECT 1 FROM registry_versions v WHERE v.schema_id = s.id)",
                (schema_id,),
            ).fetchone()
            return Stored(int(row[0]), row[1], row[2], _refs(row[3])) if row else None

        return await self._call(run)

    async def usages(self, schema_id: int) -> list[tuple[str, int, bool]]:
        sql = "SELECT subject, version, deleted FROM registry_versions WHERE schema_id = ? ORDER BY subject, version"
        return await self._call(lambda c: [(r[0], int(r[1]), bool(r[2])) for r in c.execute(sql, (schema_id,))])

    async def mark_deleted(self, subject: str, versions: Sequence[int]) -> None:
        rows = [(subject, v) for v in versions]
        await self._call(
            lambda c: c.executemany("UPDATE registry_versions SET deleted = 1 WHERE subject = ? AND version = ?", rows)
        )

    async def purge(self, subject: str, versions: Sequence[int]) -> None:
        rows = [(subject, v) for v in versions]
        await self._call(
            lambda c: c.executemany("DELETE FROM registry_versions WHERE subject = ? AND version = ?", rows)
        )

    async def get_config(self, subject: str) -> str | None:
        def run(c: sqlite3.Connection) -> str | None:
            row = c.execute("SELECT compatibility FROM registry_config WHERE subject = ?", (subject,)).fetchone()
            return str(row[0]) if row else None

        return await self._call(run)

    async def set_config(self, subject: str, level: str | None) -> None:
        def run(c: sqlite3.Connection) -> None:
            if level is None:
                c.execute("DELETE FROM registry_config WHERE subject = ?", (subject,))
            else:
                c.execute(
                    "INSERT INTO registry_config (subject, compatibility) VALUES (?, ?) "
                    "ON CONFLICT (subject) DO UPDATE SET compatibility = excluded.compatibility",
                    (subject, level),
                )

        await self._call(run)


def _same(rows: list[Version], fingerprint: str, conn: sqlite3.Connection) -> Version | None:
    live = [v for v in rows if not v.deleted]
    if not live:
        return None
    ids = {v.schema.id for v in live}
    marks = ",".join("?" * len(ids))
    row = conn.execute(
        f"SELECT id FROM registry_schemas WHERE fingerprint = ? AND id IN ({marks})", (fingerprint, *ids)
    ).fetchone()
    if row is None:
        return None
    return next(v for v in live if v.schema.id == row[0])


class PostgresSchemaStore:
    """asyncpg pool; registrations serialised by an advisory lock held for their transaction."""

    def __init__(self, dsn: str) -> None:
        self._dsn = dsn
        self._pool: Any = None

    async def open(self) -> None:
        import asyncpg

        try:
            self._pool = await asyncpg.create_pool(self._dsn, min_size=1, max_size=4, timeout=10)
            async with self._pool.acquire() as conn, conn.transaction():
                await conn.execute("SELECT pg_advisory_xact_lock($1)", _LOCK_KEY)  # two daemons creating at once
                for ddl in _DDL:
                    await conn.execute(ddl.format(id="BIGINT GENERATED BY DEFAULT AS IDENTITY"))
        except (TimeoutError, OSError, asyncpg.PostgresError) as exc:
            raise StoreError(f"postgresql: {type(exc).__name__}: {exc}") from exc

    async def close(self) -> None:
        if self._pool is not None:
            pool, self._pool = self._pool, None
            await pool.close()

    async def _fetch(self, sql: str, *args: Any) -> list[Any]:
        import asyncpg

        if self._pool is None:
            raise StoreError("the schema store is not open")
        try:
            return list(await self._pool.fetch(sql, *args))
        except (OSError, asyncpg.PostgresError) as exc:
            raise StoreError(f"postgresql: {exc}") from exc

    async def register(self, subject: str, parsed: ParsedSchema, check: Check) -> tuple[Version, bool]:
        import asyncpg

        if self._pool is None:
            raise StoreError("the schema store is not open")
        fingerprint = parsed.fingerprint
        try:
            async with self._pool.acquire() as conn, conn.transaction():
                await conn.execute("SELECT pg_advisory_xact_lock($1)", _LOCK_KEY)
                rows = [_version(tuple(r)) for r in await conn.fetch(_VERSIONS.format(p1="$1"), subject)]
                live = [v for v in rows if not v.deleted]
                sid = await conn.fetchval("SELECT id FROM registry_schemas WHERE fingerprint = $1", fingerprint)
                found = next((v for v in live if v.schema.id == sid), None) if sid is not None else None
                if found is not None:
                    return found, False
                problems = check(live)
                if problems:
                    raise Incompatible(problems)
                if sid is None:
                    sid = await conn.fetchval(
                        "INSERT INTO registry_schemas (fingerprint, schema_type, schema, refs) "
                        "VALUES ($1, $2, $3, $4) RETURNING id",
                        *(fingerprint, parsed.type, parsed.canonical, _refs_json(parsed)),
                    )
                number = max((v.version for v in rows), default=0) + 1
                await conn.execute(
                    "INSERT INTO registry_versions (subject, version, schema_id) VALUES ($1, $2, $3)",
                    subject,
                    number,
                    sid,
                )
        except (OSError, asyncpg.PostgresError) as exc:
            raise StoreError(f"postgresql: {exc}") from exc
        stored = Stored(int(sid), parsed.type, parsed.canonical, parsed.references)
        return Version(subject, number, False, stored), True

    async def subjects(self, deleted: bool) -> list[str]:
        where = "" if deleted else " WHERE NOT deleted"
        rows = await self._fetch(f"SELECT DISTINCT subject FROM registry_versions{where} ORDER BY subject")
        return [r[0] for r in rows]

    async def versions(self, subject: str) -> list[Version]:
        return [_version(tuple(r)) for r in await self._fetch(_VERSIONS.format(p1="$1"), subject)]

    async def schema(self, schema_id: int) -> Stored | None:
        rows = await self._fetch(
            "SELECT s.id, s.schema_type, s.schema, s.refs FROM registry_schemas s WHERE s.id = $1 AND EXISTS "
            "(SELECT 1 FROM registry_versions v WHERE v.schema_id = s.id)",
            schema_id,
        )
        return Stored(int(rows[0][0]), rows[0][1], rows[0][2], _refs(rows[0][3])) if rows else None

    async def usages(self, schema_id: int) -> list[tuple[str, int, bool]]:
        rows = await self._fetch(
            "SELECT subject, version, deleted FROM registry_versions WHERE schema_id = $1 ORDER BY subject, version",
            schema_id,
        )
        return [(r[0], int(r[1]), bool(r[2])) for r in rows]

    async def mark_deleted(self, subject: str, versions: Sequence[int]) -> None:
        await self._fetch(
            "UPDATE registry_versions SET deleted = TRUE WHERE subject = $1 AND version = ANY($2::int[])",
            subject,
            list(versions),
        )

    async def purge(self, subject: str, versions: Sequence[int]) -> None:
        await self._fetch(
            "DELETE FROM registry_versions WHERE subject = $1 AND version = ANY($2::int[])", subject, list(versions)
        )

    async def get_config(self, subject: str) -> str | None:
        rows = await self._fetch("SELECT compatibility FROM registry_config WHERE subject = $1", subject)
        return str(rows[0][0]) if rows else None

    async def set_config(self, subject: str, level: str | None) -> None:
        if level is None:
            await self._fetch("DELETE FROM registry_config WHERE subject = $1", subject)
        else:
            await self._fetch(
                "INSERT INTO registry_config (subject, compatibility) VALUES ($1, $2) "
                "ON CONFLICT (subject) DO UPDATE SET compatibility = excluded.compatibility",
                subject,
                level,
            )
