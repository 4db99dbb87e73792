"""A TCP proxy a test puts between the daemon and a broker, to cut or stall a connection without touching
the broker (shared/SERVICES.md: "Brokers a test may break")."""

from __future__ import annotations

import asyncio
import contextlib

from tests.support.net import free_port

CHUNK = 65536
CONNECT_TIMEOUT_S = 5.0


class TcpProxy:
    """Forwards ``127.0.0.1:port`` (a free port) to ``target_host:target_port``.

    ``black_hole()`` stops forwarding in both directions without closing anything: bytes already sent
    sit in the proxy and the kernel buffers, new connections are accepted but never reach the broker, so
    neither end notices anything but silence (only a heartbeat or keepalive can tell). ``heal()`` resumes
    forwarding where it stopped; a connection whose client gave up meanwhile is closed then.
    ``cut()`` closes every open connection at once (a reset, as a broken network path would do)."""

    def __init__(self, target_port: int, target_host: str = "127.0.0.1", port: int | None = None) -> None:
        self.port = port or free_port()
        self.target_host = target_host
        self.target_port = target_port
        self.accepted = 0  # connections accepted so far, a test can tell that a client reconnected
        self._open = asyncio.Event()
        self._open.set()
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()

    @property
    def black_holed(self) -> bool:
        return not self._open.is_set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", self.port)

    def black_hole(self) -> None:
        self._open.clear()

    def heal(self) -> None:
        self._open.set()

    def cut(self) -> None:
        for writer in list(self._writers):
            transport = writer.transport
            transport.abort()

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        self._open.set()
        for task in list(self._tasks):
            task.cancel()
        self.cut()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=5)
        if self._server is not None:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(5):
                    await self._server.wait_closed()
            self._server = None

    async def __aenter__(self) -> TcpProxy:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        task = asyncio.create_task(self._serve(reader, writer), name=f"proxy:{self.port}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        upstream: asyncio.StreamWriter | None = None
        try:
            # Black-holed: the client's SYN was answered (the listener is ours) but nothing reaches the
            # broker until the path heals.
            await self._open.wait()
            try:
                async with asyncio.timeout(CONNECT_TIMEOUT_S):
                    up_reader, upstream = await asyncio.open_connection(self.target_host, self.target_port)
            except (OSError, TimeoutError):
                return
            self._writers.add(upstream)
            async with asyncio.TaskGroup() as tg:
                to_broker = tg.create_task(self._pump(reader, upstream))
                to_client = tg.create_task(self._pump(up_reader, writer))
                # Whichever side ends first ends the connection: close the other direction too.
                await asyncio.wait({to_broker, to_client}, return_when=asyncio.FIRST_COMPLETED)
                to_broker.cancel()
                to_client.cancel()
        finally:
            for w in (writer, upstream):
                if w is not None:
                    self._writers.discard(w)
                    w.transport.abort()

    async def _pump(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError):
            while True:
                data = await src.read(CHUNK)
                if not data:
                    await self._open.wait()  # nor does a close cross a black hole
                    return
                # Held, not dropped: a healed path delivers the stream intact, as TCP would.
                await self._open.wait()
                dst.write(data)
                await dst.drain()
