"""A minimal HTTP health endpoint for ``workerkit run --health-port`` (stdlib asyncio only).

``GET /health`` answers ``200 ok`` while the runner has a live consumer on every queue and
``503 unhealthy`` otherwise (starting, reconnecting, draining), which is what container
orchestrators need for liveness and readiness probes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

__all__ = ["HealthServer", "serve_health"]

log = logging.getLogger("workerkit.health")

# Probes send tiny requests; anything slower or larger is not a probe and is dropped.
READ_TIMEOUT = 5.0
MAX_REQUEST = 8192

_REASONS = {200: "OK", 404: "Not Found", 405: "Method Not Allowed", 503: "Service Unavailable"}


class HealthServer:
    """A listening health endpoint; ``port`` is the bound port (useful with port 0)."""

    def __init__(self, server: asyncio.Server) -> None:
        self._server = server

    @property
    def port(self) -> int:
        return int(self._server.sockets[0].getsockname()[1])

    async def close(self) -> None:
        self._server.close()
        # Python 3.12+ waits for open client connections here; a stuck probe must not block exit.
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._server.wait_closed(), 1.0)


async def serve_health(
    is_healthy: Callable[[], bool], host: str = "0.0.0.0", port: int = 8080
) -> HealthServer:
    """Start answering ``GET /health`` from ``is_healthy()`` on ``host:port``."""

    async def on_client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            answer: tuple[int, bool] | None = await _answer(reader, is_healthy)
        except (asyncio.TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            answer = None
        except ConnectionError:
            answer = None
        try:
            if answer is not None:
                writer.write(_response(*answer))
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(on_client, host, port, limit=MAX_REQUEST)
    health = HealthServer(server)
    log.info("health endpoint on http://%s:%d/health", host, health.port)
    return health


async def _answer(reader: asyncio.StreamReader, is_healthy: Callable[[], bool]) -> tuple[int, bool]:
    """(status, whether to send a body) for one request."""
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), READ_TIMEOUT)
    request_line = head.split(b"\r\n", 1)[0].decode("latin-1")
    parts = request_line.split()
    if len(parts) != 3:
        return 405, True
    method, target, _version = parts
    path = target.split("?", 1)[0]
    if path not in ("/health", "/healthz"):
        return 404, True
    if method not in ("GET", "HEAD"):
        return 405, True
    return (200 if is_healthy() else 503), method == "GET"


def _response(status: int, with_body: bool) -> bytes:
    body = b"ok\n" if status == 200 else (b"unhealthy\n" if status == 503 else b"")
    head = (
        f"HTTP/1.1 {status} {_REASONS[status]}\r\n"
        "Content-Type: text/plain; charset=utf-8\r\n"
        f"Content-Length: {len(body)}\r\n"
        "Connection: close\r\n\r\n"
    )
    return head.encode("ascii") + (body if with_body else b"")
