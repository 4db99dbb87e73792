"""``mediator run --config FILE`` and ``mediator check --config FILE`` (also ``python -m mediator``)."""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import sys
from collections.abc import Sequence

from mediator import __version__
from mediator.config import Config, load
from mediator.core.errors import ConfigError
from mediator.logs import configure
from mediator.registry import load_specs

EXIT_CONFIG = 2


def _load(path: str) -> Config:
    return load(path, load_specs())


def _print_config_error(exc: ConfigError) -> None:
    print(f"{exc.file}: invalid configuration ({len(exc.problems)} error(s)):", file=sys.stderr)
    for problem in exc.problems:
        print(f"  {exc.file}: {problem}", file=sys.stderr)


def cmd_check(args: argparse.Namespace, config: Config) -> int:
    from mediator.daemon import dry_build

    problems, environment = asyncio.run(dry_build(config))
    for problem in environment:
        print(f"  warning: {problem} (needed by `mediator run`)", file=sys.stderr)
    if problems:
        raise ConfigError(args.config, problems)
    print(
        f"{args.config}: ok ({len(config.root.inbound)} inbound, {len(config.root.outbound)} outbound, "
        f"{len(config.routes)} routes)"
    )
    return 0


def cmd_run(args: argparse.Namespace, config: Config) -> int:
    configure(config.daemon.log_level, config.daemon.log_format)
    from mediator.daemon import Daemon  # imports the adapters' libraries; not needed by `check`

    async def main() -> None:
        await Daemon(config).run()

    _install_uvloop()
    _freeze_startup_heap()
    asyncio.run(main())  # may raise ConfigError while building adapters (a secret's variable is not set)
    return 0


# The youngest generation is collected every 10,000 net allocations instead of 700. A message allocates a
# few hundred objects, almost all freed by reference counting (which takes them off the count), yet at 700
# the collector still ran every ~60 messages for about a millisecond each. HTTP -> AMQP (5 s at saturation,
# 3 s at 1,000 msgs/s, gc.callbacks timing, runs interleaved): time in the collector 242-319 -> 1.4-2.0 ms
# per run, daemon CPU 335-367 -> 313-321 us per message. The older generations keep their default ratios.
GC_THRESHOLDS = (10_000, 10, 10)


def _freeze_startup_heap() -> None:
    """Move what the imports and the config built into the collector's permanent generation.

    That is ~63,000 objects (modules, classes, the protocol libraries) against ~1,300 that the running daemon
    holds, and every full collection scanned them all: the longest stall of the event loop. Measured on
    MQTT -> AMQP (3 s at saturation, then 5 s at 1,000 msgs/s): longest full collection 62 -> 5.7 ms.
    Frozen before any connection, task or message exists, so that everything the running daemon creates
    stays collectable. (Freezing after startup with rarer collections, c2c8bf0, once stopped aio-pika's
    robust reconnection from resuming a consumer: that was the inbound not holding its channel, fixed in
    acf23a4, which tests/faults test_rabbitmq_outage_under_load catches.) Then ``GC_THRESHOLDS``.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


def _install_uvloop() -> None:
    try:
        import uvloop
    except ImportError:
        return
    uvloop.install()


def _admin_url(config: Config) -> tuple[str, dict[str, str]] | None:
    """The running daemon's admin endpoint: the first HTTP listener that serves it."""
    for body in config.root.listeners.values():
        if body.get("kind") == "http" and body.get("admin", True):
            host = body.get("host", "127.0.0.1")
            headers = {}
            token_env = body.get("admin_token_env")
            if token_env and os.environ.get(token_env):
                headers["Authorization"] = f"Bearer {os.environ[token_env]}"
            return f"http://{host}:{body.get('port', 8080)}/admin/dead-letters", headers
    return None


