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
    credential: str = ""  # where the token or key came from, for errors

    def __repr__(self) -> str:  # never the secrets
        return f"Target(address={self.address!r}, tls={self.tls}, credential={self.credential!r})"

    def metadata(self) -> tuple[tuple[str, str], ...]:
        out: list[tuple[str, str]] = []
        if self.token:
            out.append(("authorization", f"Bearer {self.token}"))
        if self.api_key:
            out.append((self.api_key_header, self.api_key))
        return tuple(out)


@dataclass(frozen=True, slots=True)
class Credential:
    """What to present to the daemon, and where it came from (named in errors; the value never is)."""

    token: str | None = None
    api_key: str | None = None
    origin: str = ""

    def __repr__(self) -> str:  # never the secret, whatever prints it
        return f"Credential(origin={self.origin!r})"


def credential_of(args: Any, fallback_token_env: str | None = None) -> Credential:
    """The credential the flags name: ``--token-env NAME`` / ``--api-key-env NAME`` (the variable's value),
    else ``--token`` / ``--api-key`` (the value itself, which ``ps`` shows), else ``$MEDIATOR_TOKEN`` /
    ``$MEDIATOR_API_KEY``, else the variable ``fallback_token_env`` names (an HTTP listener's
    ``admin_token_env``) when it is set. One credential: the daemon refuses a request carrying two."""
    given: list[Credential] = []
    for flag, env_flag, is_token in (("token", "token_env", True), ("api_key", "api_key_env", False)):
        env_name = getattr(args, env_flag, None)
        value = getattr(args, flag, None)
        dash = flag.replace("_", "-")
        if env_name is not None and value is not None:
            raise ClientError(f"give --{dash} or --{dash}-env, not both")
        if env_name is not None:
            value = os.environ.get(env_name)
            if not value:
                raise ClientError(f"--{dash}-env {env_name}: the variable {env_name} is not set (or empty)")
            origin = f"--{dash}-env {env_name}"
        else:
            origin = f"--{dash}"
        if value:
            given.append(Credential(value, None, origin) if is_token else Credential(None, value, origin))
    if not given:
        for env_name, is_token in ((TOKEN_ENV, True), (API_KEY_ENV, False)):
            value = os.environ.get(env_name)
            if value:
                origin = f"${env_name}"
                given.append(Credential(value, None, origin) if is_token else Credential(None, value, origin))
    if len(given) > 1:
        raise ClientError(
            f"{given[0].origin} and {given[1].origin} both give a credential; the daemon refuses a request "
            "carrying two: give one"
        )
    if given:
        return given[0]
    if fallback_token_env and os.environ.get(fallback_token_env):
        return Credential(os.environ[fallback_token_env], None, f"${fallback_token_env} (the admin_token_env)")
    return Credential()


def api_key_header(config: Config | None, listener: str | None) -> str:
    """The header (gRPC metadata key) of the first API key authenticator ``listener`` names, else x-api-key."""
    if config is None or listener is None:
        return "x-api-key"
    names = config.root.listeners.get(listener, {}).get("auth") or []
    for name in names if isinstance(names, list) else []:
        auth = config.root.auth.get(name)
        if auth is not None and auth.kind == "api_key":
            return str(getattr(auth, "header", "x-api-key"))
    return "x-api-key"


CREDENTIAL_HINT = (
    "pass --token-env NAME (a variable holding a bearer token: a JWT, an API key, or the listener's "
    "admin_token_env token) or --api-key-env NAME"
)


def target_of(args: Any, config: Config | None) -> Target:
    """Where and how to connect: ``--target`` (else the config's first gRPC listener), TLS when the
    listener serves it or ``--tls``/``--ca-file`` say so, credentials from the flags or the environment."""
    address = args.target
    tls = bool(args.tls or args.ca_file)
    credential = credential_of(args)
    header = "x-api-key"
    if address is None:
        name, listener = next(
            ((n, b) for n, b in (config.root.listeners.items() if config else ()) if b.get("kind") == "grpc"),
            (None, None),
        )
        header = api_key_header(config, name)
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
        token=credential.token,
        api_key=credential.api_key,
        api_key_header=header,
        credential=credential.origin,
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
    if code.name in ("UNAUTHENTICATED", "PERMISSION_DENIED"):
        if not target.metadata():
            return ClientError(
                f"{what}: the daemon asks for a credential ({code.name}: {details}); {CREDENTIAL_HINT} "
                f"(or set {TOKEN_ENV} / {API_KEY_ENV}; --api-key works too)"
            )
        return ClientError(
            f"{what}: the daemon refused the credential from {target.credential} ({code.name}: {details}); "
            f"{CREDENTIAL_HINT} with one it accepts"
        )
    return ClientError(f"{what} refused: {code.name}: {details}")


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


