"""``mediator publish`` and ``mediator tail``: the daemon's own gRPC API (Publish, Subscribe) from a shell.

A user who wants to see events flow needs neither grpcurl (not packaged by Debian) nor a script: publish
one event, tail a live stream with a type filter. Both speak to a running daemon's gRPC listener, with the
credentials (bearer token or API key, sent as gRPC metadata) and TLS its listener asks for.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from mediator.config import Config

TOKEN_ENV = "MEDIATOR_TOKEN"
API_KEY_ENV = "MEDIATOR_API_KEY"
SUBSCRIBED_KEY = "mediator-subscribed"  # the initial metadata Subscribe sends once registered (service.proto)


class ClientError(Exception):
    """A problem to print on one line (no traceback) before exiting 1."""


@dataclass(frozen=True, slots=True)
class Target:
    address: str  # host:port
    tls: bool
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    server_name: str | None = None
    token: str | None = None
    api_key: str | None = None
    api_key_header: str = "x-api-key"

    def metadata(self) -> tuple[tuple[str, str], ...]:
        out: list[tuple[str, str]] = []
        if self.token:
            out.append(("authorization", f"Bearer {self.token}"))
        if self.api_key:
            out.append((self.api_key_header, self.api_key))
        return tuple(out)


def target_of(args: Any, config: Config | None) -> Target:
    """Where and how to connect: ``--target`` (else the config's first gRPC listener), TLS when the
    listener serves it or ``--tls``/``--ca-file`` say so, credentials from the flags or the environment."""
    address = args.target
    tls = bool(args.tls or args.ca_file)
    if address is None:
        listener = next(
            (b for b in (config.root.listeners.values() if config else ()) if b.get("kind") == "grpc"), None
        )
        if listener is None:
            raise ClientError("the config has no gRPC listener: name one with --target HOST:PORT")
        host = listener.get("host", "127.0.0.1")
        host = "127.0.0.1" if host in ("0.0.0.0", "") else ("::1" if host == "::" else host)
        address = f"[{host}]:{listener.get('port', 50051)}" if ":" in host else f"{host}:{listener.get('port', 50051)}"
        tls = tls or listener.get("tls") is not None
    return Target(
        address=address,
        tls=tls,
        ca_file=args.ca_file,
        cert_file=args.cert_file,
        key_file=args.key_file,
        server_name=args.server_name,
        token=args.token or os.environ.get(TOKEN_ENV) or None,
        api_key=args.api_key or os.environ.get(API_KEY_ENV) or None,
    )


def _channel(target: Target) -> Any:
    import grpc

    if not target.tls:
        return grpc.aio.insecure_channel(target.address)

    def read(path: str | None) -> bytes | None:
        if path is None:
            return None
        try:
            return Path(path).read_bytes()
        except OSError as exc:
            raise ClientError(f"cannot read {path}: {exc.strerror or exc}") from exc

    if (target.cert_file is None) != (target.key_file is None):
        raise ClientError("--cert-file and --key-file go together")
    credentials = grpc.ssl_channel_credentials(
        root_certificates=read(target.ca_file),  # None: the system's trust store
        private_key=read(target.key_file),
        certificate_chain=read(target.cert_file),
    )
    options = [("grpc.ssl_target_name_override", target.server_name)] if target.server_name else []
    return grpc.aio.secure_channel(target.address, credentials, options=options)


def _rpc_error(exc: Any, target: Target, what: str) -> ClientError:
    code = exc.code()
    details = exc.details() or ""
    if code.name == "UNAVAILABLE":
        return ClientError(f"{what}: no daemon answers on {target.address} ({details})")
    hint = ""
    if code.name == "UNAUTHENTICATED" and not target.metadata():
        hint = f" (give --token or --api-key, or set {TOKEN_ENV} / {API_KEY_ENV})"
    return ClientError(f"{what} refused: {code.name}: {details}{hint}")


def read_data(value: str | None, stdin: IO[bytes]) -> bytes:
    """The event data: the argument itself, ``@PATH`` a file's bytes, ``-`` standard input (as curl reads
    ``-d``); nothing for no data."""
    if value is None:
        return b""
    if value == "-":
        return stdin.read()
    if value.startswith("@"):
        try:
            return Path(value[1:]).read_bytes()
        except OSError as exc:
            raise ClientError(f"cannot read {value[1:]}: {exc.strerror or exc}") from exc
    return value.encode("utf-8")


def guess_content_type(data: bytes) -> str:
    try:
        json.loads(data)
    except ValueError:
        try:
            data.decode("utf-8")
        except UnicodeDecodeError:
            return "application/octet-stream"
        return "text/plain"
    return "application/json"


def build_event(args: Any, data: bytes) -> Any:
    from mediator.core.envelope import now_timestamp, set_attribute
    from mediator.core.errors import Rejected
    from mediator.v1.envelope_pb2 import Envelope

    env = Envelope(id=args.id or str(uuid.uuid4()), source=args.source, spec_version="1.0", type=args.type)
    env.attributes["time"].ce_timestamp.CopyFrom(now_timestamp())  # when it happened: now (--attr time=... wins)
    if data:
        env.binary_data = data
        set_attribute(env, "datacontenttype", args.content_type or guess_content_type(data))
    for item in args.attr or ():
        name, sep, value = item.partition("=")
        if not sep:
            raise ClientError(f"--attr {item!r}: expected NAME=VALUE")
        try:
            set_attribute(env, name, value)
        except Rejected as exc:
            raise ClientError(f"--attr {item!r}: {exc.reason}") from exc
    return env


async def publish(target: Target, event: Any, timeout_s: float) -> dict[str, object]:
    """Publish one event; returns ``{"id": ..., "duplicate": ...}`` once the daemon committed it."""
    import grpc

    from mediator.v1.service_pb2_grpc import MediatorStub

    async with _channel(target) as channel:
        try:
            reply = await MediatorStub(channel).Publish(event, metadata=target.metadata(), timeout=timeout_s)
        except grpc.aio.AioRpcError as exc:
            raise _rpc_error(exc, target, "publish") from exc
    return {"id": reply.id, "duplicate": reply.duplicate}


def format_event(event: Any, as_json: bool) -> str:
    """One line per event: CloudEvents JSON with ``--json``; else time, type, id, source and the data
    (as text when it is text, else its size)."""
    from mediator.core.envelope import attribute, data_bytes
    from mediator.core.formats import is_json, is_text, to_json_dict

    if as_json:
        return json.dumps(to_json_dict(event), ensure_ascii=False)
    data = data_bytes(event)
    ct = attribute(event, "datacontenttype")
    shown = f"<{len(data)} bytes>"
    if not data:
        shown = ""
    elif ct is None or is_json(ct) or is_text(ct):
        with contextlib.suppress(UnicodeDecodeError):
            shown = data.decode("utf-8")
    when = attribute(event, "time") or "-"
    return "  ".join((when, event.type, event.id, event.source, shown)).rstrip()


async def tail(
    target: Target,
    request: Any,
    *,
    count: int | None,
    timeout_s: float | None,
    as_json: bool,
    out: IO[str],
    err: IO[str],
) -> int:
    """Print the events Subscribe streams until interrupted (or ``count`` events, or ``timeout_s``
    seconds). Says on ``err`` when the subscription is registered: events routed from then on show."""
    import grpc

    from mediator.v1.service_pb2_grpc import MediatorStub

    seen = 0
    async with _channel(target) as channel:
        call = MediatorStub(channel).Subscribe(request, metadata=target.metadata())
        try:
            async with asyncio.timeout(timeout_s):
                await call.initial_metadata()
                filters = {k: v for k, v in (("type", request.type), ("source", request.source)) if v}
                shown = " ".join(f"{k}={v}" for k, v in filters.items()) or "every event"
                print(f"tail: subscribed on {target.address} ({shown}); Ctrl-C stops", file=err, flush=True)
                async for event in call:
                    print(format_event(event, as_json), file=out, flush=True)
                    seen += 1
                    if count is not None and seen >= count:
                        break
        except TimeoutError:
            pass
        except grpc.aio.AioRpcError as exc:
            raise _rpc_error(exc, target, "tail") from exc
        finally:
            call.cancel()
    return 0


def run(coro: Any) -> int:
    """Run a client coroutine: a ``ClientError`` is one line on stderr and exit status 1."""
    try:
        result = asyncio.run(coro)
    except ClientError as exc:
        print(f"mediator: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    if isinstance(result, int):
        return result
    return 0


def describe_rows(letters: Sequence[dict[str, object]]) -> list[list[str]]:
    """Dead letters as table rows (header first): ISO times, the attempts made, the reason's class, the
    reason last."""
    from datetime import UTC, datetime

    rows = [["ID", "AT (UTC)", "EVENT ID", "TYPE", "ROUTE", "OUTBOUND", "ATTEMPTS", "CLASS", "REASON"]]
    for dl in letters:
        at = dl.get("at")
        if isinstance(at, int | float):
            at = datetime.fromtimestamp(at, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        rows.append(
            [
                str(dl.get("id", "")),
                str(at or ""),
                str(dl.get("event_id", "")),
                str(dl.get("type", "")),
                str(dl.get("route") or "-"),
                str(dl.get("outbound") or "-"),
                str(dl.get("attempts", 0)),
                str(dl.get("class") or "-"),
                str(dl.get("reason", "")),
            ]
        )
    return rows


def table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    lines = ["  ".join([*(c.ljust(w) for c, w in zip(r, widths, strict=False)), r[-1]]) for r in rows]
    return "\n".join(line.rstrip() for line in lines)
