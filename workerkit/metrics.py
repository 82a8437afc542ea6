"""Prometheus metrics (prometheus_client), built as middleware.

``workerkit run --health-port P`` installs :class:`Metrics` on the runner and serves
``/metrics`` next to ``/health`` and ``/ready``. In your own process::

    from workerkit.metrics import Metrics
    runner = Runner([SendReceipt], middleware=[Metrics()])
    publisher = Publisher(middleware=[Metrics()])

and expose them with any prometheus_client server (``start_http_server(9000)``, or
:func:`render` in your web framework). Every metric lives in prometheus_client's default
registry, so they appear wherever that registry is served.

Multi-process (``PROMETHEUS_MULTIPROC_DIR`` set before the first import of prometheus_client):
counters and histograms are summed over live and dead processes, ``workerkit_in_flight`` over
live ones; :func:`render` then aggregates every process's files. See docs/observability.md for
what a supervisor must do.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    values,
)

from .message import Header
from .middleware import HANDLER_OUTCOMES, PUBLISH_OUTCOMES, Middleware

if TYPE_CHECKING:
    from .message import Message, Outgoing
    from .worker import Worker

__all__ = [
    "DELIVERY_LAG",
    "HANDLER_SECONDS",
    "IN_FLIGHT",
    "MESSAGES",
    "PUBLISHED",
    "PUBLISHED_AT_HEADER",
    "PUBLISH_SECONDS",
    "RECONNECTS",
    "Metrics",
    "multiprocess_mode",
    "render",
]

#: Publish time in milliseconds since the epoch, set by publishers that have :class:`Metrics`
#: installed. The AMQP ``timestamp`` property is whole seconds; this header gives the delivery
#: lag millisecond resolution (clock skew between hosts aside).
PUBLISHED_AT_HEADER = "workerkit-published-at"

# Handlers run from a millisecond to minutes; lag from milliseconds (a keeping-up worker) to
# hours (a backlog).
_HANDLER_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
_LAG_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 10, 30, 60, 300, 900, 3600)
_PUBLISH_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 5, 10)

MESSAGES = Counter(
    "workerkit_messages",
    "Deliveries handled, by queue and outcome (acked, retried, dead_lettered, rejected, invalid;"
    " requeued and given_back when workerkit handed a message back to the broker).",
    ["queue", "outcome"],
)
HANDLER_SECONDS = Histogram(
    "workerkit_handler_seconds",
    "Seconds from taking a delivery to carrying out its outcome (decode, handler, ack or the"
    " confirmed retry/dead-letter copy).",
    ["queue"],
    buckets=_HANDLER_BUCKETS,
)
IN_FLIGHT = Gauge(
    "workerkit_in_flight",
    "Deliveries being handled right now.",
    ["queue"],
    multiprocess_mode="livesum",
)
DELIVERY_LAG = Histogram(
    "workerkit_delivery_lag_seconds",
    "Seconds from publish to handler start, first deliveries only (not retries or delayed"
    " messages); millisecond resolution with the workerkit-published-at header, else whole"
    " seconds from the AMQP timestamp.",
    ["queue"],
    buckets=_LAG_BUCKETS,
)
RECONNECTS = Counter(
    "workerkit_reconnects",
    "Times the runner lost the broker and got every consumer back.",
)
PUBLISHED = Counter(
    "workerkit_published",
    "Publishes by outcome (confirmed, unroutable, timeout, error).",
    ["outcome"],
)
PUBLISH_SECONDS = Histogram(
    "workerkit_publish_seconds",
    "Seconds from publish to the broker's answer (retries on a lost connection included).",
    buckets=_PUBLISH_BUCKETS,
)


class _QueueSeries:
    """One queue's labelled series, looked up once (``labels()`` takes a lock every call)."""

    __slots__ = ("handler", "in_flight", "lag", "outcomes")

    def __init__(self, queue: str) -> None:
        self.in_flight = IN_FLIGHT.labels(queue)
        self.handler = HANDLER_SECONDS.labels(queue)
        self.lag = DELIVERY_LAG.labels(queue)
        # The handler outcomes exist from the start (a rate over a series that appears late
        # is wrong for its first scrapes); requeued and given_back appear when they happen.
        self.outcomes: dict[str, Any] = {
            outcome: MESSAGES.labels(queue, outcome) for outcome in HANDLER_OUTCOMES[:5]
        }

    def outcome(self, queue: str, outcome: str) -> Any:
        child = self.outcomes.get(outcome)
        if child is None:
            child = self.outcomes[outcome] = MESSAGES.labels(queue, outcome)
        return child


class Metrics(Middleware):
    """Middleware that records workerkit's Prometheus metrics.

    The metrics themselves are module-level (prometheus_client's default registry): install as
    many instances as you like; one per runner or publisher is enough.
    """

    def __init__(self) -> None:
        self._queues: dict[str, _QueueSeries] = {}
        self._published = {outcome: PUBLISHED.labels(outcome) for outcome in PUBLISH_OUTCOMES}

    def _series(self, queue: str) -> _QueueSeries:
        series = self._queues.get(queue)
        if series is None:
            series = self._queues[queue] = _QueueSeries(queue)
        return series

    def on_worker_start(self, worker: Worker) -> None:
        self._series(type(worker).queue)

    def on_reconnected(self, seconds: float) -> None:
        RECONNECTS.inc()

    def before_handle(self, message: Message) -> None:
        series = self._series(_queue(message))
        series.in_flight.inc()
        headers = message.headers
        if "x-death" in headers or message.redelivered or Header.DELIVERIES in headers:
            # A retry, a scheduled message, a redelivery (or, on a classic queue, one
            # re-queued with its delivery count): its wait is not the queue's lag.
            return
        sent = headers.get(PUBLISHED_AT_HEADER)
        if isinstance(sent, int) and not isinstance(sent, bool):
            lag = time.time() - sent / 1000.0
        elif message.timestamp:
            lag = time.time() - message.timestamp
        else:
            return
        series.lag.observe(max(0.0, lag))

    def after_handle(self, message: Message, outcome: str, duration: float) -> None:
        queue = _queue(message)
        series = self._series(queue)
        series.in_flight.dec()
        series.outcome(queue, outcome).inc()
        series.handler.observe(duration)

    def before_publish(self, outgoing: Outgoing) -> None:
        outgoing.headers.setdefault(PUBLISHED_AT_HEADER, int(time.time() * 1000))

    def after_publish(self, outgoing: Outgoing, outcome: str, duration: float) -> None:
        child = self._published.get(outcome)
        (child if child is not None else PUBLISHED.labels(outcome)).inc()
        PUBLISH_SECONDS.observe(duration)


def _queue(message: Message) -> str:
    return message.queue or "unknown"


def multiprocess_mode() -> bool:
    """Whether prometheus_client writes to ``PROMETHEUS_MULTIPROC_DIR`` in this process."""
    return values.ValueClass is not values.MutexValue


def render(multiprocess_dir: str | None = None) -> tuple[bytes, str]:
    """The exposition text of every metric (all processes' in multiprocess mode, or those of
    the processes writing to ``multiprocess_dir``: a ``--processes`` supervisor's children), and
    its content type: what a ``/metrics`` endpoint answers."""
    if multiprocess_dir or multiprocess_mode():
        from prometheus_client import multiprocess

        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry, path=multiprocess_dir)  # type: ignore[no-untyped-call]
        return generate_latest(registry), CONTENT_TYPE_LATEST
    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST
