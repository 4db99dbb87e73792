"""``mediator run --config FILE`` and ``mediator check --config FILE`` (also ``python -m mediator``)."""

from __future__ import annotations

import argparse
import asyncio
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


def cmd_check(args: argparse.Namespace) -> int:
    try:
        config = _load(args.config)
    except ConfigError as exc:
        _print_config_error(exc)
        return EXIT_CONFIG
    print(
        f"{args.config}: ok ({len(config.root.inbound)} inbound, {len(config.root.outbound)} outbound, "
        f"{len(config.routes)} routes)"
    )
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    try:
        config = _load(args.config)
    except ConfigError as exc:
        _print_config_error(exc)
        return EXIT_CONFIG
    configure(config.daemon.log_level, config.daemon.log_format)
    from mediator.daemon import Daemon  # imports the adapters' libraries; not needed by `check`

    async def main() -> None:
        await Daemon(config).run()

    _install_uvloop()
    try:
        asyncio.run(main())
    except ConfigError as exc:  # raised while building adapters, e.g. a secret's variable is not set
        _print_config_error(exc)
        return EXIT_CONFIG
    return 0


def _install_uvloop() -> None:
    try:
        import uvloop
    except ImportError:
        return
    uvloop.install()


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
    args = parser.parse_args(argv)
    code: int = args.func(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
