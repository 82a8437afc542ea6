"""Prometheus metrics (prometheus_client), built as middleware.

``workerkit run --health-port P`` installs :class:`Metrics` on the runner and serves
``/metrics`` next to ``/health`` and ``/ready``. In your own process::

    from workerkit.metrics import Metrics
    runner = Runner([SendReceipt], middleware=[Metrics()])
    publisher = Publisher(middleware=[Metrics()])

and expose them with any prometheus_client server (``start_http_server(9000)``, or
:func:`render` in your web framework). Every metric lives in prometheus_client's default
registry, so they appear wherever that registry is served.

Cost: the consume-side series (messages, handler seconds, in flight, delivery lag) are kept
per queue and per thread as plain Python numbers and turned into Prometheus samples when
scraped: prometheus_client's own metric objects take a lock for every value they change, seven
per message here, which cost about a quarter of a no-op worker's throughput. Each thread writes
only its own numbers (a runner's hooks all run on its event loop), so nothing needs a lock.

Multi-process (``PROMETHEUS_MULTIPROC_DIR`` set before the first import of prometheus_client):
the series are prometheus_client's objects, whose values live in the files the supervisor
reads; counters and histograms are summed over live and dead processes, ``workerkit_in_flight``
over live ones; :func:`render` then aggregates every process's files. See docs/observability.md
for what a supervisor must do.
"""

from __future__ import annotations

import threading
import time
from bisect import bisect_left
from collections import defaultdict
from collections.abc import Iterable, Sequence
from threading import get_ident
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
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.utils import floatToGoString

from .message import Header
from .middleware import HANDLER_OUTCOMES, PUBLISH_OUTCOMES, Middleware

if TYPE_CHECKING:
    from .message import Message, Outgoing
    from .worker import Worker

__all__ = [
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
# hours (a backlog). Floats: the hooks bisect them with float seconds.
_HANDLER_BUCKETS: tuple[float, ...] = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25)
_HANDLER_BUCKETS += (0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_LAG_BUCKETS: tuple[float, ...] = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0)
_LAG_BUCKETS += (60.0, 300.0, 900.0, 3600.0)
_PUBLISH_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 5, 10)

