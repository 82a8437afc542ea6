"""What a running worker counts about itself, for whoever reads it when asked (a metrics
scrape, a status page): outcomes and deliveries in flight always, and, when a middleware asks
for them (``reads_timings = True``), histograms of handler time and delivery lag.

Kept by the runtime, on its event loop, as plain numbers: the same counting done in the
metrics middleware's per-delivery hooks cost the consume path about twice as much (callgrind,
benchmarks/METRICS.md), and nobody pays for a read. Readers in other threads copy a list whole
under the GIL.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Mapping
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from .decision import Outcome
    from .message import Message

__all__ = [
    "FIRST_HANDLER_BUCKET",
    "HANDLER_BUCKETS",
    "LAG_BUCKETS",
    "PUBLISHED_AT_HEADER",
    "Histogram",
    "Timings",
    "WorkerStats",
    "lag_of",
]

#: Publish time in milliseconds since the epoch, set by publishers that have the metrics
#: middleware installed. The AMQP ``timestamp`` property is whole seconds; this header gives the
#: delivery lag millisecond resolution (clock skew between hosts aside).
PUBLISHED_AT_HEADER = "workerkit-published-at"

#: Upper bounds (seconds) of the handler-time buckets: handlers run from a millisecond to
#: minutes. Floats: bisected with float seconds.
HANDLER_BUCKETS: tuple[float, ...] = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25)
HANDLER_BUCKETS += (0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
FIRST_HANDLER_BUCKET = HANDLER_BUCKETS[0]
#: Upper bounds (seconds) of the delivery-lag buckets: from milliseconds (a worker keeping up)
#: to hours (a backlog).
LAG_BUCKETS: tuple[float, ...] = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0)
LAG_BUCKETS += (60.0, 300.0, 900.0, 3600.0)


class Histogram:
    """Observations counted per bucket: ``counts[i]`` holds values <= ``bounds[i]`` (and above
    the bound before), the last one those above every bound (+Inf); ``sum`` of all of them."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0


class Timings:
    """A worker's handler times and delivery lags, both in seconds."""

    __slots__ = ("handler", "lag")

    def __init__(self) -> None:
        self.handler = Histogram(HANDLER_BUCKETS)
        self.lag = Histogram(LAG_BUCKETS)

    def observe(self, message: Message, duration: float, started: float) -> float | None:
        """A delivery carried out ``duration`` seconds after a slot took it at ``started``
        (seconds since the epoch); returns its lag (:func:`lag_of`).

        The runtime counts the same way, inline, once per delivery
        (runtime.WorkerRuntime._finished).
        """
        handler = self.handler
        # Sub-millisecond handlers, the only ones whose time the counting shows in, find their
        # bucket with one float comparison instead of a bisection (29 of 53 ns, timeit).
        i = 0 if duration <= FIRST_HANDLER_BUCKET else bisect_left(HANDLER_BUCKETS, duration)
        handler.counts[i] += 1
        handler.sum += duration
        lag = lag_of(message, started)
        if lag is not None:
            self.lag.counts[bisect_left(LAG_BUCKETS, lag)] += 1
            self.lag.sum += lag
        return lag


def lag_of(message: Message, started: float) -> float | None:
    """Seconds from a message's publish to ``started`` (seconds since the epoch, when a handler
    slot took it), at least 0; None when the wait was not the queue's or the publish time is
    unknown."""
    if message._republished or message.redelivered:
        # A retry or a scheduled message (out of the delay layout), one re-queued with its
        # delivery count (a classic queue), a redelivery: the wait was not the queue's.
        return None
    headers = message.headers
    sent = headers.get(PUBLISHED_AT_HEADER) if headers else None
    if isinstance(sent, int) and type(sent) is not bool:  # set by a workerkit publisher
        # (an int subclass off the wire: pika decodes 64-bit integers as its own ``long``)
        lag = started - sent / 1000.0
    elif message.timestamp:
        lag = started - message.timestamp
    else:
        return None
    return lag if lag > 0.0 else 0.0  # 0: a host's clock behind the publisher's


class WorkerStats(Protocol):
    """What a running worker's runtime counts anyway, as a live read-only view
    (``Middleware.on_worker_stats``).

    Read it when asked (a metrics scrape, a status page) instead of counting the same things in
    the per-message hooks: every delivery pays for a hook, nobody pays for a read.
    """

    @property
    def queue(self) -> str:
        """The worker's queue."""

    @property
    def in_flight(self) -> int:
        """Deliveries taken by a handler slot and not yet carried out."""

    @property
    def outcomes(self) -> Mapping[Outcome, int]:
        """Deliveries carried out since start, by outcome (every :class:`Outcome`, from 0)."""

    @property
    def timings(self) -> Timings | None:
        """Handler times and delivery lags, kept when a middleware of the worker has
        ``reads_timings = True``; else None."""
