"""A TCP proxy on loopback between clients and a broker port, to cut, stall or reset links.

It runs its own event loop on a daemon thread, so it works the same under sync and async tests.
``stall()`` stops forwarding bytes (and closes) on every open connection while keeping the
sockets open, like a dead network path: the only way a peer can notice is a missed heartbeat.
Connections opened after the stall flow normally, so a client that gives up on the dead one can
reconnect. ``cut()`` resets every open connection (RST).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import threading
from collections.abc import Coroutine
from typing import Any


class Proxy:
    def __init__(self, upstream_host: str, upstream_port: int) -> None:
        self.upstream = (upstream_host, upstream_port)
        self.port = 0
        self.accepted = 0  # connections opened through the proxy so far
        self._loop = asyncio.new_event_loop()
        self._links: dict[asyncio.StreamWriter, asyncio.Event] = {}  # client side -> flowing
        self._writers: set[asyncio.StreamWriter] = set()
        self._server: asyncio.base_events.Server | None = None
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True, name="proxy")

    def url(self, user: str = "guest", password: str = "guest") -> str:
        return f"amqp://{user}:{password}@127.0.0.1:{self.port}/"

    # -- control (any thread) ----------------------------------------------------------------

    def start(self) -> Proxy:
        self._thread.start()
        self._run(self._start())
        return self

    def close(self) -> None:
        self._run(self._close())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)

    def cut(self) -> None:
        """Reset every open connection; new connections are still accepted."""
        self._run(self._reset_all())

    def stall(self) -> None:
        """Black-hole every open connection: no bytes, no close, in either direction."""
        self._run(self._set_flow(False))

    def resume(self) -> None:
        """Let stalled connections flow again (what was held back is delivered)."""
        self._run(self._set_flow(True))

    async def _set_flow(self, flowing: bool) -> None:
        for event in self._links.values():
            if flowing:
                event.set()
            else:
                event.clear()

    @property
    def open_connections(self) -> int:
        return len(self._writers) // 2

    def _run(self, coro: Coroutine[Any, Any, Any]) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(10)

    # -- loop side ---------------------------------------------------------------------------

    async def _start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _close(self) -> None:
        if self._server is not None:
            self._server.close()
        await self._reset_all()

    async def _reset_all(self) -> None:
        for writer in list(self._writers):
            _reset(writer)
        self._writers.clear()
        self._links.clear()

    async def _serve(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        self.accepted += 1
        try:
            up_r, up_w = await asyncio.open_connection(*self.upstream)
        except OSError:
            _reset(client_w)
            return
        self._writers.update((client_w, up_w))
        flowing = asyncio.Event()
        flowing.set()
        self._links[client_w] = flowing
        pumps = [
            asyncio.create_task(self._pump(client_r, up_w, flowing)),
            asyncio.create_task(self._pump(up_r, client_w, flowing)),
        ]
        await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
        for task in pumps:
            task.cancel()
        self._links.pop(client_w, None)
        for writer in (client_w, up_w):
            if writer in self._writers:
                self._writers.discard(writer)
                writer.close()

    async def _pump(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, flowing: asyncio.Event
    ) -> None:
        try:
            while True:
                data = await reader.read(65536)
                # Bytes (and an EOF) read during a stall are held back, never dropped: after
                # resume() the stream continues where it stopped.
                await flowing.wait()
                if not data:
                    return
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            return


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close with SO_LINGER 0 so that the peer sees a reset, not an orderly FIN."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()