# Reconnect backoff of ``tail``: doubling from the first delay up to the cap, each delay drawn with full
# jitter from [delay/2, delay] so that several tails do not hammer a restarting daemon in step.
TAIL_BACKOFF_FIRST_S = 0.25
TAIL_BACKOFF_MAX_S = 5.0
# Codes after which subscribing again cannot help: the request or the credential is wrong.
_FINAL_CODES = frozenset(
    {"UNAUTHENTICATED", "PERMISSION_DENIED", "INVALID_ARGUMENT", "NOT_FOUND", "UNIMPLEMENTED", "FAILED_PRECONDITION"}
)


async def tail(
    target: Target,
    request: Any,
    *,
    count: int | None,
    timeout_s: float | None,
    as_json: bool,
    out: IO[str],
    err: IO[str],
    backoff_first_s: float = TAIL_BACKOFF_FIRST_S,
    backoff_max_s: float = TAIL_BACKOFF_MAX_S,
) -> int:
    """Print the events Subscribe streams until interrupted (or ``count`` events, or ``timeout_s``
    seconds). Says on ``err`` once the daemon has registered the subscription (its ``mediator-subscribed``
    initial metadata: every event routed from then on shows), and keeps going when there is no daemon yet
    or it goes away (a restart): each disconnect and each failed attempt is one line on ``err``, then it
    subscribes again with backoff. Subscribe has no cursor, so events routed while no subscription was
    registered are not shown; the line after a reconnect says so. A refusal no retry can change (a bad
    credential, an unknown outbound) raises ClientError. Cancellation (Ctrl-C) stops it at once."""
    import random

    filters = {k: v for k, v in (("type", request.type), ("source", request.source)) if v}
    shown = " ".join(f"{k}={v}" for k, v in filters.items()) or "every event"
    seen = 0
    lifetimes = 0  # subscriptions registered so far
    failures = 0  # attempts failed since the last registered subscription
    delay = backoff_first_s
    try:
        async with asyncio.timeout(timeout_s):
            while True:
                try:
                    async with contextlib.aclosing(_subscribe(target, request)) as stream:
                        async for event in stream:
                            if event is None:  # registered
                                lifetimes += 1
                                failures, delay = 0, backoff_first_s
                                print(_subscribed_note(target, shown, lifetimes), file=err, flush=True)
                                continue
                            print(format_event(event, as_json), file=out, flush=True)
                            seen += 1
                            if count is not None and seen >= count:
                                return 0
                    why = "the daemon ended the stream"
                except _Lost as exc:
                    why = exc.why
                failures += 1
                wait = random.uniform(delay / 2, delay)
                if failures == 1 and lifetimes:
                    what = f"disconnected from {target.address} ({why})"
                elif lifetimes or failures > 1:
                    what = f"still no daemon on {target.address} ({why}; attempt {failures})"
                else:
                    what = f"no daemon answers on {target.address} yet ({why})"
                print(f"tail: {what}; subscribing again in {wait:.1f} s; Ctrl-C stops", file=err, flush=True)
                await asyncio.sleep(wait)
                delay = min(delay * 2, backoff_max_s)
    except TimeoutError:
        pass
    return 0


def _subscribed_note(target: Target, shown: str, lifetimes: int) -> str:
    if lifetimes == 1:
        return f"tail: subscribed on {target.address} ({shown}); Ctrl-C stops"
    return (
        f"tail: subscribed again on {target.address} ({shown}); events routed while disconnected are not shown "
        "(Subscribe cannot resume)"
    )


class _Lost(Exception):
    """A subscription that ended (or never registered) for a reason a later attempt may not have."""

    def __init__(self, why: str) -> None:
        super().__init__(why)
        self.why = why


