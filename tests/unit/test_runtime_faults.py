"""Hardening of the per-message path and the runner lifecycle on the in-memory broker: slots that
never die, a publish path that is reopened, routes kept on redelivery, stuck handler threads,
deliveries given back before the broker's consumer_timeout, a second SIGTERM."""

from __future__ import annotations

import asyncio
import signal
import threading
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest

from workerkit import RetryPolicy, Settings, Worker
from workerkit.errors import ConnectionFailed, TopologyError
from workerkit.message import Header, Message
from workerkit.publisher import AsyncPublisher
from workerkit.signals import ECHO_WINDOW
from workerkit.testing import in_memory, memory_publisher, running, wait_for
from workerkit.transport.memory import MemoryBroker, MemoryChannel, MemoryConnection

EXCHANGE = "wkf"


def settings(**overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "exchange": EXCHANGE,
        "shutdown_grace": 3.0,
        "publish_timeout": 2.0,
        "reconnect_max_delay": 0.2,
    }
    values.update(overrides)
    return Settings(**values)


def qname(label: str) -> str:
    return f"unit.{label}.{uuid.uuid4().hex[:8]}"


def worker(queue: str, handle: Any, **attrs: Any) -> type[Worker]:
    return type("W" + uuid.uuid4().hex[:6], (Worker,), {"queue": queue, "handle": handle, **attrs})


FAST = RetryPolicy(max_attempts=5, delay=0.05, jitter=0.0)


@pytest.fixture
def broker() -> MemoryBroker:
    return MemoryBroker()


@pytest.fixture
async def publisher(broker: MemoryBroker) -> AsyncIterator[AsyncPublisher]:
    async with memory_publisher(broker, settings()) as pub:
        yield pub


def publish_connection(broker: MemoryBroker) -> MemoryConnection:
    (conn,) = [c for c in broker.connections if c.name == "workerkit-publish"]
    return conn


# -- issue 9 item 1: a handler's own CancelledError ------


async def test_a_handler_that_lets_cancelled_error_escape_is_retried_and_slots_survive(
    broker: MemoryBroker, publisher: AsyncPublisher
) -> None:
    queue = qname("cancelled")
    handled: list[int] = []

    async def handle(self: Any, body: dict[str, Any], message: Message) -> None:
        if message.attempt == 1 and body["n"] < 2:
            inner = asyncio.create_task(asyncio.sleep(10))
            inner.cancel()
            await inner  # raises CancelledError out of the handler
        handled.append(body["n"])

    cls = worker(queue, handle, retry=FAST, concurrency=2)
    runner, _ = in_memory([cls], broker=broker, settings=settings())
    async with running(runner):
        for n in range(6):
            await publisher.publish(queue, {"n": n})
        await wait_for(lambda: sorted(handled) == list(range(6)), 5, "all six, two retried")
        assert runner.healthy
        assert all(not slot.task.done() for slot in runner.runtimes[0].slots)
    assert broker.messages(f"{queue}.dlq") == []


async def test_base_exception_from_a_handler_is_a_failure(
    broker: MemoryBroker, publisher: AsyncPublisher
) -> None:
    queue = qname("baseexc")
    attempts: list[int] = []

    class Weird(BaseException):
        pass

    async def handle(self: Any, body: bytes, message: Message) -> None:
        attempts.append(message.attempt)
        if message.attempt == 1:
            raise Weird("not an Exception")

    runner, _ = in_memory([worker(queue, handle, retry=FAST)], broker=broker, settings=settings())
    async with running(runner):
        await publisher.publish(queue, b"x")
        await wait_for(lambda: attempts == [1, 2], 5, "a retry after the BaseException")
        assert runner.healthy


