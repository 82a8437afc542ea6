"""Middleware on the in-memory broker: every outcome reaches after_handle exactly once, hooks
that raise change nothing, publish hooks can add headers, and the Prometheus metrics move."""

from __future__ import annotations

import asyncio
import contextvars
import io
import logging
import threading
import time
import uuid
from typing import Any

import orjson
import pytest
from prometheus_client import REGISTRY

from workerkit import (
    ConfigurationError,
    Message,
    Reject,
    RetryPolicy,
    Settings,
    Unroutable,
    Worker,
)
from workerkit.decision import Outcome
from workerkit.errors import ConnectionFailed
from workerkit.log import JsonFormatter, log_context
from workerkit.message import Outgoing
from workerkit.metrics import PUBLISHED_AT_HEADER, Metrics
from workerkit.middleware import Middleware, WorkerStats
from workerkit.publisher import AsyncPublisher
from workerkit.testing import in_memory, running, wait_for
from workerkit.transport.memory import MemoryBroker, MemoryTransport

EXCHANGE = "wkt"


def settings(**overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "exchange": EXCHANGE,
        "shutdown_grace": 3.0,
        "publish_timeout": 3.0,
        "reconnect_max_delay": 0.2,
    }
    values.update(overrides)
    return Settings(**values)


def qname(label: str) -> str:
    return f"unit.mw.{label}.{uuid.uuid4().hex[:8]}"


class Recorder(Middleware):
    def __init__(self, name: str = "rec", log: list[tuple[str, ...]] | None = None) -> None:
        self.name = name
        self.log: list[tuple[str, ...]] = log if log is not None else []
        self.outcomes: dict[bytes, list[str]] = {}
        self.started: list[str] = []
        self.stopped: list[str] = []
        self.reconnected: list[float] = []
        self.published: list[tuple[str, str]] = []

    def on_worker_start(self, worker: Worker) -> None:
        self.started.append(type(worker).queue)

    def on_worker_stop(self, worker: Worker) -> None:
        self.stopped.append(type(worker).queue)

    def on_reconnected(self, seconds: float) -> None:
        self.reconnected.append(seconds)

    def before_handle(self, message: Message) -> None:
        self.log.append((self.name, "before", message.body.decode()))

    def after_handle(self, message: Message, outcome: str, duration: float) -> None:
        assert duration >= 0
        self.log.append((self.name, "after", message.body.decode(), outcome))
        self.outcomes.setdefault(message.body, []).append(outcome)

    def after_publish(self, outgoing: Outgoing, outcome: str, duration: float) -> None:
        self.published.append((outgoing.routing_key, outcome))


class Broken(Middleware):
    """Every hook raises."""

    def _boom(self, *_args: Any, **_kwargs: Any) -> None:
        raise RuntimeError("broken hook")

    on_worker_start = on_worker_stop = on_reconnected = _boom
    before_handle = after_handle = before_publish = after_publish = _boom


def memory_publisher(
    broker: MemoryBroker, settings: Settings, middleware: list[Middleware] | None = None
) -> AsyncPublisher:
    return AsyncPublisher(
        settings=settings, transport=MemoryTransport(broker), middleware=middleware or ()
    )


def make_worker(queue: str, handle: Any, **attrs: Any) -> type[Worker]:
    namespace = {"queue": queue, "handle": handle, **attrs}
    return type("W", (Worker,), namespace)


async def test_every_outcome_reaches_after_handle_exactly_once_in_hook_order() -> None:
    broker = MemoryBroker()
    queue = qname("outcomes")
    log: list[tuple[str, ...]] = []
    outer, inner = Recorder("runner", log), Recorder("worker", log)
    attempts: dict[str, int] = {}

    async def handle(self: Any, body: dict[str, Any]) -> None:
        kind = body["kind"]
        attempts[kind] = attempts.get(kind, 0) + 1
        if kind == "reject":
            raise Reject("no")
        if kind == "fail":
            raise RuntimeError("always")
        if kind == "flaky" and attempts[kind] == 1:
            raise RuntimeError("once")

    cls = make_worker(
        queue, handle, retry=RetryPolicy(max_attempts=2, delay=0.1, jitter=0.0), middleware=(inner,)
    )
    runner, _ = in_memory([cls], broker=broker, settings=settings(), middleware=[outer])
    async with running(runner), memory_publisher(broker, settings()) as pub:
        assert outer.started == inner.started == [queue]
        for kind in ("ok", "reject", "fail", "flaky"):
            await pub.publish(queue, {"kind": kind})
        await pub.publish(queue, b"not json")
        await wait_for(lambda: sum(map(len, outer.outcomes.values())) == 7, 10, "7 outcomes")
        await wait_for(lambda: broker.unacked() == 0, 5)
    assert outer.stopped == inner.stopped == [queue]
    by_kind = {body: outcomes for body, outcomes in outer.outcomes.items()}
    assert by_kind == {
        b'{"kind":"ok"}': ["acked"],
        b'{"kind":"reject"}': ["rejected"],
        b'{"kind":"fail"}': ["retried", "dead_lettered"],
        b'{"kind":"flaky"}': ["retried", "acked"],
        b"not json": ["invalid"],
    }
    assert inner.outcomes == outer.outcomes
    # Runner middleware wraps the worker's: before outer->inner, after inner->outer.
    ok = [entry[:2] for entry in log if entry[2] == '{"kind":"ok"}']
    assert ok == [
        ("runner", "before"),
        ("worker", "before"),
        ("worker", "after"),
        ("runner", "after"),
    ]


