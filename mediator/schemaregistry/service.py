"""The registry's operations, as Confluent's Schema Registry REST API names them, over a ``SchemaStore``.

``Registry.handle(method, path, query, body, may_write)`` answers one API request with (status, JSON
value); the HTTP mount (``mediator.schemaregistry.http``) only reads requests and writes answers.
Errors are the registry's bodies, ``{"error_code": N, "message": "..."}``, with Confluent's codes:
40401 subject not found, 40402 version not found, 40403 schema not found, 40404 subject soft-deleted,
40405 subject not soft-deleted before a permanent delete, 40406 / 40407 the same for a version, 40408 no
subject-level compatibility, 409 incompatible schema, 42201 invalid schema, 42202 invalid version,
42203 invalid compatibility level, 50001 store error.

``resolve(subject, version)`` is what the schema stage and format conversion call per event: a pinned
version is cached until it is deleted; "latest" is cached for ``latest_ttl_s`` and dropped at once when
this daemon registers or deletes a version of that subject, so a route validating against "latest"
uses a version registered a moment before.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, unquote

import structlog

from mediator.schemaregistry.compat import Level, check
from mediator.schemaregistry.schemas import SCHEMA_TYPES, InvalidSchema, ParsedSchema, Reference, parse
from mediator.schemaregistry.store import Incompatible, SchemaStore, Stored, StoreError, Version

log = structlog.get_logger(__name__)

MAX_VERSION = 2**31 - 1
_PARSED_CACHE = 1024


class RegistryError(Exception):
    def __init__(self, status: int, code: int, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message

    def body(self) -> dict[str, object]:
        return {"error_code": self.code, "message": self.message}


class NotFound(RegistryError, LookupError):
    """No such subject or version (what ``resolve`` raises for a route's subject)."""


def _subject_not_found(subject: str) -> NotFound:
    return NotFound(404, 40401, f"Subject '{subject}' not found.")


def _version_not_found(version: object) -> NotFound:
    return NotFound(404, 40402, f"Version {version} not found.")


@dataclass(frozen=True, slots=True)
class Resolved:
    """A subject's version as a route uses it: its schema (parsed) and the URL that names it."""

    subject: str
    version: int
    id: int
    parsed: ParsedSchema
    url: str


class Registry:
    def __init__(self, store: SchemaStore, default_level: Level, base_url: str, latest_ttl_s: float = 5.0) -> None:
        self.store = store
        self.default_level = default_level
        self.base_url = base_url.rstrip("/")
        self.latest_ttl_s = latest_ttl_s
        self._parsed: dict[int, ParsedSchema] = {}
        self._resolved: dict[tuple[str, int | str], tuple[float, Resolved]] = {}
        self._inflight: dict[tuple[str, int | str], asyncio.Future[Resolved]] = {}
        self._refreshing: set[asyncio.Task[None]] = set()
        self._watched: set[tuple[str, int | str]] = set()  # what conversions name (warm)

    # ------------------------------------------------------------------------------ for routes

    def url_of(self, subject: str, version: int) -> str:
        return f"{self.base_url}/subjects/{quote(subject, safe='')}/versions/{version}"

    async def resolve(self, subject: str, version: int | str) -> Resolved:
        """The version a route names (an int, or "latest"); raises ``RegistryError`` (40401, 40402) or
        ``StoreError``. Concurrent misses for one key share one look-up."""
        key = (subject, version)
        hit = self._resolved.get(key)
        if hit is not None and hit[0] > time.monotonic():
            return hit[1]
        pending = self._inflight.get(key)
        if pending is not None:
            return await asyncio.shield(pending)
        future: asyncio.Future[Resolved] = asyncio.get_running_loop().create_future()
        self._inflight[key] = future
        try:
            found = await self._lookup(subject, version)
            ttl = self.latest_ttl_s if version == "latest" else float("inf")
            self._resolved[key] = (time.monotonic() + ttl, found)
            future.set_result(found)
            return found
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # retrieved: a waiter-less failure is not "never retrieved"
            raise
        finally:
            del self._inflight[key]

    def current(self, subject: str, version: int | str) -> tuple[int, str] | None:
        """(id, Avro schema JSON) of the version, from the cache, for format conversion (``AvroSource``):
        no I/O. A stale or missing entry is looked up in the background (the next call sees it)."""
        key = (subject, version)
        hit = self._resolved.get(key)
        if hit is None or hit[0] <= time.monotonic():
            self._refresh(key)
        if hit is None or hit[1].parsed.type != "AVRO":
            return None
        return hit[1].id, hit[1].parsed.canonical

    async def warm(self, keys: list[tuple[str, int | str]]) -> None:
        """Look ``keys`` up now (at start-up: conversions find them in the cache); a missing one is logged."""
        self._watched = set(keys)
        for subject, version in keys:
            try:
                await self.resolve(subject, version)
            except (RegistryError, StoreError) as exc:
                log.warning("registry.subject_unresolved", subject=subject, version=version, error=str(exc))

    def _refresh(self, key: tuple[str, int | str]) -> None:
        if key in self._inflight:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return

        async def run() -> None:
            try:
                await self.resolve(*key)
            except NotFound:
                self._resolved.pop(key, None)  # deleted: conversions stop using it
            except (RegistryError, StoreError) as exc:
                log.warning("registry.refresh_failed", subject=key[0], error=str(exc))

        task = loop.create_task(run(), name=f"registry:refresh:{key[0]}")
        self._refreshing.add(task)
        task.add_done_callback(self._refreshing.discard)

    async def _lookup(self, subject: str, version: int | str) -> Resolved:
        versions = [v for v in await self.store.versions(subject) if not v.deleted]
        if not versions:
            raise _subject_not_found(subject)
        found = versions[-1] if version == "latest" else next((v for v in versions if v.version == version), None)
        if found is None:
            raise _version_not_found(version)
        parsed = await self._parse_stored(found.schema)
        return Resolved(subject, found.version, found.schema.id, parsed, self.url_of(subject, found.version))

    async def _changed(self, subject: str) -> None:
        """A version of ``subject`` was registered or deleted here: what routes use of it is looked up again
        before the caller is answered, so the next event sees it (a validation, a conversion)."""
        keys = {k for k in self._resolved if k[0] == subject} | {k for k in self._watched if k[0] == subject}
        for key in keys:
            if key in self._resolved:
                self._resolved[key] = (0.0, self._resolved[key][1])
        for key in keys:
            try:
                await self.resolve(*key)
            except NotFound:
                self._resolved.pop(key, None)
            except (RegistryError, StoreError) as exc:
                log.warning("registry.refresh_failed", subject=subject, error=str(exc))

    # ------------------------------------------------------------------------------ parsing

    async def _parse_stored(self, stored: Stored) -> ParsedSchema:
        hit = self._parsed.get(stored.id)
        if hit is not None:
            return hit
        resolved = await self._references(stored.references)
        parsed = parse(stored.type, stored.schema, stored.references, resolved)
        if len(self._parsed) >= _PARSED_CACHE:
            self._parsed.clear()
        self._parsed[stored.id] = parsed
        return parsed

    async def _references(self, refs: tuple[Reference, ...]) -> dict[str, ParsedSchema]:
        out: dict[str, ParsedSchema] = {}
        for ref in refs:
            versions = [v for v in await self.store.versions(ref.subject) if not v.deleted]
            found = next((v for v in versions if v.version == ref.version), None)
            if found is None:
                raise RegistryError(
                    422,
                    42201,
                    f"Invalid schema: reference {ref.name!r} names {ref.subject} version {ref.version}, "
                    "which does not exist",
                )
            out[ref.name] = await self._parse_stored(found.schema)
        return out

    async def _parse_request(self, body: Any) -> ParsedSchema:
        if not isinstance(body, dict) or not isinstance(body.get("schema"), str):
            raise RegistryError(422, 42201, "Invalid schema: the body needs 'schema', a string")
        kind = body.get("schemaType") or "AVRO"
        if kind not in SCHEMA_TYPES:
            raise RegistryError(422, 42201, f"Invalid schema: unknown schemaType {kind!r} (AVRO, JSON, PROTOBUF)")
        raw_refs = body.get("references") or []
        try:
            refs = tuple(Reference(str(r["name"]), str(r["subject"]), int(r["version"])) for r in raw_refs)
        except (TypeError, KeyError, ValueError):
            raise RegistryError(422, 42201, "Invalid schema: references are {name, subject, version}") from None
        resolved = await self._references(refs)
        try:
            return parse(kind, body["schema"], refs, resolved)
        except InvalidSchema as exc:
            raise RegistryError(422, 42201, str(exc)) from None

    # ------------------------------------------------------------------------------ config

    async def level(self, subject: str | None) -> Level:
        if subject is not None:
            own = await self.store.get_config(subject)
            if own is not None:
                return Level(own)
        glob = await self.store.get_config("")
        return Level(glob) if glob is not None else self.default_level

    # ------------------------------------------------------------------------------ the API

    async def handle(
        self, method: str, path: str, query: Mapping[str, str], body: bytes, may_write: bool
    ) -> tuple[int, Any]:
        """Answer one request: (HTTP status, JSON value). ``may_write``: the caller may change the registry
        (register, delete, configure); reads are decided by the caller of this method."""
        parts = [unquote(p) for p in path.strip("/").split("/")] if path.strip("/") else []
        try:
            doc: Any = None
            if method in ("POST", "PUT") and body:
                try:
                    doc = json.loads(body)
                except ValueError:
                    raise RegistryError(422, 422, "Unrecognized JSON: the body is not JSON") from None
            route = self._route(method, parts)
            if route is None:
                known = self._route("GET", parts) or self._route("POST", parts) or self._route("PUT", parts)
                if known is not None or self._route("DELETE", parts) is not None:
                    return 405, {"error_code": 405, "message": f"HTTP {method} is not allowed on {path}"}
                return 404, {"error_code": 404, "message": "HTTP 404 Not Found"}
            handler, args, writes = route
            if writes and not may_write:
                return 403, {"error_code": 40301, "message": "this caller may not change the registry"}
            return 200, await handler(query, doc, *args)
        except RegistryError as exc:
            return exc.status, exc.body()
        except StoreError as exc:
            log.error("registry.store_failed", error=str(exc))
            return 500, {"error_code": 50001, "message": f"Error in the backend data store: {exc}"}

    def _route(self, method: str, p: list[str]) -> tuple[Callable[..., Any], tuple[str, ...], bool] | None:
        table: dict[tuple[str, str], tuple[Callable[..., Any], bool]] = {
            ("GET", ""): (self._root, False),
            ("GET", "subjects"): (self._subjects, False),
            ("POST", "subjects/*"): (self._lookup_schema, False),
            ("DELETE", "subjects/*"): (self._delete_subject, True),
            ("GET", "subjects/*/versions"): (self._versions, False),
            ("POST", "subjects/*/versions"): (self._register, True),
            ("GET", "subjects/*/versions/*"): (self._version, False),
            ("DELETE", "subjects/*/versions/*"): (self._delete_version, True),
            ("GET", "subjects/*/versions/*/schema"): (self._version_schema, False),
            ("GET", "schemas/types"): (self._types, False),
            ("GET", "schemas/ids/*"): (self._by_id, False),
            ("GET", "schemas/ids/*/schema"): (self._by_id_raw, False),
            ("GET", "schemas/ids/*/versions"): (self._id_versions, False),
            ("GET", "schemas/ids/*/subjects"): (self._id_subjects, False),
            ("POST", "compatibility/subjects/*/versions/*"): (self._compatibility, False),
            ("POST", "compatibility/subjects/*/versions"): (self._compatibility_all, False),
            ("GET", "config"): (self._get_config, False),
            ("PUT", "config"): (self._put_config, True),
            ("GET", "config/*"): (self._get_config, False),
            ("PUT", "config/*"): (self._put_config, True),
            ("DELETE", "config/*"): (self._delete_config, True),
            ("GET", "mode"): (self._mode, False),
            ("GET", "mode/*"): (self._mode, False),
        }
        pattern, args = _pattern(p)
        found = table.get((method, pattern))
        return None if found is None else (found[0], args, found[1])

    async def _root(self, query: Mapping[str, str], doc: Any) -> Any:
        return {}

    async def _types(self, query: Mapping[str, str], doc: Any) -> Any:
        return list(SCHEMA_TYPES)

    async def _mode(self, query: Mapping[str, str], doc: Any, *subject: str) -> Any:
        return {"mode": "READWRITE"}

    async def _subjects(self, query: Mapping[str, str], doc: Any) -> Any:
        names = await self.store.subjects(_flag(query, "deleted"))
        prefix = query.get("subjectPrefix", "")
        return [s for s in names if s.startswith(prefix)]

    async def _all(self, subject: str, deleted: bool) -> list[Version]:
        versions = await self.store.versions(subject)
        live = versions if deleted else [v for v in versions if not v.deleted]
        if not live:
            raise _subject_not_found(subject)
        return live

    async def _versions(self, query: Mapping[str, str], doc: Any, subject: str) -> Any:
        return [v.version for v in await self._all(subject, _flag(query, "deleted"))]

    async def _find(self, subject: str, version: str, deleted: bool) -> Version:
        number = _version_number(version)
        versions = await self._all(subject, True)
        visible = versions if deleted else [v for v in versions if not v.deleted]
        if not visible and not deleted:
            raise _subject_not_found(subject)
        if number == -1:
            if not visible:
                raise _version_not_found(version)
            return visible[-1]
        found = next((v for v in visible if v.version == number), None)
        if found is None:
            raise _version_not_found(number)
        return found

    def _describe(self, v: Version) -> dict[str, object]:
        out: dict[str, object] = {"subject": v.subject, "version": v.version, "id": v.schema.id}
        out.update(_schema_fields(v.schema))
        if v.deleted:
            out["deleted"] = True
        return out

    async def _version(self, query: Mapping[str, str], doc: Any, subject: str, version: str) -> Any:
        return self._describe(await self._find(subject, version, _flag(query, "deleted")))

    async def _version_schema(self, query: Mapping[str, str], doc: Any, subject: str, version: str) -> Any:
        found = await self._find(subject, version, _flag(query, "deleted"))
        return Raw(found.schema.schema)

    async def _stored(self, raw_id: str) -> Stored:
        try:
            schema_id = int(raw_id)
        except ValueError:
            raise RegistryError(404, 40403, f"Schema {raw_id} not found") from None
        stored = await self.store.schema(schema_id)
        if stored is None:
            raise RegistryError(404, 40403, f"Schema {schema_id} not found")
        return stored

    async def _by_id(self, query: Mapping[str, str], doc: Any, raw_id: str) -> Any:
        return _schema_fields(await self._stored(raw_id))

    async def _by_id_raw(self, query: Mapping[str, str], doc: Any, raw_id: str) -> Any:
        return Raw((await self._stored(raw_id)).schema)

    async def _id_versions(self, query: Mapping[str, str], doc: Any, raw_id: str) -> Any:
        stored = await self._stored(raw_id)
        deleted = _flag(query, "deleted")
        uses = await self.store.usages(stored.id)
        return [{"subject": s, "version": v} for s, v, d in uses if deleted or not d]

    async def _id_subjects(self, query: Mapping[str, str], doc: Any, raw_id: str) -> Any:
        return sorted({v["subject"] for v in await self._id_versions(query, doc, raw_id)})

    async def _register(self, query: Mapping[str, str], doc: Any, subject: str) -> Any:
        parsed = await self._parse_request(doc)
        level = await self.level(subject)
        previous: dict[int, ParsedSchema] = {}
        for v in await self.store.versions(subject):  # parsed here, on the loop's side, with their references
            if not v.deleted:
                previous[v.schema.id] = await self._parse_stored(v.schema)

        def compatible(live: list[Version]) -> list[str]:
            # run inside the store's transaction: versions another daemon added meanwhile are parsed here
            olds = [
                previous.get(v.schema.id) or parse(v.schema.type, v.schema.schema, v.schema.references) for v in live
            ]
            return check(level, parsed, olds)

        try:
            version, new = await self.store.register(subject, parsed, compatible)
        except Incompatible as exc:
            raise RegistryError(
                409,
                409,
                f'Schema being registered is incompatible with an earlier schema for subject "{subject}", details: '
                + json.dumps(exc.messages),
            ) from None
        except InvalidSchema as exc:
            raise RegistryError(422, 42201, str(exc)) from None
        if new:
            await self._changed(subject)
            log.info("registry.registered", subject=subject, version=version.version, id=version.schema.id)
        return {"id": version.schema.id}

    async def _lookup_schema(self, query: Mapping[str, str], doc: Any, subject: str) -> Any:
        parsed = await self._parse_request(doc)
        versions = await self._all(subject, _flag(query, "deleted"))
        fingerprint = parsed.fingerprint
        for v in reversed(versions):
            same = ParsedSchema(v.schema.type, v.schema.schema, v.schema.references, None)
            if same.fingerprint == fingerprint:
                return self._describe(v)
        raise RegistryError(404, 40403, "Schema not found")

    async def _compatibility(self, query: Mapping[str, str], doc: Any, subject: str, version: str) -> Any:
        parsed = await self._parse_request(doc)
        number = _version_number(version)
        versions = [v for v in await self.store.versions(subject) if not v.deleted]
        if not versions:
            raise _subject_not_found(subject)
        found = versions[-1] if number == -1 else next((v for v in versions if v.version == number), None)
        if found is None:
            raise _version_not_found(number)
        level = await self.level(subject)
        old = await self._parse_stored(found.schema)
        plain = Level(level.value.removesuffix("_TRANSITIVE"))
        return self._verdict(check(plain, parsed, [old]), query)

    async def _compatibility_all(self, query: Mapping[str, str], doc: Any, subject: str) -> Any:
        parsed = await self._parse_request(doc)
        versions = [v for v in await self.store.versions(subject) if not v.deleted]
        level = await self.level(subject)
        olds = [await self._parse_stored(v.schema) for v in versions]
        return self._verdict(check(level, parsed, olds), query)

    @staticmethod
    def _verdict(problems: list[str], query: Mapping[str, str]) -> dict[str, object]:
        out: dict[str, object] = {"is_compatible": not problems}
        if _flag(query, "verbose"):
            out["messages"] = problems
        return out

    async def _get_config(self, query: Mapping[str, str], doc: Any, *subject: str) -> Any:
        if not subject:
            return {"compatibilityLevel": (await self.level(None)).value}
        own = await self.store.get_config(subject[0])
        if own is None:
            if not _flag(query, "defaultToGlobal"):
                raise RegistryError(
                    404, 40408, f"Subject '{subject[0]}' does not have subject-level compatibility configured"
                )
            return {"compatibilityLevel": (await self.level(None)).value}
        return {"compatibilityLevel": own}

    async def _put_config(self, query: Mapping[str, str], doc: Any, *subject: str) -> Any:
        raw = doc.get("compatibility") if isinstance(doc, dict) else None
        try:
            level = Level(str(raw).upper())
        except ValueError:
            raise RegistryError(
                422, 42203, f"Invalid compatibility level. Valid values are: {', '.join(m.value for m in Level)}"
            ) from None
        await self.store.set_config(subject[0] if subject else "", level.value)
        log.info("registry.configured", subject=subject[0] if subject else None, compatibility=level.value)
        return {"compatibility": level.value}

    async def _delete_config(self, query: Mapping[str, str], doc: Any, subject: str) -> Any:
        own = await self.store.get_config(subject)
        if own is None:
            raise RegistryError(404, 40401, f"Subject '{subject}' not found.")
        await self.store.set_config(subject, None)
        return {"compatibilityLevel": own}

    async def _delete_subject(self, query: Mapping[str, str], doc: Any, subject: str) -> Any:
        versions = await self.store.versions(subject)
        if not versions:
            raise _subject_not_found(subject)
        live = [v.version for v in versions if not v.deleted]
        if _flag(query, "permanent"):
            if live:
                raise RegistryError(
                    404, 40405, f"Subject '{subject}' was not deleted first before being permanently deleted"
                )
            await self.store.purge(subject, [v.version for v in versions])
            await self._changed(subject)
            log.info("registry.deleted", subject=subject, permanent=True)
            return [v.version for v in versions]
        if not live:
            raise RegistryError(
                404, 40404, f"Subject '{subject}' was soft deleted.Set permanent=true to delete permanently"
            )
        await self.store.mark_deleted(subject, live)
        await self._changed(subject)
        log.info("registry.deleted", subject=subject, permanent=False)
        return live

    async def _delete_version(self, query: Mapping[str, str], doc: Any, subject: str, version: str) -> Any:
        number = _version_number(version)
        versions = await self.store.versions(subject)
        if not versions:
            raise _subject_not_found(subject)
        if number == -1:
            live = [v for v in versions if not v.deleted]
            if not live:
                raise _version_not_found(version)
            number = live[-1].version
        found = next((v for v in versions if v.version == number), None)
        if found is None:
            raise _version_not_found(number)
        if _flag(query, "permanent"):
            if not found.deleted:
                raise RegistryError(
                    404,
                    40407,
                    f"Subject '{subject}' Version {number} was not deleted first before being permanently deleted",
                )
            await self.store.purge(subject, [number])
        else:
            if found.deleted:
                raise RegistryError(
                    404,
                    40406,
                    f"Subject '{subject}' Version {number} was soft deleted.Set permanent=true to delete permanently",
                )
            await self.store.mark_deleted(subject, [number])
        await self._changed(subject)
        log.info("registry.deleted", subject=subject, version=number, permanent=_flag(query, "permanent"))
        return number


@dataclass(frozen=True, slots=True)
class Raw:
    """An answer that is the schema text itself (``.../schema``), not a JSON value."""

    text: str


def _pattern(p: list[str]) -> tuple[str, tuple[str, ...]]:
    """``["subjects", "orders", "versions", "3"]`` -> ("subjects/*/versions/*", ("orders", "3"))."""
    fixed = {
        "subjects": (1,),
        "schemas": (2,),
        "compatibility": (2, 4),
        "config": (1,),
        "mode": (1,),
    }
    if not p:
        return "", ()
    variable = set(fixed.get(p[0], ()))
    if p[0] == "subjects":
        variable.add(3)
    out, args = [], []
    for i, part in enumerate(p):
        if i in variable:
            out.append("*")
            args.append(part)
        else:
            out.append(part)
    return "/".join(out), tuple(args)


def _flag(query: Mapping[str, str], name: str) -> bool:
    return query.get(name, "false").lower() == "true"


def _version_number(raw: str) -> int:
    """1 .. 2^31-1, or -1 for "latest" (and -1 itself, as Confluent takes it); else 42202."""
    if raw == "latest":
        return -1
    try:
        number = int(raw)
    except ValueError:
        number = 0
    if number == -1 or 1 <= number <= MAX_VERSION:
        return number
    raise RegistryError(
        422,
        42202,
        f"The specified version '{raw}' is not a valid version id. Allowed values are between [1, 2^31-1] and "
        'the string "latest"',
    )


def _schema_fields(stored: Stored) -> dict[str, object]:
    out: dict[str, object] = {}
    if stored.type != "AVRO":  # Confluent leaves schemaType out for Avro
        out["schemaType"] = stored.type
    if stored.references:
        out["references"] = [r.to_json() for r in stored.references]
    out["schema"] = stored.schema
    return out