async def test_a_dead_slot_turns_the_worker_unhealthy_and_is_restarted(
    broker: MemoryBroker, publisher: AsyncPublisher
) -> None:
    queue = qname("deadslot")
    handled: list[bytes] = []
    seen_unhealthy = False

    async def handle(self: Any, body: bytes) -> None:
        handled.append(body)

    runner, _ = in_memory(
        [worker(queue, handle, concurrency=1)], broker=broker, settings=settings()
    )
    async with running(runner):
        rt = runner.runtimes[0]
        old = rt.slots[0].task
        old.cancel()  # something other than the runner killed the slot

        def watch() -> bool:
            nonlocal seen_unhealthy
            seen_unhealthy = seen_unhealthy or not runner.healthy
            return rt.slots[0].task is not old and not rt.slots[0].task.done()

        await wait_for(watch, 5, "the slot restarted")
        await publisher.publish(queue, b"after")
        await wait_for(lambda: handled == [b"after"], 5, "handled by the new slot")
        assert runner.healthy
    assert seen_unhealthy or rt.slot_restarts == 1


# -- issue 9 item 2: the publish path ------


async def test_publish_channel_reopened_after_a_channel_error(
    broker: MemoryBroker, publisher: AsyncPublisher
) -> None:
    queue = qname("pubchan")
    attempts: list[int] = []

    async def handle(self: Any, body: bytes, message: Message) -> None:
        attempts.append(message.attempt)
        if message.attempt == 1:
            raise RuntimeError("fail once")

    runner, _ = in_memory([worker(queue, handle, retry=FAST)], broker=broker, settings=settings())
    async with running(runner):
        # The broker closes the publish channel (a 404 or 403 on a publish does this).
        for channel in list(publish_connection(broker).channels):
            channel._fail(TopologyError("NOT_FOUND - no exchange 'wkf.delay.09'"))
        await publisher.publish(queue, b"x")
        await wait_for(lambda: attempts == [1, 2], 5, "the retry copy published and handled")
        await wait_for(lambda: runner.healthy, 5, "healthy again")


async def test_publish_connection_lost_while_recovering_is_recovered(
    broker: MemoryBroker, publisher: AsyncPublisher
) -> None:
    queue = qname("pubrecover")
    attempts: list[int] = []

    async def handle(self: Any, body: bytes, message: Message) -> None:
        attempts.append(message.attempt)
        if message.attempt == 1:
            raise RuntimeError("fail once")

    runner, _ = in_memory([worker(queue, handle, retry=FAST)], broker=broker, settings=settings())
    async with running(runner):
        declare = runner.topology.declare_queues
        dropped = False

        async def drop_publish_then_declare(channel: Any, workers: Any) -> None:
            nonlocal dropped
            if not dropped:  # the publish connection drops while consumers are re-attached
                dropped = True
                publish_connection(broker)._lose(ConnectionFailed("reset during recovery"))
            await declare(channel, workers)

        runner.topology.declare_queues = drop_publish_then_declare  # type: ignore[method-assign]
        broker.drop_connections()
        await wait_for(lambda: dropped, 5, "the drop during recovery")
        await wait_for(lambda: runner.healthy, 5, "recovered")
        await publisher.publish(queue, b"x")
        await wait_for(lambda: attempts == [1, 2], 5, "the retry copy published and handled")


# -- issue 9 item 6: classic redelivery keeps the route ------


async def test_classic_redelivery_keeps_the_original_route(
    broker: MemoryBroker, publisher: AsyncPublisher
) -> None:
    queue = qname("route")
    seen: list[tuple[str, str, bool]] = []
    block = asyncio.Event()

    async def handle(self: Any, body: bytes, message: Message) -> None:
        seen.append((message.exchange, message.routing_key, message.redelivered))
        if len(seen) == 1:
            await block.wait()

    cls = worker(queue, handle, queue_type="classic", bindings=["audit.*"])
    runner, _ = in_memory([cls], broker=broker, settings=settings())
    async with running(runner):
        await publisher.publish("audit.created", b"x")
        await wait_for(lambda: len(seen) == 1, 5, "first delivery")
        broker.drop_connections()  # the delivery comes back redelivered
        await wait_for(lambda: len(seen) == 2, 5, "the redelivery")
        block.set()
    assert seen[1][:2] == (EXCHANGE, "audit.created"), seen


# -- issue 9 item 10: stuck handler threads ------


