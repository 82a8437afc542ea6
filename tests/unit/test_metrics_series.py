"""The consume-side metrics kept as plain numbers per thread (workerkit/metrics.py): what a
scrape shows must be what prometheus_client's own objects would show for the same events."""

from __future__ import annotations

import threading
import time
import uuid
from typing import Any

import pytest
from prometheus_client import REGISTRY, CollectorRegistry, Counter, Histogram

from workerkit.message import Message
from workerkit.metrics import _HANDLER_BUCKETS, _LAG_BUCKETS, PUBLISHED_AT_HEADER, Metrics
from workerkit.middleware import Middleware, bound_hooks, run_hooks


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
        "workerkit_handler_seconds", "", ["queue"], buckets=_HANDLER_BUCKETS, registry=reference
    )
    lag = Histogram(
        "workerkit_delivery_lag_seconds", "", ["queue"], buckets=_LAG_BUCKETS, registry=reference
    )
    for outcome in ("acked", "retried", "dead_lettered", "rejected", "invalid"):
        messages.labels(queue, outcome)  # workerkit's series exist from the start
    metrics = Metrics()
    for n, duration in enumerate(durations):
        outcome = outcomes[n % len(outcomes)]
        # A stamped first delivery: its lag is observed (about 2 s here).
        message = Message(b"x", queue=queue, timestamp=int(time.time()) - 2)
        metrics.before_handle(message)
        metrics.after_handle(message, outcome, duration)
        messages.labels(queue, outcome).inc()
        handler.labels(queue).observe(duration)
        lag.labels(queue).observe(2.5)  # the lag is in [2, 3) s: the same buckets
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
    held = Message(b"h", queue=queue)
    metrics.before_handle(held)  # still in flight on this thread

    def work() -> None:
        for _ in range(per_thread):
            message = Message(b"x", queue=queue)
            metrics.before_handle(message)
            metrics.after_handle(message, "acked", 0.0001)

    running = [threading.Thread(target=work) for _ in range(threads)]
    for thread in running:
        thread.start()
    for thread in running:
        thread.join()
    value = REGISTRY.get_sample_value
    total = per_thread * threads
    assert value("workerkit_messages_total", {"queue": queue, "outcome": "acked"}) == total
    assert value("workerkit_handler_seconds_count", {"queue": queue}) == total
    assert value("workerkit_in_flight", {"queue": queue}) == 1
    metrics.after_handle(held, "given_back", 0.5)
    assert value("workerkit_in_flight", {"queue": queue}) == 0
    assert value("workerkit_messages_total", {"queue": queue, "outcome": "given_back"}) == 1


def test_lag_is_not_observed_for_retries_redeliveries_or_unstamped_messages() -> None:
    queue = f"series.{uuid.uuid4().hex[:8]}"
    metrics = Metrics()
    now_ms = int(time.time() * 1000)
    messages = [
        Message(b"x", queue=queue),  # no publish time
        Message(b"x", queue=queue, headers={PUBLISHED_AT_HEADER: now_ms, "x-death": []}),
        Message(b"x", queue=queue, headers={PUBLISHED_AT_HEADER: now_ms}, redelivered=True),
        Message(b"x", queue=queue, headers={PUBLISHED_AT_HEADER: True}, timestamp=None),
        Message(b"x", queue=queue, headers={PUBLISHED_AT_HEADER: now_ms - 30}),  # counted
    ]
    for message in messages:
        metrics.before_handle(message)
        metrics.after_handle(message, "acked", 0.001)
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
