"""The consume-side metrics read from what each runtime keeps (workerkit/stats.py,
workerkit/metrics.py): what a scrape shows must be what prometheus_client's own objects would
show for the same events."""

from __future__ import annotations

import gc
import threading
import time
import uuid
from typing import Any

import pytest
from prometheus_client import REGISTRY, CollectorRegistry, Counter, Histogram

from workerkit.decision import Outcome
from workerkit.message import Message
from workerkit.metrics import PUBLISHED_AT_HEADER, Metrics
from workerkit.middleware import Middleware, bound_hooks, run_hooks
from workerkit.stats import HANDLER_BUCKETS, LAG_BUCKETS, Timings
from workerkit.worker import Worker


class Stats:
    """What a runtime hands to ``on_worker_stats``: its own numbers, changed as it goes."""

    def __init__(self, queue: str) -> None:
        self.queue = queue
        self.in_flight = 0
        self.outcomes = dict.fromkeys(Outcome, 0)
        self.timings = Timings()  # a Metrics middleware reads timings


class _Echo(Worker):
    queue = "series.echo"

    async def handle(self, body: dict[str, Any]) -> None:
        pass


def _watched(metrics: Metrics, queue: str) -> Stats:
    stats = Stats(queue)
    metrics.on_worker_stats(_Echo(), stats)
    return stats


def _handled(stats: Stats, message: Message, outcome: str, seconds: float) -> None:
    """One delivery as the runtime carries it out: counted and timed."""
    stats.outcomes[Outcome(outcome)] += 1
    stats.timings.observe(message, seconds, time.time() - seconds)


def _samples(registry: Any, prefix: str, queue: str) -> dict[tuple[str, str], float]:
    """{(sample name, le or outcome): value} of one queue's series."""
    found = {}
    for family in registry.collect():
        for sample in family.samples:
            if sample.name.startswith(prefix) and sample.labels.get("queue") == queue:
                if sample.name.endswith("_created"):
                    continue
                key = sample.labels.get("le") or sample.labels.get("outcome") or ""
                found[(sample.name, key)] = sample.value
    return found


def test_a_scrape_shows_what_prometheus_clients_objects_would() -> None:
    queue = f"series.{uuid.uuid4().hex[:8]}"
    durations = [0.0, 0.001, 0.0011, 0.005, 0.3, 1.0, 59.0, 60.0, 61.0, 1e6]
    outcomes = ["acked", "acked", "retried", "dead_lettered", "invalid", "requeued"]
    # The reference: prometheus_client's objects, same names, buckets and events.
    reference = CollectorRegistry()
    messages = Counter("workerkit_messages", "", ["queue", "outcome"], registry=reference)
    handler = Histogram(
        "workerkit_handler_seconds", "", ["queue"], buckets=HANDLER_BUCKETS, registry=reference
    )
    lag = Histogram(
        "workerkit_delivery_lag_seconds", "", ["queue"], buckets=LAG_BUCKETS, registry=reference
    )
    for each in Outcome:
        messages.labels(queue, each.value)  # workerkit's series exist from the start
    metrics = Metrics()
    stats = _watched(metrics, queue)
    for n, duration in enumerate(durations):
        outcome = outcomes[n % len(outcomes)]
        # A stamped first delivery, published 2 s before its handler started `duration` ago:
        # its lag is observed (a little over 2 s).
        sent = int((time.time() - duration - 2.0) * 1000)
        message = Message(b"x", queue=queue, headers={PUBLISHED_AT_HEADER: sent})
        _handled(stats, message, outcome, duration)
        messages.labels(queue, outcome).inc()
        handler.labels(queue).observe(duration)
        lag.labels(queue).observe(2.5)  # the lag is in [2, 3) s: the same bucket (1, 5]
    for name in ("workerkit_messages", "workerkit_handler_seconds"):
        assert _samples(REGISTRY, name, queue) == _samples(reference, name, queue), name
    observed = _samples(REGISTRY, "workerkit_delivery_lag_seconds", queue)
    expected = _samples(reference, "workerkit_delivery_lag_seconds", queue)
    assert 2.0 * len(durations) <= observed.pop(("workerkit_delivery_lag_seconds_sum", ""))
    expected.pop(("workerkit_delivery_lag_seconds_sum", ""))
    assert observed == expected


