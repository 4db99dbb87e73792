"""structlog set-up: key-value events, JSON when stderr is not a terminal; library loggers through it too."""

from __future__ import annotations

import logging
import sys

import structlog

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}


LIBRARY_LOGGERS = ("aiormq", "aio_pika", "aiohttp", "aiomqtt", "paho", "grpc", "asyncio")
"""Libraries that log through the stdlib: their records get the same renderer (and level floor) as ours."""


def configure(level: str = "info", fmt: str = "auto") -> None:
    """structlog for our events and, through a ``ProcessorFormatter`` on the root handler, for every stdlib
    logger too (aiormq's reconnect noise during a broker outage, asyncio's warnings): one stream, one
    format. ``fmt``: ``console`` (coloured key-value lines), ``json`` (one object per line) or ``auto``
    (console on a terminal, JSON otherwise, e.g. under systemd or piped through ``tee``)."""
    console = fmt == "console" or (fmt == "auto" and sys.stderr.isatty())
    renderer: structlog.typing.Processor = (
        structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty()) if console else structlog.processors.JSONRenderer()
    )
    shared: list[structlog.typing.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    structlog.configure(
        processors=[
            *shared,
            structlog.processors.StackInfoRenderer(),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[level]),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )
    # A library's record becomes an event named after its message, with its logger's name bound.
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[*shared, structlog.stdlib.add_logger_name, structlog.stdlib.ExtraAdder()],
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            structlog.processors.format_exc_info,
            renderer,
        ],
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    # Libraries are chatty at info (aiohttp's access log, aiormq's every reconnect attempt): warnings up.
    root.setLevel(max(_LEVELS[level], logging.WARNING))
    for name in LIBRARY_LOGGERS:
        logging.getLogger(name).setLevel(max(_LEVELS[level], logging.WARNING))