_MESSAGES_HELP = (
    "Deliveries handled, by queue and outcome (acked, retried, dead_lettered, rejected, invalid;"
    " requeued and given_back when workerkit handed a message back to the broker)."
)
_HANDLER_HELP = (
    "Seconds from taking a delivery to carrying out its outcome (decode, handler, ack or the"
    " confirmed retry/dead-letter copy)."
)
_IN_FLIGHT_HELP = "Deliveries being handled right now."
_LAG_HELP = (
    "Seconds from publish to handler start, first deliveries only (not retries or delayed"
    " messages); millisecond resolution with the workerkit-published-at header, else whole"
    " seconds from the AMQP timestamp."
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


_wall = time.time
_DELIVERIES = Header.DELIVERIES


def _multiprocess() -> bool:
    """Whether prometheus_client writes to ``PROMETHEUS_MULTIPROC_DIR`` in this process."""
    return values.ValueClass is not values.MutexValue


class _LocalSeries:
    """One queue's consume-side numbers, written by one thread only: plain numbers, no lock.
    :meth:`Metrics.before_handle` and :meth:`Metrics.after_handle` change them in place.

    Read by :class:`_ConsumeCollector` from the scraping thread: copies of a dict or a list are
    taken whole under the GIL, so a scrape never sees a half-updated container (a histogram's
    sum may be one observation ahead of its buckets, as with prometheus_client's own).
    """

    __slots__ = ("created", "handler", "handler_sum", "in_flight", "lag", "lag_sum", "outcomes")

    def __init__(self) -> None:
        self.created = time.time()
        self.in_flight = 0
        # The handler outcomes exist from the start (a rate over a series that appears late
        # is wrong for its first scrapes); requeued and given_back appear when they happen.
        self.outcomes: defaultdict[str, int] = defaultdict(int)
        for outcome in HANDLER_OUTCOMES[:5]:
            self.outcomes[outcome] = 0
        self.handler = [0] * (len(_HANDLER_BUCKETS) + 1)  # the last one is +Inf
        self.handler_sum = 0.0
        self.lag = [0] * (len(_LAG_BUCKETS) + 1)
        self.lag_sum = 0.0


class _ConsumeCollector:
    """Every :class:`_LocalSeries` of the process, as the four consume-side metrics."""

    def __init__(self) -> None:
        self._lock = threading.Lock()  # only around adding a series, never per message
        self._series: list[tuple[str, _LocalSeries]] = []

    def add(self, queue: str) -> _LocalSeries:
        series = _LocalSeries()
        with self._lock:
            self._series.append((queue, series))
        return series

    def describe(self) -> list[Any]:
        return self._families()

    def collect(self) -> list[Any]:
        with self._lock:
            every = list(self._series)
        by_queue: dict[str, list[_LocalSeries]] = {}
        for queue, series in every:
            by_queue.setdefault(queue, []).append(series)
        messages, handler, in_flight, lag = families = self._families()
        for queue, group in by_queue.items():
            created = min(series.created for series in group)
            for outcome, count in _summed(series.outcomes.copy() for series in group).items():
                messages.add_metric([queue, outcome], count, created=created)
            handler.add_metric(
                [queue],
                _buckets(_HANDLER_BUCKETS, [list(series.handler) for series in group]),
                sum(series.handler_sum for series in group),
            )
            in_flight.add_metric([queue], sum(series.in_flight for series in group))
            lag.add_metric(
                [queue],
                _buckets(_LAG_BUCKETS, [list(series.lag) for series in group]),
                sum(series.lag_sum for series in group),
            )
        return families

    @staticmethod
    def _families() -> list[Any]:
        return [
            CounterMetricFamily("workerkit_messages", _MESSAGES_HELP, labels=["queue", "outcome"]),
            HistogramMetricFamily("workerkit_handler_seconds", _HANDLER_HELP, labels=["queue"]),
            GaugeMetricFamily("workerkit_in_flight", _IN_FLIGHT_HELP, labels=["queue"]),
            HistogramMetricFamily("workerkit_delivery_lag_seconds", _LAG_HELP, labels=["queue"]),
        ]


def _summed(counts: Iterable[dict[str, int]]) -> dict[str, int]:
    total: dict[str, int] = {}
    for one in counts:
        for key, value in one.items():
            total[key] = total.get(key, 0) + value
    return total


def _buckets(bounds: Sequence[float], counts: list[list[int]]) -> list[tuple[str, float]]:
    """Cumulative ``(le, count)`` pairs, +Inf last, from per-bucket counts of several series."""
    per_bucket = [sum(column) for column in zip(*counts, strict=True)]
    cumulative, running = [], 0
    for bound, count in zip([*bounds, float("inf")], per_bucket, strict=True):
        running += count
        cumulative.append((floatToGoString(bound), float(running)))  # type: ignore[no-untyped-call]
    return cumulative


class _SharedSeries:
    """One queue's series as prometheus_client objects (multi-process mode: the values live in
    files that the supervisor's /metrics reads; each change takes a file lock)."""

    __slots__ = ("handler", "in_flight", "lag", "outcomes", "queue")

    def __init__(self, queue: str) -> None:
        self.queue = queue
        self.in_flight = _IN_FLIGHT.labels(queue)
        self.handler = _HANDLER_SECONDS.labels(queue)
        self.lag = _DELIVERY_LAG.labels(queue)
        self.outcomes: dict[str, Any] = {
            outcome: _MESSAGES.labels(queue, outcome) for outcome in HANDLER_OUTCOMES[:5]
        }

    def started(self, lag: float | None) -> None:
        self.in_flight.inc()
        if lag is not None:
            self.lag.observe(lag)

    def finished(self, outcome: str, duration: float) -> None:
        self.in_flight.dec()
        child = self.outcomes.get(outcome)
        if child is None:
            child = self.outcomes[outcome] = _MESSAGES.labels(self.queue, outcome)
        child.inc()
        self.handler.observe(duration)


if _multiprocess():
    _MESSAGES = Counter("workerkit_messages", _MESSAGES_HELP, ["queue", "outcome"])
    _HANDLER_SECONDS = Histogram(
        "workerkit_handler_seconds", _HANDLER_HELP, ["queue"], buckets=_HANDLER_BUCKETS
    )
    _IN_FLIGHT = Gauge(
        "workerkit_in_flight", _IN_FLIGHT_HELP, ["queue"], multiprocess_mode="livesum"
    )
    _DELIVERY_LAG = Histogram(
        "workerkit_delivery_lag_seconds", _LAG_HELP, ["queue"], buckets=_LAG_BUCKETS
    )
    _COLLECTOR: _ConsumeCollector | None = None
else:
    _COLLECTOR = _ConsumeCollector()
    REGISTRY.register(_COLLECTOR)


def _new_series(queue: str) -> _LocalSeries | _SharedSeries:
    return _SharedSeries(queue) if _COLLECTOR is None else _COLLECTOR.add(queue)


class _PerThread(threading.local):
    """A runner's hooks all run on its event loop's thread: with one set of series per
    thread, each is written by one thread only and needs no lock."""

    def __init__(self) -> None:
        self.series: dict[str, Any] = {}  # queue -> _LocalSeries (_SharedSeries: multiprocess)


class Metrics(Middleware):
    """Middleware that records workerkit's Prometheus metrics.

    The metrics themselves are module-level (prometheus_client's default registry): install as
    many instances as you like; one per runner or publisher is enough.
    """

    def __init__(self) -> None:
        # The series of the first thread that handles a message (a runner's loop) are kept in a
        # plain dict, those of any other thread in a thread-local one (whose every lookup costs
        # more than the thread-id check and dict lookup of the owner's).
        self._owner: int | None = None
        self._mine: dict[str, Any] = {}
        self._local = _PerThread()
        self._published = {outcome: PUBLISHED.labels(outcome) for outcome in PUBLISH_OUTCOMES}
        if _COLLECTOR is None:  # multi-process mode: prometheus_client's objects, in files
            self.before_handle = self._before_shared  # type: ignore[method-assign]
            self.after_handle = self._after_shared  # type: ignore[method-assign]

    def _series(self, queue: str) -> Any:
        """This thread's series of ``queue`` (made on first use)."""
        thread = get_ident()
        if self._owner is None:
            self._owner = thread
        mine = self._mine if thread == self._owner else self._local.series
        series = mine.get(queue)
        if series is None:
            series = mine[queue] = _new_series(queue or "unknown")
        return series

    def on_worker_start(self, worker: Worker) -> None:
        self._series(type(worker).queue)

    def on_reconnected(self, seconds: float) -> None:
        RECONNECTS.inc()

    # The two per-message hooks are the metrics' whole cost on the consume path (about a tenth
    # of a no-op worker's instructions per delivery, docs/performance.md): the plain-number
    # series are changed inline, and the owner thread's series found without a thread-local
    # lookup.

    def before_handle(self, message: Message) -> None:
        series = self._mine.get(message.queue) if get_ident() == self._owner else None
        if series is None:
            series = self._series(message.queue)
        series.in_flight += 1
        if message.headers or message.timestamp:  # else the publish time is not known
            lag = _lag(message)
            if lag is not None:
                series.lag[bisect_left(_LAG_BUCKETS, lag)] += 1  # le=b holds values <= b
                series.lag_sum += lag

    def after_handle(self, message: Message, outcome: str, duration: float) -> None:
        series = self._mine.get(message.queue) if get_ident() == self._owner else None
        if series is None:
            series = self._series(message.queue)
        series.in_flight -= 1
        series.outcomes[outcome] += 1
        series.handler[bisect_left(_HANDLER_BUCKETS, duration)] += 1
        series.handler_sum += duration

    def _before_shared(self, message: Message) -> None:
        self._series(message.queue).started(_lag(message))

    def _after_shared(self, message: Message, outcome: str, duration: float) -> None:
        self._series(message.queue).finished(outcome, duration)

    def before_publish(self, outgoing: Outgoing) -> None:
        outgoing.headers.setdefault(PUBLISHED_AT_HEADER, int(time.time() * 1000))

    def after_publish(self, outgoing: Outgoing, outcome: str, duration: float) -> None:
        child = self._published.get(outcome)
        (child if child is not None else PUBLISHED.labels(outcome)).inc()
        PUBLISH_SECONDS.observe(duration)


def _lag(message: Message) -> float | None:
    """Seconds from publish to now (handler start), None when the wait is not the queue's lag
    or the publish time is unknown. Read before the handler: the runtime restores a retried
    message's route and headers before it runs."""
    headers = message.headers
    if "x-death" in headers or message.redelivered or _DELIVERIES in headers:
        # A retry, a scheduled message, a redelivery (or, on a classic queue, one re-queued
        # with its delivery count).
        return None
    sent = headers.get(PUBLISHED_AT_HEADER)
    if sent.__class__ is int:  # set by a workerkit publisher (not a bool, not a string)
        lag = _wall() - sent / 1000.0
    elif message.timestamp:
        lag = _wall() - message.timestamp
    else:
        return None
    return lag if lag > 0.0 else 0.0  # a host's clock behind the publisher's


def multiprocess_mode() -> bool:
    """Whether prometheus_client writes to ``PROMETHEUS_MULTIPROC_DIR`` in this process."""
    return _multiprocess()


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
