"""Prometheus metrics (prometheus_client), built as middleware.

``workerkit run --health-port P`` installs :class:`Metrics` on the runner and serves
``/metrics`` next to ``/health`` and ``/ready``. In your own process::

    from workerkit.metrics import Metrics
    runner = Runner([SendReceipt], middleware=[Metrics()])
    publisher = Publisher(middleware=[Metrics()])

and expose them with any prometheus_client server (``start_http_server(9000)``, or
:func:`render` in your web framework). Every metric lives in prometheus_client's default
registry, so they appear wherever that registry is served.

Cost: in one process nothing here runs per delivery. Messages by outcome and deliveries in
flight are the runtime's own counts, and the two histograms (handler seconds, delivery lag)
numbers it keeps because this middleware has ``reads_timings``; all are read when scraped
(``Middleware.on_worker_stats``, :mod:`workerkit.stats`). prometheus_client's own objects take
a lock for every value they change (seven per message cost about a quarter of a no-op worker's
throughput), and the same counting in this middleware's own per-delivery hooks cost twice what
it costs inline in the runtime.

Multi-process (``PROMETHEUS_MULTIPROC_DIR`` set before the first import of prometheus_client):
the series are prometheus_client's objects, whose values live in the files the supervisor
reads; counters and histograms are summed over live and dead processes, ``workerkit_in_flight``
over live ones; :func:`render` then aggregates every process's files. See docs/observability.md
for what a supervisor must do.
"""

from __future__ import annotations

import threading
import time
import weakref
from collections.abc import Sequence
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

from .middleware import HANDLER_OUTCOMES, PUBLISH_OUTCOMES, Middleware
from .stats import HANDLER_BUCKETS, LAG_BUCKETS, PUBLISHED_AT_HEADER, WorkerStats, lag_of
from .stats import Histogram as Counts

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

_PUBLISH_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 5, 10)

_MESSAGES_HELP = (
    "Deliveries handled, by queue and outcome (acked, retried, dead_lettered, rejected, invalid;"
    " requeued and given_back when workerkit handed a message back to the broker)."
)
_HANDLER_HELP = (
    "Seconds from taking a delivery to carrying out its outcome (decode, handler, ack or the"
    " confirmed retry/dead-letter copy)."
)
_IN_FLIGHT_HELP = (
    "Deliveries taken and not yet carried out (a failed one until its copy is confirmed)."
)
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


def _multiprocess() -> bool:
    """Whether prometheus_client writes to ``PROMETHEUS_MULTIPROC_DIR`` in this process."""
    return values.ValueClass is not values.MutexValue


class _Counted:
    """One running worker's own numbers (a :class:`WorkerStats`), read when scraped.

    The outcome counts and the timings are kept by reference for good, so that a counter never
    goes back when a runner ends; the in-flight count only while its runtime lives.
    """

    __slots__ = ("created", "handler", "lag", "outcomes", "queue", "stats")

    def __init__(self, stats: WorkerStats) -> None:
        self.created = time.time()
        self.queue = stats.queue or "unknown"
        self.outcomes = stats.outcomes
        timings = stats.timings
        self.handler = timings.handler if timings is not None else Counts(HANDLER_BUCKETS)
        self.lag = timings.lag if timings is not None else Counts(LAG_BUCKETS)
        self.stats = weakref.ref(stats)

    def in_flight(self) -> int:
        stats = self.stats()
        return stats.in_flight if stats is not None else 0