async def test_hooks_that_raise_change_nothing_and_are_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    broker = MemoryBroker()
    queue = qname("broken")
    handled: list[bytes] = []

    async def handle(self: Any, body: bytes) -> None:
        handled.append(body)

    cls = make_worker(queue, handle, middleware=(Broken(),))
    runner, _ = in_memory([cls], broker=broker, settings=settings())
    with caplog.at_level(logging.ERROR, logger="workerkit.middleware"):
        async with (
            running(runner),
            memory_publisher(broker, settings(), middleware=[Broken()]) as pub,
        ):
            for i in range(20):
                await pub.publish(queue, str(i).encode())
            await wait_for(lambda: len(handled) == 20, 5)
            await wait_for(lambda: broker.unacked() == 0, 5)
            await asyncio.sleep(0.1)
    assert sorted(handled) == sorted(str(i).encode() for i in range(20))  # once each
    assert broker.messages(queue) == [] and broker.messages(f"{queue}.dlq") == []
    reports = [r for r in caplog.records if "middleware Broken." in r.getMessage()]
    # One report per hook (rate-limited), never one per message.
    hooks = {r.getMessage().split()[1] for r in reports}
    assert {"Broken.before_handle", "Broken.after_handle", "Broken.before_publish"} <= hooks
    assert len(reports) == len(hooks)
    assert all(r.exc_info for r in reports)


def test_worker_middleware_is_checked_at_class_definition() -> None:
    async def handle(self: Any, body: bytes) -> None: ...

    with pytest.raises(ConfigurationError, match="is a class; install an instance"):
        make_worker(qname("cls"), handle, middleware=(Recorder,))
    with pytest.raises(ConfigurationError, match=r"is not a workerkit\.middleware\.Middleware"):
        make_worker(qname("obj"), handle, middleware=(object(),))
    with pytest.raises(ConfigurationError, match="tuple of Middleware"):
        make_worker(qname("one"), handle, middleware=Recorder())
    cls = make_worker(qname("list"), handle, middleware=[Recorder()])
    assert isinstance(cls.middleware, tuple)


async def test_publish_hooks_add_headers_and_see_outcomes() -> None:
    broker = MemoryBroker()
    queue = qname("tenant")
    seen: list[Any] = []

    class Tenant(Middleware):
        def before_publish(self, outgoing: Outgoing) -> None:
            outgoing.headers["tenant"] = "acme"

    async def handle(self: Any, body: bytes, message: Message) -> None:
        seen.append(message.headers.get("tenant"))

    recorder = Recorder()
    runner, _ = in_memory([make_worker(queue, handle)], broker=broker, settings=settings())
    async with (
        running(runner),
        memory_publisher(broker, settings(), middleware=[Tenant(), recorder]) as pub,
    ):
        await pub.publish(queue, b"x")
        with pytest.raises(Unroutable):
            await pub.publish(f"{queue}.nobody", b"y")
        await wait_for(lambda: seen == ["acme"], 5)
    assert recorder.published == [(queue, "confirmed"), (f"{queue}.nobody", "unroutable")]


async def test_a_sync_handler_sees_the_context_its_hooks_set() -> None:
    broker = MemoryBroker()
    queue = qname("ctx")
    tenant: contextvars.ContextVar[str] = contextvars.ContextVar("tenant", default="-")
    seen: list[tuple[str, bool]] = []

    class SetTenant(Middleware):
        def before_handle(self, message: Message) -> None:
            tenant.set(message.body.decode())

    def handle(self: Any, body: bytes) -> None:  # runs in the worker's thread pool
        seen.append((tenant.get(), threading.current_thread() is not threading.main_thread()))

    cls = make_worker(queue, handle, middleware=(SetTenant(),))
    runner, _ = in_memory([cls], broker=broker, settings=settings())
    async with running(runner), memory_publisher(broker, settings()) as pub:
        await pub.publish(queue, b"acme")
        await wait_for(lambda: len(seen) == 1, 5)
    assert seen == [("acme", True)]