async def test_stuck_threads_do_not_dead_letter_unstarted_messages(
    broker: MemoryBroker, publisher: AsyncPublisher
) -> None:
    queue = qname("stuck")
    release = threading.Event()
    handled: list[int] = []

    def handle(self: Any, body: dict[str, Any]) -> None:
        if body["n"] < 2:
            release.wait(20)  # ignores the time limit; its thread stays busy
            return
        handled.append(body["n"])

    cls = worker(queue, handle, concurrency=2, handler_timeout=0.2, retry=FAST)
    runner, _ = in_memory([cls], broker=broker, settings=settings())
    try:
        async with running(runner):
            for n in range(5):
                await publisher.publish(queue, {"n": n})
            await wait_for(lambda: not runner.healthy, 5, "unhealthy: every thread stuck")
            await asyncio.sleep(0.5)  # well past the handler timeout of the waiting messages
            dead = broker.messages(f"{queue}.dlq")
            assert all(
                m.headers[Header.ERROR_TYPE] != "workerkit.errors.HandlerTimeout"
                or m.body.startswith(b'{"n":0')
                or m.body.startswith(b'{"n":1')
                for m in dead
            ), [m.body for m in dead]
            assert handled == []
            release.set()
            await wait_for(lambda: sorted(handled) == [2, 3, 4], 10, "the waiting ones ran")
            await wait_for(lambda: runner.healthy, 5, "healthy once the threads are back")
    finally:
        release.set()


# -- issue 9 item 5: deliveries that waited too long locally ------


async def test_deliveries_are_given_back_before_the_consumer_timeout(
    broker: MemoryBroker, publisher: AsyncPublisher, monkeypatch: pytest.MonkeyPatch
) -> None:
    queue = qname("lease")
    consumer_timeout = 2.0
    taken: dict[tuple[int, int], float] = {}
    held: list[float] = []
    take, settle = MemoryChannel.take, MemoryChannel._settle

    def timed_take(self: MemoryChannel, q: Any, env: Any) -> int:
        tag = take(self, q, env)
        taken[(id(self), tag)] = time.monotonic()
        return tag

    def timed_settle(self: MemoryChannel, tag: int, multiple: bool) -> Any:
        now = time.monotonic()
        tags = [t for (c, t) in taken if c == id(self) and (t <= tag if multiple else t == tag)]
        for t in tags:
            held.append(now - taken.pop((id(self), t)))
        return settle(self, tag, multiple)

    monkeypatch.setattr(MemoryChannel, "take", timed_take)
    monkeypatch.setattr(MemoryChannel, "_settle", timed_settle)
    handled: list[int] = []

    async def handle(self: Any, body: dict[str, Any]) -> None:
        await asyncio.sleep(0.3)
        handled.append(body["n"])

    cls = worker(queue, handle, concurrency=1, prefetch=20, handler_timeout=1.0)
    s = settings(broker_consumer_timeout=consumer_timeout)
    runner, _ = in_memory([cls], broker=broker, settings=s)
    async with running(runner):
        for n in range(12):
            await publisher.publish(queue, {"n": n})
        await wait_for(lambda: sorted(set(handled)) == list(range(12)), 20, "all handled")
        assert runner.runtimes[0].given_back > 0
    assert max(held) < consumer_timeout, max(held)


async def test_a_backlog_taken_at_start_is_not_given_back_as_waited_too_long(
    broker: MemoryBroker, publisher: AsyncPublisher
) -> None:
    """Deliveries that arrive while the worker starts (a backlog) are stamped with the time
    they arrived: before the watchdog's first tick that read 0, so at that tick every one still
    waiting looked as old as the machine's uptime and was given back ("waited over 14s")."""
    queue = qname("backlog")
    handled: list[int] = []

    async def handle(self: Any, body: dict[str, Any]) -> None:
        await asyncio.sleep(0.6)
        handled.append(body["n"])

    async def setup(self: Any) -> None:
        await asyncio.sleep(0.2)  # consuming already: the backlog arrives meanwhile

    cls = worker(queue, handle, concurrency=1, prefetch=5, handler_timeout=5.0, setup=setup)
    s = settings(broker_consumer_timeout=20.0)  # may wait locally for 14 s
    assert time.monotonic() > 20.0, "the clock starts at boot; this machine is older than 20 s"
    async with running(in_memory([cls], broker=broker, settings=s)[0]):
        pass  # the queue is declared
    for n in range(5):
        await publisher.publish(queue, {"n": n})
    runner, _ = in_memory([cls], broker=broker, settings=s)
    async with running(runner):
        await wait_for(lambda: len(handled) >= 3, 20, "3 handled, the watchdog ticking between")
        assert runner.runtimes[0].given_back == 0
    assert handled == [0, 1, 2, 3, 4][: len(handled)]


