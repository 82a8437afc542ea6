"""A WSGI web service that publishes ``orders.placed`` when an order is placed, and asks the
pricing worker for quotes (request/reply).

    python -m workers.webapp            # serves on WEBAPP_HOST:WEBAPP_PORT (127.0.0.1:8000)
    curl -X POST localhost:8000/orders -d '{"order_id": 7, "email": "a@b.c"}'
    curl 'localhost:8000/quote?sku=A1&quantity=3'

Standard library ``wsgiref`` only; the same ``app`` runs under gunicorn or uWSGI
(``gunicorn workers.webapp:app``): the module-level :class:`workerkit.Publisher` is thread-safe and
reconnects by itself in every forked worker process.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socketserver
import threading
from collections.abc import Callable, Iterable
from types import FrameType
from typing import Any
from urllib.parse import parse_qs
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from pydantic import ValidationError

from workerkit import ConnectionFailed, Publisher, PublishError, RemoteError

from .pricing import Quote, QuoteRequest
from .receipts import OrderPlaced

__all__ = ["app", "main", "make_app", "publisher"]

log = logging.getLogger("workers.webapp")

MAX_BODY = 1024 * 1024

StartResponse = Callable[..., Any]
WsgiApp = Callable[[dict[str, Any], StartResponse], Iterable[bytes]]

# One publisher per process, shared by every request thread; it connects on first use.
publisher = Publisher()


# How long a quote may take (the pricing worker's retries included) before the page gives up.
QUOTE_TIMEOUT = 5.0


def make_app(
    publisher: Publisher,
    routing_key: str = "orders.placed",
    quote_key: str = "pricing.quote",
) -> WsgiApp:
    """The WSGI app publishing placed orders on ``routing_key`` and asking for quotes on
    ``quote_key``, through ``publisher``."""

    def app(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        method, path = environ["REQUEST_METHOD"], environ.get("PATH_INFO", "/")
        if path == "/health":
            return _reply(start_response, 200, {"status": "ok"})
        if path == "/quote":
            return _quote(publisher, quote_key, environ, start_response)
        if path != "/orders":
            return _reply(start_response, 404, {"error": "not found"})
        if method != "POST":
            return _reply(start_response, 405, {"error": "POST an order as JSON"})
        return _place(publisher, routing_key, environ, start_response)

    return app


def _place(
    publisher: Publisher, routing_key: str, environ: dict[str, Any], start_response: StartResponse
) -> list[bytes]:
    try:
        length = int(environ.get("CONTENT_LENGTH") or 0)
    except ValueError:
        length = -1
    if not 0 < length <= MAX_BODY:
        return _reply(start_response, 400, {"error": f"body must be 1 to {MAX_BODY} bytes"})
    try:
        order = OrderPlaced.model_validate_json(environ["wsgi.input"].read(length))
    except ValidationError as exc:
        errors = exc.errors(include_url=False, include_input=False, include_context=False)
        return _reply(start_response, 422, {"error": "invalid order", "details": errors})
    try:
        # The message id names the order, so consumers can spot a duplicate publish.
        message_id = publisher.publish(routing_key, order, message_id=f"order-{order.order_id}")
    except PublishError as exc:
        # Not confirmed by the broker: tell the client to try again, never pretend success.
        log.error("order %s not published: %s", order.order_id, exc)
        return _reply(start_response, 503, {"error": f"{type(exc).__name__}: {exc}"})
    return _reply(start_response, 202, {"order_id": order.order_id, "message_id": message_id})


def _quote(
    publisher: Publisher, quote_key: str, environ: dict[str, Any], start_response: StartResponse
) -> list[bytes]:
    query = {k: v[0] for k, v in parse_qs(environ.get("QUERY_STRING", "")).items()}
    try:
        request = QuoteRequest.model_validate(query)
    except ValidationError as exc:
        errors = exc.errors(include_url=False, include_input=False, include_context=False)
        return _reply(start_response, 422, {"error": "invalid quote request", "details": errors})
    try:
        answer: Quote = publisher.request(
            quote_key, request, timeout=QUOTE_TIMEOUT, reply_type=Quote
        )
    except RemoteError as exc:  # the pricing worker rejected it (unknown sku)
        return _reply(start_response, 404, {"error": exc.message})
    except (PublishError, ConnectionFailed) as exc:  # no answer in time, or no worker queue
        log.error("quote for %s failed: %s", request.sku, exc)
        return _reply(start_response, 503, {"error": f"{type(exc).__name__}: {exc}"})
    return _reply(start_response, 200, answer.model_dump())


def _reply(start_response: StartResponse, status: int, payload: object) -> list[bytes]:
    reasons = {200: "OK", 202: "Accepted", 400: "Bad Request", 404: "Not Found"}
    reasons |= {405: "Method Not Allowed", 422: "Unprocessable Entity", 503: "Unavailable"}
    body = json.dumps(payload, default=str).encode()
    start_response(
        f"{status} {reasons[status]}",
        [("Content-Type", "application/json"), ("Content-Length", str(len(body)))],
    )
    return [body]


app = make_app(publisher)


class ThreadingWSGIServer(socketserver.ThreadingMixIn, WSGIServer):
    """One thread per request, as real WSGI servers do: they all share ``publisher``."""

    daemon_threads = True


class QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        log.info("%s %s", self.address_string(), format % args)


def main() -> None:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    host = os.environ.get("WEBAPP_HOST", "127.0.0.1")
    port = int(os.environ.get("WEBAPP_PORT", "8000"))
    server = make_server(host, port, app, ThreadingWSGIServer, QuietHandler)

    def stop(_sig: int, _frame: FrameType | None) -> None:
        # shutdown() waits for serve_forever() to return, so it must run on another thread.
        threading.Thread(target=server.shutdown).start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    log.info("serving on http://%s:%d (POST /orders, GET /quote, GET /health)", host, port)
    try:
        server.serve_forever()
    finally:
        server.server_close()
        publisher.close()
        log.info("stopped")


if __name__ == "__main__":
    main()