async def _dead_letters(config: Config, action: str, ids: list[int] | None, limit: int) -> int:
    import aiohttp

    from mediator.daemon import describe

    target = _admin_url(config)
    if target is not None:
        url, headers = target
        try:
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as http:
                if action == "list":
                    async with http.get(url, params={"limit": str(limit)}, headers=headers) as resp:
                        resp.raise_for_status()
                        print(json.dumps(await resp.json(), indent=2))
                else:
                    body = {"ids": ids} if ids is not None else {}
                    async with http.post(f"{url}/replay", json=body, headers=headers) as resp:
                        resp.raise_for_status()
                        print(json.dumps(await resp.json()))
                return 0
        except aiohttp.ClientConnectionError:
            pass  # no daemon running: work on the outbox file
    if config.outbox.kind != "sqlite":
        print("no running daemon answers, and an in-memory outbox keeps nothing on disk", file=sys.stderr)
        return 1
    from mediator.outbox import SqliteOutbox

    outbox = SqliteOutbox(config.outbox.path)
    await outbox.open()
    try:
        if action == "list":
            letters = [describe(dl) for dl in await outbox.dead_letters(limit)]
            print(json.dumps({"dead_letters": letters}, indent=2))
        else:
            rows = await outbox.replay(ids)
            print(json.dumps({"replayed": len(rows), "note": "delivered when the daemon next starts"}))
    finally:
        await outbox.close()
    return 0


def cmd_dead_letters(args: argparse.Namespace, config: Config) -> int:
    configure("warning", "console")
    ids: list[int] | None = args.id or None
    return asyncio.run(_dead_letters(config, args.action, ids, args.limit))


def cmd_hash_key(args: argparse.Namespace) -> int:
    """A new API key on stdout's first line, and the ``[[keys]]`` entry (its SHA-256, never the key) after."""
    from mediator.stages.authn import new_api_key

    key, digest = new_api_key()
    print(key)
    print("# add to the keys_file (the key above is shown once; give it to the client):", file=sys.stderr)
    roles = ", ".join(json.dumps(r) for r in args.role or [])
    entry = f'[[keys]]\nprincipal = {json.dumps(args.principal)}\nsha256 = "{digest}"\nroles = [{roles}]\n'
    if args.expires:
        from datetime import datetime

        try:
            when = datetime.fromisoformat(args.expires)
        except ValueError:
            when = None
        if when is None or when.tzinfo is None:
            print(f"--expires: {args.expires!r} is not an RFC 3339 date-time with an offset", file=sys.stderr)
            return EXIT_CONFIG
        entry += f"expires = {args.expires}\n"
    print(entry, end="")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mediator", description="Multi-protocol event gateway.")
    parser.add_argument("--version", action="version", version=f"mediator {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, func, help_text in (
        ("run", cmd_run, "run the daemon"),
        ("check", cmd_check, "validate a config file and list every error"),
    ):
        p = sub.add_parser(name, help=help_text)
        p.add_argument("--config", "-c", default="config.toml", help="path to config.toml")
        p.set_defaults(func=func)
    dlq = sub.add_parser("dead-letters", help="list or replay dead letters (running daemon, else the outbox file)")
    dlq.add_argument("action", choices=["list", "replay"])
    dlq.add_argument("--config", "-c", default="config.toml", help="path to config.toml")
    dlq.add_argument("--id", type=int, action="append", help="replay only this dead letter (repeatable)")
    dlq.add_argument("--limit", type=int, default=100, help="list at most this many")
    dlq.set_defaults(func=cmd_dead_letters)
    hk = sub.add_parser("hash-key", help="make a new API key and its [[keys]] entry for an api_key keys_file")
    hk.add_argument("--principal", required=True, help="who the key authenticates")
    hk.add_argument("--role", action="append", help="a role of that principal (repeatable)")
    hk.add_argument("--expires", help="RFC 3339 date-time after which the key is refused, e.g. 2027-01-01T00:00:00Z")
    args = parser.parse_args(argv)
    if args.command == "hash-key":
        return cmd_hash_key(args)
    try:
        code: int = args.func(args, _load(args.config))
    except ConfigError as exc:
        _print_config_error(exc)
        return EXIT_CONFIG
    return code


if __name__ == "__main__":
    sys.exit(main())