class _ConsumeCollector:
    """The consume-side metrics of the process, from the numbers every watched runtime keeps:
    outcome counts, deliveries in flight, handler times and delivery lags (stats.py)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()  # only around adding, never per message
        # id(outcomes) -> _Counted: a worker watched by two Metrics instances counts once.
        self._counted: dict[int, _Counted] = {}

    def watch(self, stats: WorkerStats) -> None:
        counted = _Counted(stats)
        with self._lock:
            self._counted.setdefault(id(counted.outcomes), counted)

    def describe(self) -> list[Any]:
        return self._families()

    def collect(self) -> list[Any]:
        with self._lock:
            counted = list(self._counted.values())
        by_queue: dict[str, list[_Counted]] = {}
        for one in counted:
            by_queue.setdefault(one.queue, []).append(one)
        messages, handler, in_flight, lag = families = self._families()
        for queue, group in by_queue.items():
            created = min(one.created for one in group)
            for outcome, count in _outcomes(group).items():
                messages.add_metric([queue, outcome], count, created=created)
            in_flight.add_metric([queue], sum(one.in_flight() for one in group))
            handler.add_metric([queue], *_histogram(HANDLER_BUCKETS, [o.handler for o in group]))
            lag.add_metric([queue], *_histogram(LAG_BUCKETS, [one.lag for one in group]))
        return families

    @staticmethod
    def _families() -> list[Any]:
        return [
            CounterMetricFamily("workerkit_messages", _MESSAGES_HELP, labels=["queue", "outcome"]),
            HistogramMetricFamily("workerkit_handler_seconds", _HANDLER_HELP, labels=["queue"]),
            GaugeMetricFamily("workerkit_in_flight", _IN_FLIGHT_HELP, labels=["queue"]),
            HistogramMetricFamily("workerkit_delivery_lag_seconds", _LAG_HELP, labels=["queue"]),
        ]


def _outcomes(group: list[_Counted]) -> dict[str, int]:
    total: dict[str, int] = {}
    for one in group:
        for outcome, count in dict(one.outcomes).items():  # a copy: taken whole under the GIL
            total[outcome.value] = total.get(outcome.value, 0) + count
    return total


def _histogram(bounds: Sequence[float], group: list[Counts]) -> tuple[list[Any], float]:
    """Cumulative ``(le, count)`` pairs, +Inf last, and the sum, of several histograms."""
    sums = sum(one.sum for one in group)  # may be one observation ahead of the buckets
    return _buckets(bounds, [list(one.counts) for one in group]), sums


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
            outcome: _MESSAGES.labels(queue, outcome) for outcome in HANDLER_OUTCOMES
        }

    def started(self) -> None:
        self.in_flight.inc()

    def finished(self, message: Message, duration: float) -> None:
        self.in_flight.dec()
        lag = lag_of(message, time.time() - duration)
        if lag is not None:
            self.lag.observe(lag)
        self.handler.observe(duration)


#: How often (seconds) a process in multi-process mode copies its outcome counts to its files.
SYNC_EVERY = 0.5


class _OutcomeSync:
    """Multi-process mode: copies every watched runtime's outcome counts into the file-backed
    counters, every :data:`SYNC_EVERY` seconds (a thread) and when a worker stops.

    Not counted in ``after_handle``: a delivery given back before any handler took it (it
    waited too long for a slot) has no hook call, and the runtime's counts have every outcome.
    One writer per process, so nothing is counted twice."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        # id(outcomes) -> (the live counts, queue, what the files hold already)
        self._watched: dict[int, tuple[Any, str, dict[str, int]]] = {}
        self._thread: threading.Thread | None = None

    def watch(self, stats: WorkerStats) -> None:
        with self._lock:
            key = id(stats.outcomes)
            self._watched.setdefault(key, (stats.outcomes, stats.queue or "unknown", {}))
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="workerkit-metrics-sync", daemon=True
                )
                self._thread.start()

    def sync(self) -> None:
        with self._lock:
            for outcomes, queue, written in self._watched.values():
                for outcome, count in dict(outcomes).items():  # a copy, taken whole (GIL)
                    delta = count - written.get(outcome.value, 0)
                    if delta > 0:
                        _MESSAGES.labels(queue, outcome.value).inc(delta)
                        written[outcome.value] = count

    def _run(self) -> None:
        while True:
            time.sleep(SYNC_EVERY)
            self.sync()


_SYNC = _OutcomeSync()


if _multiprocess():
    _MESSAGES = Counter("workerkit_messages", _MESSAGES_HELP, ["queue", "outcome"])
    _HANDLER_SECONDS = Histogram(
        "workerkit_handler_seconds", _HANDLER_HELP, ["queue"], buckets=HANDLER_BUCKETS
    )
    _IN_FLIGHT = Gauge(
        "workerkit_in_flight", _IN_FLIGHT_HELP, ["queue"], multiprocess_mode="livesum"
    )
    _DELIVERY_LAG = Histogram(
        "workerkit_delivery_lag_seconds", _LAG_HELP, ["queue"], buckets=LAG_BUCKETS
    )
    _COLLECTOR: _ConsumeCollector | None = None
else:
    _COLLECTOR = _ConsumeCollector()
    REGISTRY.register(_COLLECTOR)


class Metrics(Middleware):
    """Middleware that records workerkit's Prometheus metrics.

    The metrics themselves are module-level (prometheus_client's default registry): install as
    many instances as you like; one per runner or publisher is enough.
    """

    #: The runtime keeps handler times and delivery lags for the metrics (stats.py): counted
    #: inline there, they cost half of what the same counting cost in a hook.
    reads_timings = True

    def __init__(self) -> None:
        self._published = {outcome: PUBLISHED.labels(outcome) for outcome in PUBLISH_OUTCOMES}
        self._shared: dict[str, _SharedSeries] = {}
        if _COLLECTOR is None:  # multi-process mode: prometheus_client's objects, in files
            self.reads_timings = False
            self.before_handle = self._before_shared  # type: ignore[method-assign]
            self.after_handle = self._after_shared  # type: ignore[method-assign]

    def on_worker_stats(self, worker: Worker, stats: WorkerStats) -> None:
        if _COLLECTOR is not None:
            _COLLECTOR.watch(stats)
        else:
            self._series(stats.queue)  # the series exist from the start, at 0
            _SYNC.watch(stats)

    def on_worker_stop(self, worker: Worker) -> None:
        if _COLLECTOR is None:
            _SYNC.sync()  # the last outcomes into the files before the process exits

    def on_reconnected(self, seconds: float) -> None:
        RECONNECTS.inc()

    # In one process the metrics cost the consume path only what the runtime's timings cost
    # (stats.py): messages and in-flight deliveries are its counts anyway, and nothing here
    # runs per delivery. Multi-process mode changes prometheus_client's file-backed objects
    # per delivery instead, because the supervisor's scrape reads only their files.

    def _series(self, queue: str) -> _SharedSeries:
        series = self._shared.get(queue)
        if series is None:
            series = self._shared.setdefault(queue, _SharedSeries(queue or "unknown"))
        return series

    def _before_shared(self, message: Message) -> None:
        self._series(message.queue).started()

    def _after_shared(self, message: Message, outcome: str, duration: float) -> None:
        self._series(message.queue).finished(message, duration)  # outcomes: _OutcomeSync

    def before_publish(self, outgoing: Outgoing) -> None:
        outgoing.headers.setdefault(PUBLISHED_AT_HEADER, int(time.time() * 1000))

    def after_publish(self, outgoing: Outgoing, outcome: str, duration: float) -> None:
        child = self._published.get(outcome)
        (child if child is not None else PUBLISHED.labels(outcome)).inc()
        PUBLISH_SECONDS.observe(duration)


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