async def _subscribe(target: Target, request: Any) -> Any:
    """One Subscribe call on a channel of its own (so that gRPC's own reconnect backoff, up to two minutes,
    never delays ours): yields None once the daemon registered the subscription, then each event; returns
    when the daemon ends the stream. Raises _Lost when the call fails in a way a retry may fix, ClientError
    when it cannot."""
    import grpc

    from mediator.v1.service_pb2_grpc import MediatorStub

    async with _channel(target) as channel:
        call = MediatorStub(channel).Subscribe(request, metadata=target.metadata())
        try:
            # grpc.aio gives a failed call empty initial metadata rather than an error: only the daemon's
            # own key says the subscription is live (before, "subscribed" was printed for a refused connection).
            metadata = await call.initial_metadata()
            if (SUBSCRIBED_KEY, "1") not in tuple(metadata or ()):
                code = await call.code()
                details = await call.details()
                if code is not None and code.name in _FINAL_CODES:
                    raise _rpc_error(_Status(code, details), target, "tail")
                raise _Lost(f"{code.name if code is not None else 'no answer'}: {details or 'not subscribed'}")
            yield None
            async for event in call:
                yield event
        except grpc.aio.AioRpcError as exc:
            if exc.code().name in _FINAL_CODES:
                raise _rpc_error(exc, target, "tail") from exc
            raise _Lost(f"{exc.code().name}: {exc.details() or ''}".rstrip(": ")) from exc
        finally:
            call.cancel()


@dataclass(frozen=True, slots=True)
class _Status:
    """A finished call's status in the shape ``_rpc_error`` reads (``code()``, ``details()``)."""

    status: Any
    text: str | None

    def code(self) -> Any:
        return self.status

    def details(self) -> str | None:
        return self.text


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


# The narrowest reason column worth folding into; with less room the reason goes under its row.
MIN_REASON_COLUMNS = 30
UNDER_ROW_INDENT = 4


def table(rows: list[list[str]], *, fold: bool = False, width: int | None = None) -> str:
    """Columns padded to their widest cell, the last one as it is. With ``fold``, the last column (a dead
    letter's reason: a protobuf error runs over several lines) is folded to what is left of ``width`` (the
    terminal's or $COLUMNS; into a pipe only at its own line breaks), each
    continuation line indented under it. Where fewer than ``MIN_REASON_COLUMNS`` are left, the last cell
    goes on the lines below its row instead, indented by four. Line breaks and tabs in the other cells are
    shown as ``\\n``/``\\t``, so that a row stays one line."""
    import shutil

    if not fold:
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
        plain = ["  ".join([*(c.ljust(w) for c, w in zip(r, widths, strict=False)), r[-1]]) for r in rows]
        return "\n".join(line.rstrip() for line in plain)
    if width is None:  # into a pipe (--table) without $COLUMNS: lines are split, never wrapped
        tty = sys.stdout.isatty() or "COLUMNS" in os.environ
        width = shutil.get_terminal_size().columns if tty else 1 << 20
    cells = [[_one_line(c) for c in r[:-1]] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(rows[0]) - 1)]
    indent = sum(widths) + 2 * len(widths)
    under = width - indent < MIN_REASON_COLUMNS
    lines: list[str] = []
    for n, (r, head) in enumerate(zip(rows, cells, strict=True)):
        padded = [c.ljust(w) for c, w in zip(head, widths, strict=True)]
        if under and n > 0:
            lines.append("  ".join(padded).rstrip())
            lines += [" " * UNDER_ROW_INDENT + piece for piece in _fold(r[-1], width - UNDER_ROW_INDENT)]
            continue
        folded = _fold(r[-1], width - indent) or [""]
        lines.append("  ".join([*padded, folded[0]]).rstrip())
        lines += [" " * indent + piece for piece in folded[1:]]
    return "\n".join(lines)


def _fold(text: str, room: int) -> list[str]:
    """``text`` in lines of at most ``room`` characters: its own lines kept (their leading indentation
    too), each wrapped at spaces; a word longer than ``room`` is cut."""
    import textwrap

    room = max(room, 10)
    out: list[str] = []
    for para in text.expandtabs(4).splitlines():
        lead = para[: len(para) - len(para.lstrip())]
        if len(lead) >= room // 2:
            lead = ""
        out += textwrap.wrap(para.strip(), room, initial_indent=lead, subsequent_indent=lead, break_on_hyphens=False)
    return out


def _one_line(cell: str) -> str:
    return cell.replace("\r", "\\r").replace("\n", "\\n").replace("\t", "\\t")