async def test_reconnect_hook_and_readiness_follow_the_connection() -> None:
    broker = MemoryBroker()
    queue = qname("ready")
    recorder = Recorder()

    async def handle(self: Any, body: bytes) -> None: ...

    runner, _ = in_memory([make_worker(queue, handle)], broker=broker, settings=settings())
    runner.middleware = (recorder,)  # set before run(): the runtimes read it there
    assert not runner.is_ready()
    async with running(runner):
        assert runner.is_ready()
        broker.connect_error = ConnectionFailed("broker away")
        broker.drop_connections()
        await asyncio.sleep(0)
        assert not runner.is_ready()
        await asyncio.sleep(0.3)
        assert not runner.is_ready() and recorder.reconnected == []
        broker.connect_error = None
        await wait_for(runner.is_ready, 5, "ready again")
        assert len(recorder.reconnected) == 1
        runner.stop()
        assert not runner.is_ready()  # draining


def _value(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


async def test_metrics_count_outcomes_in_flight_lag_and_publishes() -> None:
    broker = MemoryBroker()
    queue = qname("metrics")
    release = asyncio.Event()
    started = asyncio.Event()

    async def handle(self: Any, body: dict[str, Any]) -> None:
        if body.get("hold"):
            started.set()
            await release.wait()
        if body.get("fail"):
            raise RuntimeError("x")

    cls = make_worker(queue, handle, retry=RetryPolicy(max_attempts=2, delay=0.1, jitter=0.0))
    runner, _ = in_memory([cls], broker=broker, settings=settings(), middleware=[Metrics()])
    confirmed = _value("workerkit_published_total", outcome="confirmed")
    unroutable = _value("workerkit_published_total", outcome="unroutable")
    async with running(runner), memory_publisher(broker, settings(), middleware=[Metrics()]) as pub:
        # Series exist from the start, at zero.
        assert (
            REGISTRY.get_sample_value(
                "workerkit_messages_total", {"queue": queue, "outcome": "dead_lettered"}
            )
            == 0.0
        )
        await pub.publish(queue, {"hold": True})
        await asyncio.wait_for(started.wait(), 5)
        assert _value("workerkit_in_flight", queue=queue) == 1
        release.set()
        await pub.publish(queue, {"fail": True})
        await pub.publish(queue, b"\xff")
        with pytest.raises(Unroutable):
            await pub.publish(f"{queue}.nobody", {})
        await wait_for(
            lambda: _value("workerkit_messages_total", queue=queue, outcome="dead_lettered") == 1,
            10,
        )
    assert _value("workerkit_in_flight", queue=queue) == 0
    assert _value("workerkit_messages_total", queue=queue, outcome="acked") == 1
    assert _value("workerkit_messages_total", queue=queue, outcome="retried") == 1
    assert _value("workerkit_messages_total", queue=queue, outcome="invalid") == 1
    assert _value("workerkit_handler_seconds_count", queue=queue) == 4
    # Lag: the three first deliveries, not the retry.
    assert _value("workerkit_delivery_lag_seconds_count", queue=queue) == 3
    assert _value("workerkit_delivery_lag_seconds_sum", queue=queue) < 5
    assert _value("workerkit_published_total", outcome="confirmed") - confirmed == 3
    assert _value("workerkit_published_total", outcome="unroutable") - unroutable == 1
    assert _value("workerkit_publish_seconds_count") >= 4


async def test_metrics_publisher_stamps_a_millisecond_publish_time() -> None:
    broker = MemoryBroker()
    queue = qname("stamp")
    seen: list[Any] = []

    async def handle(self: Any, body: bytes, message: Message) -> None:
        seen.append(message.headers.get(PUBLISHED_AT_HEADER))

    runner, _ = in_memory([make_worker(queue, handle)], broker=broker, settings=settings())
    async with running(runner), memory_publisher(broker, settings(), middleware=[Metrics()]) as pub:
        import time

        before = int(time.time() * 1000)
        await pub.publish(queue, b"x")
        await wait_for(lambda: len(seen) == 1, 5)
    assert isinstance(seen[0], int) and before <= seen[0] <= before + 5000


# -- the docs' examples, as written in docs/observability.md ------------------------------------


class TenantLogs(Middleware):
    """Every workerkit log line about a delivery carries its tenant."""

    def before_handle(self, message: Message) -> None:
        log_context.set({"tenant": message.headers.get("tenant", "-")})

    def after_handle(self, message: Message, outcome: str, duration: float) -> None:
        log_context.set({})


async def test_a_hook_enriches_workerkit_log_lines() -> None:
    broker = MemoryBroker()
    queue = qname("logs")
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("workerkit")
    logger.addHandler(handler)

    async def handle(self: Any, body: bytes) -> None:
        raise Reject("no address")

    cls = make_worker(queue, handle, middleware=(TenantLogs(),))
    runner, _ = in_memory([cls], broker=broker, settings=settings())
    try:
        async with running(runner), memory_publisher(broker, settings()) as pub:
            await pub.publish(queue, b"x", headers={"tenant": "acme"})
            await wait_for(lambda: len(broker.messages(f"{queue}.dlq")) == 1, 5)
    finally:
        logger.removeHandler(handler)
    lines = [orjson.loads(line) for line in stream.getvalue().splitlines()]
    (dead,) = [line for line in lines if line["msg"].startswith("dead-lettered")]
    assert dead["tenant"] == "acme" and dead["queue"] == queue
    assert all("tenant" not in line for line in lines if line is not dead)  # reset after


async def test_worker_stats_are_a_live_view_and_scheduled_messages_have_no_lag() -> None:
    broker = MemoryBroker()
    queue = qname("stats")
    seen: list[WorkerStats] = []

    class Watch(Middleware):
        def on_worker_stats(self, worker: Worker, stats: WorkerStats) -> None:
            seen.append(stats)

    async def handle(self: Any, body: dict[str, Any]) -> None:
        if body.get("fail"):
            raise Reject("no")

    cls = make_worker(queue, handle)
    plain = make_worker(f"{queue}.plain", handle, middleware=(Watch(),))
    mw: list[Middleware] = [Watch(), Metrics()]
    runner, _ = in_memory([cls], broker=broker, settings=settings(), middleware=mw)
    other, _ = in_memory([plain], broker=broker, settings=settings())
    async with running(runner), running(other):
        [stats, unwatched] = seen
    # Timings are kept only where a middleware reads them (Metrics does): they cost.
    assert stats.timings is not None and unwatched.timings is None
    seen.clear()
    runner, _ = in_memory([cls], broker=broker, settings=settings(), middleware=mw)
    async with running(runner), memory_publisher(broker, settings(), middleware=[Metrics()]) as pub:
        [stats] = seen
        assert stats.queue == queue and stats.in_flight == 0
        assert set(stats.outcomes) == set(Outcome) and set(stats.outcomes.values()) == {0}
        await pub.publish(queue, {"n": 1})
        await pub.publish(queue, {"n": 2}, delay=0.2)
        await pub.publish(queue, {"fail": True})
        done = stats.outcomes
        await wait_for(lambda: done[Outcome.ACKED] == 2 and done[Outcome.REJECTED] == 1, 10)
    assert _value("workerkit_messages_total", queue=queue, outcome="acked") == 2
    assert _value("workerkit_messages_total", queue=queue, outcome="rejected") == 1
    assert _value("workerkit_handler_seconds_count", queue=queue) == 3
    # Lag of first deliveries only: the scheduled one came out of the delay queues.
    assert _value("workerkit_delivery_lag_seconds_count", queue=queue) == 2


async def test_delivery_lag_is_publish_time_to_handler_start_on_the_wall_clock() -> None:
    """The runtime takes the lag from its slot's monotonic clock read plus the wall-clock
    offset its watchdog keeps: a message stamped 3 s ago by its publisher lags 3 s."""
    broker = MemoryBroker()
    queue = qname("lag")
    handled = asyncio.Event()

    class ThreeSecondsAgo(Middleware):
        def before_publish(self, outgoing: Outgoing) -> None:
            outgoing.headers[PUBLISHED_AT_HEADER] = int(time.time() * 1000) - 3000

    async def handle(self: Any, body: dict[str, Any]) -> None:
        handled.set()

    cls = make_worker(queue, handle)
    runner, _ = in_memory([cls], broker=broker, settings=settings(), middleware=[Metrics()])
    stamped = [ThreeSecondsAgo(), Metrics()]  # Metrics keeps a publish time already set
    async with running(runner), memory_publisher(broker, settings(), middleware=stamped) as pub:
        await pub.publish(queue, {"n": 1})
        await asyncio.wait_for(handled.wait(), 5)
        await wait_for(lambda: _value("workerkit_delivery_lag_seconds_count", queue=queue) == 1, 5)
    assert 3.0 <= _value("workerkit_delivery_lag_seconds_sum", queue=queue) < 4.0
    assert _value("workerkit_delivery_lag_seconds_bucket", queue=queue, le="1.0") == 0
    assert _value("workerkit_delivery_lag_seconds_bucket", queue=queue, le="5.0") == 1
