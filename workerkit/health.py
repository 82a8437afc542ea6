"""The HTTP endpoint of ``workerkit run --health-port`` (stdlib asyncio, on the runner's loop).

* ``GET /health`` (liveness): ``200 ok`` while the runner has a live consumer on every queue,
  ``503 unhealthy`` otherwise (starting, reconnecting, draining).
* ``GET /ready`` (readiness): ``200 ready`` while every consumer is attached and the publish
  channel is open, and the runner is neither reconnecting nor draining; else ``503 not ready``.
* ``GET /metrics``: Prometheus exposition (:func:`workerkit.metrics.render`).

Served on the runner's event loop on purpose: a loop blocked by a handler does not answer,
and a liveness probe should notice.
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
_TEXT = "text/plain; charset=utf-8"

# (status, content type, body) of one answer.
Answer = tuple[int, str, bytes]


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
    is_healthy: Callable[[], bool],
    host: str = "0.0.0.0",
    port: int = 8080,
    *,
    is_ready: Callable[[], bool] | None = None,
    metrics: Callable[[], tuple[bytes, str]] | None = None,
) -> HealthServer:
    """Answer ``/health`` from ``is_healthy()``, ``/ready`` from ``is_ready()`` and ``/metrics``
    from ``metrics()`` (``(body, content type)``) on ``host:port``; a path whose callable is
    not given answers 404."""
    routes: dict[str, Callable[[], Answer]] = {
        "/health": lambda: _probe(is_healthy(), b"ok\n", b"unhealthy\n"),
        "/healthz": lambda: _probe(is_healthy(), b"ok\n", b"unhealthy\n"),
    }
    if is_ready is not None:
        ready = is_ready
        routes["/ready"] = lambda: _probe(ready(), b"ready\n", b"not ready\n")
    if metrics is not None:
        render = metrics

        def exposition() -> Answer:
            body, content_type = render()
            return 200, content_type, body

        routes["/metrics"] = exposition

    async def on_client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            answer: tuple[Answer, bool] | None = await _answer(reader, routes)
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
    paths = " ".join(p for p in routes if p != "/healthz")
    log.info("health endpoint on http://%s:%d/health (serving %s)", host, health.port, paths)
    return health


def _probe(ok: bool, yes: bytes, no: bytes) -> Answer:
    return (200, _TEXT, yes) if ok else (503, _TEXT, no)


async def _answer(
    reader: asyncio.StreamReader, routes: dict[str, Callable[[], Answer]]
) -> tuple[Answer, bool]:
    """The answer to one request, and whether to send its body (not for HEAD)."""
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), READ_TIMEOUT)
    request_line = head.split(b"\r\n", 1)[0].decode("latin-1")
    parts = request_line.split()
    if len(parts) != 3:
        return (405, _TEXT, b""), True
    method, target, _version = parts
    route = routes.get(target.split("?", 1)[0])
    if route is None:
        return (404, _TEXT, b""), True
    if method not in ("GET", "HEAD"):
        return (405, _TEXT, b""), True
    return route(), method == "GET"


def _response(answer: Answer, with_body: bool) -> bytes:
    status, content_type, body = answer
    head = (
        f"HTTP/1.1 {status} {_REASONS[status]}\r\n"
        f"Content-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\n"
        "Connection: close\r\n\r\n"
    )
    return head.encode("ascii") + (body if with_body else b"")