def test_threads_write_their_own_numbers_and_a_scrape_sums_them() -> None:
    queue = f"series.{uuid.uuid4().hex[:8]}"
    metrics = Metrics()  # one instance shared by several runners' threads
    per_thread, threads = 20_000, 4

    def work() -> None:
        stats = _watched(metrics, queue)  # each runner's loop has a runtime of its own
        for _ in range(per_thread):
            _handled(stats, Message(b"x", queue=queue), "acked", 0.0001)

    running = [threading.Thread(target=work) for _ in range(threads)]
    for thread in running:
        thread.start()
    for thread in running:
        thread.join()
    value = REGISTRY.get_sample_value
    total = per_thread * threads
    assert value("workerkit_messages_total", {"queue": queue, "outcome": "acked"}) == total
    assert value("workerkit_handler_seconds_count", {"queue": queue}) == total


def test_outcomes_and_in_flight_are_the_runtimes_counts_read_when_scraped() -> None:
    queue = f"series.{uuid.uuid4().hex[:8]}"
    first, second = Metrics(), Metrics()
    stats = _watched(first, queue)
    second.on_worker_stats(_Echo(), stats)  # a runner's Metrics and a worker's: counted once
    value = REGISTRY.get_sample_value
    assert value("workerkit_in_flight", {"queue": queue}) == 0
    assert value("workerkit_messages_total", {"queue": queue, "outcome": "given_back"}) == 0
    stats.in_flight = 3
    stats.outcomes[Outcome.ACKED] += 5
    assert value("workerkit_in_flight", {"queue": queue}) == 3
    assert value("workerkit_messages_total", {"queue": queue, "outcome": "acked"}) == 5
    # A runner that ended: nothing is in flight, and the counter does not go back.
    del stats
    gc.collect()
    assert value("workerkit_in_flight", {"queue": queue}) == 0
    assert value("workerkit_messages_total", {"queue": queue, "outcome": "acked"}) == 5


def test_lag_is_not_observed_for_retries_redeliveries_or_unstamped_messages() -> None:
    queue = f"series.{uuid.uuid4().hex[:8]}"
    metrics = Metrics()
    stats = _watched(metrics, queue)
    now_ms = int(time.time() * 1000)
    messages = [
        Message(b"x", queue=queue),  # no publish time
        Message(b"x", queue=queue, headers={PUBLISHED_AT_HEADER: now_ms}, redelivered=True),
        Message(b"x", queue=queue, headers={PUBLISHED_AT_HEADER: True}, timestamp=None),
        Message(b"x", queue=queue, headers={PUBLISHED_AT_HEADER: now_ms - 30}),  # counted
    ]
    # A retry or a scheduled message, or a classic queue's recount: the runtime restored its
    # route (and took the broker's x-death away) before the handler ran.
    republished = Message(b"x", queue=queue, headers={PUBLISHED_AT_HEADER: now_ms})
    republished._republished = True
    for message in [*messages, republished]:
        _handled(stats, message, "acked", 0.001)
    value = REGISTRY.get_sample_value
    assert value("workerkit_delivery_lag_seconds_count", {"queue": queue}) == 1
    assert 0.0 <= (value("workerkit_delivery_lag_seconds_sum", {"queue": queue}) or -1) < 5


class _Noisy(Middleware):
    def __init__(self) -> None:
        self.seen: list[str] = []

    def after_handle(self, message: Message, outcome: str, duration: float) -> None:
        self.seen.append(outcome)


def test_bound_hooks_leave_out_the_base_classs_no_ops() -> None:
    quiet, noisy = Middleware(), _Noisy()
    assert bound_hooks([quiet, noisy], "before_handle") == ()
    [after] = bound_hooks([quiet, noisy], "after_handle")
    run_hooks((after,), "after_handle", Message(b"x"), "acked", 0.1)
    assert noisy.seen == ["acked"]
    # A hook set on the instance counts too.
    quiet.before_handle = lambda message: None  # type: ignore[method-assign]
    assert len(bound_hooks([quiet], "before_handle")) == 1


def test_a_raising_bound_hook_is_reported_under_its_hook_name(
    caplog: pytest.LogCaptureFixture,
) -> None:
    class Broken(Middleware):
        def _boom(self, *args: Any, **kwargs: Any) -> None:
            raise RuntimeError("boom")

        before_handle = _boom

    hooks = bound_hooks([Broken()], "before_handle")
    run_hooks(hooks, "before_handle", Message(b"x"))  # logged, not raised
    assert "Broken.before_handle raised" in caplog.text
