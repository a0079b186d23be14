"""A TCP proxy owned by a test, to break the network between the syncer and PostgreSQL.

    with TcpProxy(upstream=("127.0.0.1", 5432)) as proxy:
        dsn = proxy.dsn(pg_url)   # the same database, through the proxy
        proxy.cut()               # reset every live connection at once
        proxy.down()              # cut, and reset every new connection on arrival
        proxy.blackhole()         # accept and keep connections, forward nothing
        proxy.restore()           # pass-through again (held bytes flow on)

The proxy runs its own asyncio loop in a background thread, so every control is a plain
blocking call that has taken effect when it returns: it works from the test, from a
worker thread and from a synchronous fault hook running inside the test's event loop.

A blackhole behaves like a network partition under TCP: bytes sent meanwhile are held,
not lost, and flow on after `restore()` unless an end gave up and closed first.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import threading
from collections.abc import Coroutine
from enum import Enum
from types import TracebackType
from typing import Any, Self, TypeVar
from urllib.parse import urlsplit, urlunsplit

CHUNK = 65536
CONTROL_TIMEOUT = 10.0
T = TypeVar("T")


class Mode(Enum):
    PASS = "pass"
    REFUSE = "refuse"
    BLACKHOLE = "blackhole"


def _reset(writer: asyncio.StreamWriter | None) -> None:
    """Close a connection at once with a TCP RST (SO_LINGER 0), like a dropped peer."""
    if writer is None or writer.transport.is_closing():
        return
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


class _Link:
    """One client connection and its upstream connection."""

    def __init__(self, client: asyncio.StreamWriter) -> None:
        self.client = client
        self.upstream: asyncio.StreamWriter | None = None
        self.task: asyncio.Task[None] | None = None

    def reset(self) -> None:
        _reset(self.client)
        _reset(self.upstream)


class TcpProxy:
    """Forward 127.0.0.1:<ephemeral port> to `upstream`, with faults on demand."""

    def __init__(self, upstream: tuple[str, int] = ("127.0.0.1", 5432)) -> None:
        self.upstream = upstream
        self.host = "127.0.0.1"
        self.port = 0
        self.accepted = 0
        self._mode = Mode.PASS
        self._links: set[_Link] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.Server | None = None
        self._flowing: asyncio.Event | None = None

    # -- controls (any thread) ---------------------------------------------------------

    @property
    def mode(self) -> Mode:
        return self._mode

    @property
    def live_connections(self) -> int:
        return self._call(self._count())

    def cut(self) -> None:
        """Reset every live connection at once; new connections still pass."""
        self._call(self._cut())

    def down(self) -> None:
        """PostgreSQL is gone: reset every live connection and every new one on arrival."""
        self._call(self._set_mode(Mode.REFUSE, cut=True))

    def blackhole(self) -> None:
        """Keep every connection (old and new) open but forward nothing."""
        self._call(self._set_mode(Mode.BLACKHOLE, cut=False))

    def restore(self) -> None:
        """Pass-through again; bytes held by a blackhole flow on."""
        self._call(self._set_mode(Mode.PASS, cut=False))

    def dsn(self, url: str) -> str:
        """`url` with its host and port replaced by the proxy's (user info kept)."""
        parts = urlsplit(url)
        userinfo, at, _ = parts.netloc.rpartition("@")
        return urlunsplit(parts._replace(netloc=f"{userinfo}{at}{self.host}:{self.port}"))

    # -- lifecycle -----------------------------------------------------------------------

    def start(self) -> Self:
        started = threading.Event()
        failure: list[BaseException] = []

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            try:
                try:
                    loop.run_until_complete(self._listen())
                except BaseException as error:  # reported to start() below
                    failure.append(error)
                    return
                finally:
                    started.set()
                loop.run_forever()
            finally:
                loop.run_until_complete(loop.shutdown_asyncgens())
                loop.close()

        self._thread = threading.Thread(target=run, name="tcp-proxy", daemon=True)
        self._thread.start()
        if not started.wait(CONTROL_TIMEOUT):
            raise RuntimeError("the proxy did not start")
        if failure:
            self._thread.join(CONTROL_TIMEOUT)
            raise failure[0]
        return self

    def stop(self) -> None:
        if self._thread is None or self._loop is None:
            return
        try:
            self._call(self._shutdown())
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(CONTROL_TIMEOUT)
            self._thread = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- the loop's side ---------------------------------------------------------------

    def _call(self, coro: Coroutine[Any, Any, T]) -> T:
        if self._loop is None:
            coro.close()
            raise RuntimeError("the proxy is not running")
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(CONTROL_TIMEOUT)

    async def _listen(self) -> None:
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._server = await asyncio.start_server(self._handle, self.host, 0)
        self.port = int(self._server.sockets[0].getsockname()[1])

    async def _count(self) -> int:
        return len(self._links)

    async def _cut(self) -> None:
        for link in list(self._links):
            link.reset()
            if link.task is not None:
                link.task.cancel()
        # Let the cancelled forwarders finish, so that a cut is complete on return.
        await asyncio.gather(
            *(link.task for link in list(self._links) if link.task is not None),
            return_exceptions=True,
        )

    async def _set_mode(self, mode: Mode, *, cut: bool) -> None:
        assert self._flowing is not None
        self._mode = mode
        if mode is Mode.BLACKHOLE:
            self._flowing.clear()
        else:
            self._flowing.set()
        if cut:
            await self._cut()

    async def _shutdown(self) -> None:
        if self._server is not None:
            self._server.close()
        await self._cut()
        if self._server is not None:
            await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        if self._mode is Mode.REFUSE:
            _reset(writer)
            return
        link = _Link(writer)
        link.task = asyncio.current_task()
        self._links.add(link)
        try:
            assert self._flowing is not None
            await self._flowing.wait()  # a blackhole holds a new connection unanswered
            up_reader, link.upstream = await asyncio.open_connection(*self.upstream)
            forward = [
                asyncio.create_task(self._pump(reader, link.upstream)),
                asyncio.create_task(self._pump(up_reader, writer)),
            ]
            try:
                await asyncio.wait(forward, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for task in forward:
                    task.cancel()
                await asyncio.gather(*forward, return_exceptions=True)
        except (OSError, asyncio.CancelledError):
            pass
        finally:
            self._links.discard(link)
            for end in (link.upstream, writer):
                if end is not None and not end.transport.is_closing():
                    end.close()

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        assert self._flowing is not None
        with contextlib.suppress(OSError):
            while data := await reader.read(CHUNK):
                await self._flowing.wait()  # a blackhole holds what it read
                writer.write(data)
                await writer.drain()