@pytest.mark.parametrize("kind", ["async", "sync"])
async def test_a_handler_past_its_time_limit_while_draining_is_timed_out(
    broker: MemoryBroker, publisher: AsyncPublisher, kind: str
) -> None:
    """The time limit holds during a drain too: the handler's outcome must not depend on
    whether a deploy happened, and a stuck handler must not hold shutdown for the whole grace
    period (found by a new-user check: the watchdog stopped with the consumer)."""
    queue = qname(f"drain-timeout-{kind}")
    started = threading.Event()

    async def handle_async(self: Any, body: bytes) -> None:
        started.set()
        await asyncio.sleep(30)

    def handle_sync(self: Any, body: bytes) -> None:
        started.set()
        time.sleep(2)  # a thread cannot be cancelled; past its 0.3 s limit all the same

    handle = handle_async if kind == "async" else handle_sync
    cls = worker(queue, handle, handler_timeout=0.3, retry=RetryPolicy.none())
    runner, _ = in_memory([cls], broker=broker, settings=settings(shutdown_grace=20.0))
    task = asyncio.create_task(runner.run())
    await runner.wait_ready(5)
    await publisher.publish(queue, b"x")
    await wait_for(started.is_set, 5, "the handler to start")
    runner.stop()  # a deploy's SIGTERM, within the handler's 0.3 s
    await asyncio.wait_for(task, 10)  # well inside the 20 s grace period
    (dead,) = broker.messages(f"{queue}.dlq")
    assert dead.headers[Header.ERROR_TYPE] == "workerkit.errors.HandlerTimeout"
    assert broker.messages(queue) == []


# -- issue 9 item 13 ------


async def test_second_sigterm_skips_the_grace_period(
    broker: MemoryBroker, publisher: AsyncPublisher
) -> None:
    queue = qname("sigterm")
    started = asyncio.Event()

    async def handle(self: Any, body: bytes) -> None:
        started.set()
        await asyncio.sleep(30)

    s = settings(shutdown_grace=20.0)
    runner, _ = in_memory([worker(queue, handle)], broker=broker, settings=s, handle_signals=True)
    task = asyncio.create_task(runner.run())
    await runner.wait_ready(5)
    await publisher.publish(queue, b"x")
    await asyncio.wait_for(started.wait(), 5)
    signal.raise_signal(signal.SIGTERM)
    signal.raise_signal(signal.SIGTERM)  # the same request twice at once (GNU timeout does)
    await asyncio.sleep(ECHO_WINDOW + 0.05)  # a second request is one that comes later
    assert not task.done()  # the first SIGTERM drains
    t0 = time.monotonic()
    signal.raise_signal(signal.SIGTERM)
    await asyncio.wait_for(task, 5)
    assert time.monotonic() - t0 < 5
    await wait_for(lambda: len(broker.messages(queue)) == 1, 5, "the message back in its queue")


async def test_no_spurious_reconnect_after_a_start_up_that_needed_a_retry(
    broker: MemoryBroker,
) -> None:
    queue = qname("spurious")

    async def handle(self: Any, body: bytes) -> None:
        return None

    runner, _ = in_memory([worker(queue, handle)], broker=broker, settings=settings())
    connect = runner.transport.connect
    calls = 0

    async def first_connection_dies(*args: Any, **kwargs: Any) -> Any:
        nonlocal calls
        calls += 1
        conn = await connect(*args, **kwargs)
        if calls == 1:
            assert isinstance(conn, MemoryConnection)  # in_memory's transport
            conn._lose(ConnectionFailed("the broker was still booting"))
        return conn

    runner.transport.connect = first_connection_dies  # type: ignore[method-assign]
    async with running(runner):
        for _ in range(20):
            await asyncio.sleep(0.01)
        assert runner.reconnects == 0
        assert calls == 4  # two attempts of two connections
