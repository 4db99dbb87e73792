"""Shared helpers for the HTTP adapter tests (no tests here): a real listener on a free loopback port."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any

from adapters.http import HttpInboundConfig, HttpListener, HttpListenerConfig, build
from mediator.core.health import Health
from mediator.core.seams import AdapterConfig, Runtime
from tests.support.fakes import ListSink
from tests.support.net import free_port


@dataclass
class Running:
    sink: ListSink
    health: Health
    listener: HttpListener
    base: str  # http://127.0.0.1:PORT


@contextlib.asynccontextmanager
async def serve(inbounds: Mapping[str, Mapping[str, Any]], **listener: Any) -> AsyncIterator[Running]:
    """Build the adapter from config sections and run its listener until the block exits."""
    sink = ListSink()
    health = Health()
    lcfg = HttpListenerConfig.model_validate({"kind": "http", "port": free_port(), **listener})
    icfgs = {
        name: HttpInboundConfig.model_validate({"kind": "http", "listener": "web", **section})
        for name, section in inbounds.items()
    }
    built = build(AdapterConfig(listeners={"web": lcfg}, inbounds=icfgs), Runtime(sink=sink, health=health))
    (service,) = built.services
    assert isinstance(service, HttpListener)
    task = asyncio.create_task(service.run(), name=service.name)
    try:
        async with asyncio.timeout(5):
            started = asyncio.create_task(service.started.wait())
            await asyncio.wait({task, started}, return_when=asyncio.FIRST_COMPLETED)
            started.cancel()
            if task.done():
                task.result()  # surfaces a start-up error
        yield Running(sink, health, service, f"http://127.0.0.1:{service.port}")
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
