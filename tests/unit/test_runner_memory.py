"""The runner end to end on the in-memory broker: acks, dead letters, retries, limits, shutdown,
reconnection. No RabbitMQ needed; the same behaviours are tested on the real broker in
tests/integration."""

from __future__ import annotations

import asyncio
import threading
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from pydantic import BaseModel

from workerkit import (
    AccessRefused,
    Message,
    Reject,
    RetryLater,
    RetryPolicy,
    Settings,
    TopologyError,
    Worker,
)
from workerkit.errors import ConnectionFailed
from workerkit.message import Header, Outgoing, Properties
from workerkit.middleware import Middleware
from workerkit.publisher import AsyncPublisher
from workerkit.runner import Runner
from workerkit.testing import in_memory, memory_publisher, running, wait_for
from workerkit.topology import QueueSpec, Topology
from workerkit.transport.memory import MemoryBroker, MemoryTransport

EXCHANGE = "wkt"


class Order(BaseModel):
    order_id: int
    email: str


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
    return f"unit.{label}.{uuid.uuid4().hex[:8]}"


@pytest.fixture
def broker() -> MemoryBroker:
    return MemoryBroker()


@pytest.fixture
async def publisher(broker: MemoryBroker) -> AsyncIterator[AsyncPublisher]:
    async with memory_publisher(broker, settings()) as pub:
        yield pub


def no_protocol_errors(broker: MemoryBroker) -> None:
    assert broker.channel_errors == [], "the runner made a channel error (double or bad ack)"


async def test_ack_only_after_the_handler_returned(
    broker: MemoryBroker, publisher: AsyncPublisher
) -> None:
    name = qname("ack")
    started, release = asyncio.Event(), asyncio.Event()
    received: list[Order] = []

    class Receipts(Worker):  # the way users write workers
        queue = name

        async def handle(self, order: Order) -> None:
            started.set()
            await release.wait()
            received.append(order)

    queue = name
    runner, _ = in_memory([Receipts], broker=broker, settings=settings())
    async with running(runner):
        await publisher.publish(queue, Order(order_id=7, email="a@b.c"))
        await asyncio.wait_for(started.wait(), 5)
        await asyncio.sleep(0.05)  # time enough for any premature ack to happen
        assert broker.unacked(queue) == 1
        release.set()
        await wait_for(lambda: broker.unacked(queue) == 0, 5, "the ack")
        assert received == [Order(order_id=7, email="a@b.c")]
        assert broker.messages(queue) == []
        assert runner.healthy
    no_protocol_errors(broker)


def worker(queue: str, handle: Any, **attrs: Any) -> type[Worker]:
    return type("W" + uuid.uuid4().hex[:6], (Worker,), {"queue": queue, "handle": handle, **attrs})


async def test_invalid_body_goes_to_the_dlq_with_the_reason(
    broker: MemoryBroker, publisher: AsyncPublisher
) -> None:
    queue = qname("invalid")
    handled: list[int] = []

    async def handle(self: Any, order: Order) -> None:
        handled.append(order.order_id)

    runner, _ = in_memory([worker(queue, handle)], broker=broker, settings=settings())
    async with running(runner):
        await publisher.publish(queue, {"order_id": "not a number", "email": "x"})
        await publisher.publish(queue, b"\x80\x81 not json")
        await publisher.publish(queue, Order(order_id=2, email="ok"))
        await wait_for(lambda: len(broker.messages(f"{queue}.dlq")) == 2, 5, "two dead letters")
        await wait_for(lambda: handled == [2], 5, "the good message")
    dead = broker.messages(f"{queue}.dlq")
    assert [m.headers[Header.REASON] for m in dead] == ["invalid", "invalid"]
    assert "order_id" in dead[0].headers[Header.ERROR_MESSAGE]
    assert dead[0].headers[Header.ERROR_TYPE] == "workerkit.errors.DecodeError"
    assert dead[0].headers[Header.ORIGINAL_ROUTING_KEY] == queue
    assert dead[1].body == b"\x80\x81 not json"  # the body is kept as it was
    assert broker.messages(queue) == [] and broker.unacked() == 0
    no_protocol_errors(broker)


async def test_pickle_is_dead_lettered_not_unpickled(
    broker: MemoryBroker, publisher: AsyncPublisher
) -> None:
    queue = qname("pickle")
    handled: list[Any] = []

    async def handle(self: Any, body: dict[str, Any]) -> None:
        handled.append(body)

    runner, _ = in_memory([worker(queue, handle)], broker=broker, settings=settings())
    async with running(runner):
        conn = await MemoryTransport(broker).connect(settings(), name="raw", on_lost=print)
        channel = await conn.channel(confirms=True)
        evil = Outgoing(
            EXCHANGE,
            queue,
            b"\x80\x04K\x01.",
            Properties(content_type="application/x-python-pickle"),
        )
        await channel.publish(evil, mandatory=True, timeout=1)
        await wait_for(lambda: len(broker.messages(f"{queue}.dlq")) == 1, 5)
    (dead,) = broker.messages(f"{queue}.dlq")
    assert "x-python-pickle" in dead.headers[Header.ERROR_MESSAGE]
    assert handled == []


async def test_reject_goes_straight_to_the_dlq(
    broker: MemoryBroker, publisher: AsyncPublisher
) -> None:
    queue = qname("reject")
    calls: list[int] = []

    async def handle(self: Any, order: Order) -> None:
        calls.append(order.order_id)
        raise Reject("no address")

    cls = worker(queue, handle, retry=RetryPolicy(max_attempts=5, delay=0.1))
    runner, _ = in_memory([cls], broker=broker, settings=settings())
    async with running(runner):
        await publisher.publish(queue, Order(order_id=1, email=""))
        await wait_for(lambda: len(broker.messages(f"{queue}.dlq")) == 1, 5)
        await asyncio.sleep(0.3)  # longer than a retry would take
    (dead,) = broker.messages(f"{queue}.dlq")
    assert dead.headers[Header.REASON] == "rejected"
    assert dead.headers[Header.ERROR_MESSAGE] == "no address"
    assert dead.headers[Header.ATTEMPT] == 1
    assert calls == [1]  # never retried
    assert broker.unacked() == 0
    no_protocol_errors(broker)


async def test_failure_publishes_a_delayed_copy_then_acks(
    broker: MemoryBroker, publisher: AsyncPublisher
) -> None:
    queue = qname("retrycopy")

    async def handle(self: Any, order: Order) -> None:
        raise RuntimeError("smtp down")

    policy = RetryPolicy(max_attempts=5, delay=60.0, jitter=0.0)
    runner, _ = in_memory([worker(queue, handle, retry=policy)], broker=broker, settings=settings())
    async with running(runner):
        message_id = await publisher.publish(queue, Order(order_id=3, email="a@b"))
        # 60 s is 600 units = 0b1001011000: the copy waits first in level 9 (51.2 s).
        await wait_for(lambda: broker.messages(f"{EXCHANGE}.delay.09") != [], 5, "the copy")
        await wait_for(lambda: broker.unacked(queue) == 0, 5, "the original's ack")
    (copy,) = broker.messages(f"{EXCHANGE}.delay.09")
    assert copy.headers[Header.ATTEMPT] == 2
    assert copy.headers[Header.ERROR_TYPE] == "builtins.RuntimeError"
    assert copy.headers[Header.ERROR_MESSAGE] == "smtp down"
    assert "Traceback" in copy.headers[Header.TRACEBACK]
    assert copy.message_id == message_id
    assert copy.routing_key.endswith(f".{queue}") and copy.routing_key.startswith("r.")
    assert broker.messages(queue) == [] and broker.messages(f"{queue}.dlq") == []
    no_protocol_errors(broker)


async def test_retry_comes_back_after_its_delay_with_the_next_attempt(
    broker: MemoryBroker, publisher: AsyncPublisher
) -> None:
    queue = qname("retry")
    seen: list[tuple[int, float]] = []
    loop = asyncio.get_running_loop()

    async def handle(self: Any, body: dict[str, Any], message: Message) -> None:
        seen.append((message.attempt, loop.time()))
        if message.attempt < 3:
            raise ConnectionError("flaky")

    policy = RetryPolicy(max_attempts=5, delay=0.2, backoff=2.0, jitter=0.0)
    runner, _ = in_memory([worker(queue, handle, retry=policy)], broker=broker, settings=settings())
    async with running(runner):
        await publisher.publish(queue, {"n": 1})
        await wait_for(lambda: len(seen) == 3, 10, "three attempts")
        await wait_for(lambda: broker.unacked() == 0, 5)
    assert [attempt for attempt, _ in seen] == [1, 2, 3]
    first_wait = seen[1][1] - seen[0][1]
    second_wait = seen[2][1] - seen[1][1]
    assert first_wait >= 0.2 and second_wait >= 0.4  # never sooner than the policy says
    assert first_wait < 2.0 and second_wait < 2.0
    assert broker.messages(f"{queue}.dlq") == []
    no_protocol_errors(broker)


async def test_exhausted_retries_dead_letter(
    broker: MemoryBroker, publisher: AsyncPublisher
) -> None:
    queue = qname("exhaust")
    attempts: list[int] = []

    async def handle(self: Any, body: bytes, message: Message) -> None:
        attempts.append(message.attempt)
        raise RetryLater(delay=0.1)

    policy = RetryPolicy(max_attempts=3, delay=100.0)
    runner, _ = in_memory([worker(queue, handle, retry=policy)], broker=broker, settings=settings())
    async with running(runner):
        await publisher.publish(queue, b"payload")
        await wait_for(lambda: len(broker.messages(f"{queue}.dlq")) == 1, 10)
    (dead,) = broker.messages(f"{queue}.dlq")
    assert attempts == [1, 2, 3]
    assert dead.headers[Header.REASON] == "exhausted"
    assert dead.headers[Header.ATTEMPT] == 3
    assert dead.body == b"payload"
    assert "x-death" not in dead.headers  # broker headers of the delay hops are dropped
    no_protocol_errors(broker)


async def test_sync_handler_runs_in_a_thread_and_is_acked(
    broker: MemoryBroker, publisher: AsyncPublisher
) -> None:
    queue = qname("sync")
    threads: list[str] = []

    def handle(self: Any, text: str) -> None:
        threads.append(threading.current_thread().name)

    runner, _ = in_memory([worker(queue, handle)], broker=broker, settings=settings())
    async with running(runner):
        for i in range(5):
            await publisher.publish(queue, f"hello {i}")
        await wait_for(lambda: len(threads) == 5, 5)
        await wait_for(lambda: broker.unacked() == 0, 5)
    assert threading.main_thread().name not in threads
    assert all(name.startswith(f"workerkit-{queue}") for name in threads)
    assert broker.messages(queue) == []
    no_protocol_errors(broker)


async def test_concurrency_limit_is_honoured_separately_from_prefetch(
    broker: MemoryBroker, publisher: AsyncPublisher
) -> None:
    queue = qname("conc")
    running_now = 0
    peak = 0
    release = asyncio.Event()
    done: list[int] = []

    async def handle(self: Any, body: dict[str, int]) -> None:
        nonlocal running_now, peak
        running_now += 1
        peak = max(peak, running_now)
        await release.wait()
        running_now -= 1
        done.append(body["n"])

    cls = worker(queue, handle, concurrency=3, prefetch=8)
    runner, _ = in_memory([cls], broker=broker, settings=settings())
    async with running(runner):
        for n in range(12):
            await publisher.publish(queue, {"n": n})
        await wait_for(lambda: running_now == 3 and broker.unacked(queue) == 8, 5)
        await asyncio.sleep(0.05)
        assert peak == 3  # three handlers at once, no more
        assert broker.unacked(queue) == 8 and len(broker.messages(queue)) == 4  # prefetch
        release.set()
        await wait_for(lambda: len(done) == 12, 5)
        await wait_for(lambda: broker.unacked() == 0, 5)
    assert peak == 3
    assert sorted(done) == list(range(12))
    no_protocol_errors(broker)


async def test_graceful_stop_finishes_in_flight_and_leaves_the_rest(
    broker: MemoryBroker, publisher: AsyncPublisher
) -> None:
    queue = qname("stop")
    started: list[int] = []
    finished: list[int] = []
    release = asyncio.Event()

    async def handle(self: Any, body: dict[str, int]) -> None:
        started.append(body["n"])
        await release.wait()
        finished.append(body["n"])

    cls = worker(queue, handle, concurrency=2, prefetch=10)
    runner, _ = in_memory([cls], broker=broker, settings=settings())
    task = asyncio.create_task(runner.run())
    await runner.wait_ready(5)
    for n in range(6):
        await publisher.publish(queue, {"n": n})
    await wait_for(lambda: len(started) == 2 and broker.unacked(queue) == 6, 5)
    runner.stop()
    await asyncio.sleep(0.05)
    assert not task.done()  # waiting for the two in-flight handlers
    assert broker.consumer_count(queue) == 0  # consuming stopped at once
    release.set()
    await asyncio.wait_for(task, 5)
    assert started == finished == [0, 1]
    left = broker.messages(queue)
    assert sorted(m.body for m in left) == [b'{"n":%d}' % n for n in range(2, 6)]
    assert all(m.redelivered for m in left)  # prefetched but never started: back to the broker
    assert broker.unacked() == 0
    assert all(c.name == "workerkit-publisher" for c in broker.connections)  # runner's closed
    no_protocol_errors(broker)


async def test_stop_past_the_grace_period_leaves_the_message_unacked(
    broker: MemoryBroker, publisher: AsyncPublisher
) -> None:
    queue = qname("grace")
    cancelled = asyncio.Event()

    async def handle(self: Any, body: bytes) -> None:
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    runner, _ = in_memory(
        [worker(queue, handle)], broker=broker, settings=settings(shutdown_grace=0.2)
    )
    task = asyncio.create_task(runner.run())
    await runner.wait_ready(5)
    await publisher.publish(queue, b"slow")
    await wait_for(lambda: broker.unacked(queue) == 1, 5)
    runner.stop()
    await asyncio.wait_for(task, 5)
    assert cancelled.is_set()
    (left,) = broker.messages(queue)
    assert left.body == b"slow" and left.redelivered  # not acked, not lost
    no_protocol_errors(broker)


async def test_reconnects_after_connection_loss_and_proves_consumers_back(
    broker: MemoryBroker,
) -> None:
    queue = qname("reconnect")
    seen: list[tuple[bytes, bool]] = []
    hold = asyncio.Event()

    async def handle(self: Any, body: bytes, message: Message) -> None:
        seen.append((body, message.redelivered))
        if body == b"in-flight" and not message.redelivered:
            await hold.wait()

    runner, _ = in_memory([worker(queue, handle)], broker=broker, settings=settings())
    async with running(runner), memory_publisher(broker, settings()) as pub:
        await pub.publish(queue, b"in-flight")
        await wait_for(lambda: seen == [(b"in-flight", False)], 5)
        connects = broker.connects
        assert broker.drop_connections() >= 2  # the runner's consume and publish connections
        await asyncio.sleep(0)  # on_lost runs soon after, as from a client library
        assert not runner.healthy
        await wait_for(lambda: runner.reconnects == 1 and runner.healthy, 5, "reconnection")
        assert broker.connects > connects
        assert broker.consumer_count(queue) == 1  # exactly one consumer, proven back
        # The message in flight when the connection died comes back (at least once).
        await wait_for(lambda: (b"in-flight", True) in seen, 5)
        hold.set()  # the old handler finishes; its ack must not touch the new channel
        await pub.publish(queue, b"after")
        await wait_for(lambda: (b"after", False) in seen, 5)
        await wait_for(lambda: broker.unacked() == 0, 5)
        assert runner.last_recovery is not None and runner.last_recovery < 5
    no_protocol_errors(broker)
    assert broker.messages(queue) == []


async def test_reconnect_waits_for_the_broker_to_come_back(broker: MemoryBroker) -> None:
    queue = qname("down")
    seen: list[bytes] = []

    async def handle(self: Any, body: bytes) -> None:
        seen.append(body)

    runner, _ = in_memory([worker(queue, handle)], broker=broker, settings=settings())
    async with running(runner):
        broker.connect_error = ConnectionFailed("connection refused")
        broker.drop_connections()
        await asyncio.sleep(0.5)
        assert not runner.healthy and runner.reconnects == 0  # still trying
        broker.connect_error = None
        await wait_for(lambda: runner.healthy and runner.reconnects == 1, 5)
        async with memory_publisher(broker, settings()) as pub:
            await pub.publish(queue, b"back")
        await wait_for(lambda: seen == [b"back"], 5)


async def test_topology_clash_stops_start_up_with_one_error(broker: MemoryBroker) -> None:
    queue = qname("clash")

    async def handle(self: Any, body: bytes) -> None: ...

    cls = worker(queue, handle)
    _, spec = Topology(settings()).worker_queues(cls)
    conn = await MemoryTransport(broker).connect(settings(), name="setup", on_lost=print)
    channel = await conn.channel()
    await channel.declare_queue(QueueSpec(queue, {**spec.arguments, "x-delivery-limit": 99}))
    runner, _ = in_memory([cls], broker=broker, settings=settings())
    with pytest.raises(TopologyError, match=rf"'x-delivery-limit' for queue '{queue}'"):
        async with running(runner, timeout=5):
            pass
    assert broker.connects <= 3  # setup + one attempt: no retry storm


async def test_refused_credentials_are_fatal(broker: MemoryBroker) -> None:
    async def handle(self: Any, body: bytes) -> None: ...

    broker.connect_error = AccessRefused("the broker refused the credentials")
    runner, _ = in_memory([worker(qname("auth"), handle)], broker=broker, settings=settings())
    with pytest.raises(AccessRefused):
        await asyncio.wait_for(runner.run(), 5)


async def test_burst_mode_stops_when_the_queue_is_drained(
    broker: MemoryBroker, publisher: AsyncPublisher
) -> None:
    queue = qname("burst")
    seen: list[int] = []

    async def handle(self: Any, body: dict[str, int]) -> None:
        seen.append(body["n"])

    cls = worker(queue, handle)
    setup, _ = in_memory([cls], broker=broker, settings=settings())
    async with running(setup):
        pass  # declares the queue
    for n in range(20):
        await publisher.publish(queue, {"n": n})
    runner: Runner = in_memory([cls], broker=broker, settings=settings(), burst=True)[0]
    await asyncio.wait_for(runner.run(), 10)
    assert sorted(seen) == list(range(20))
    assert broker.messages(queue) == [] and broker.unacked() == 0


async def test_events_fan_out_to_every_bound_queue(
    broker: MemoryBroker, publisher: AsyncPublisher
) -> None:
    event = f"orders.placed.{uuid.uuid4().hex[:8]}"
    seen: dict[str, list[int]] = {"receipts": [], "audit": []}

    async def receipts(self: Any, order: Order) -> None:
        seen["receipts"].append(order.order_id)

    async def audit(self: Any, body: dict[str, Any]) -> None:
        seen["audit"].append(body["order_id"])

    workers = [
        worker(qname("receipts"), receipts, bindings=(event,)),
        worker(qname("audit"), audit, bindings=("orders.placed.#",)),
    ]
    runner, _ = in_memory(workers, broker=broker, settings=settings())
    async with running(runner):
        await publisher.publish(event, Order(order_id=1, email="a@b"))
        await wait_for(lambda: seen == {"receipts": [1], "audit": [1]}, 5)
        await publisher.publish(workers[0].queue, Order(order_id=2, email="a@b"))  # a task
        await wait_for(lambda: seen["receipts"] == [1, 2], 5)
    assert seen["audit"] == [1]
    no_protocol_errors(broker)


async def test_scheduled_publish_arrives_after_its_delay(
    broker: MemoryBroker, publisher: AsyncPublisher
) -> None:
    event = f"reminders.due.{uuid.uuid4().hex[:8]}"
    loop = asyncio.get_running_loop()
    arrived: list[float] = []

    async def handle(self: Any, body: dict[str, Any]) -> None:
        arrived.append(loop.time())

    runner, _ = in_memory(
        [worker(qname("sched"), handle, bindings=(event,))], broker=broker, settings=settings()
    )
    async with running(runner):
        sent = loop.time()
        await publisher.publish(event, {"x": 1}, delay=0.5)
        await wait_for(lambda: arrived != [], 5)
    assert 0.5 <= arrived[0] - sent < 2.0


async def test_cancelled_consumer_is_recovered(
    broker: MemoryBroker, caplog: pytest.LogCaptureFixture
) -> None:
    queue = qname("cancelled")
    seen: list[bytes] = []

    async def handle(self: Any, body: bytes) -> None:
        seen.append(body)

    runner, _ = in_memory([worker(queue, handle)], broker=broker, settings=settings())
    async with running(runner), memory_publisher(broker, settings()) as pub:
        conn = await MemoryTransport(broker).connect(settings(), name="admin", on_lost=print)
        admin = await conn.channel()
        await admin.delete_queue(queue)  # the broker cancels the runner's consumer
        await wait_for(lambda: runner.reconnects == 1 and runner.healthy, 5)
        assert broker.consumer_count(queue) == 1  # the queue was declared again
        await pub.publish(queue, b"still here")
        await wait_for(lambda: seen == [b"still here"], 5)
    # Said as what happened, not as a lost connection.
    lost = [r.getMessage() for r in caplog.records if "consumer lost" in r.getMessage()]
    assert lost and f"{queue!r}: cancelled by the broker" in lost[0], caplog.text
    assert not [r for r in caplog.records if "connection lost" in r.getMessage()], caplog.text


@pytest.mark.parametrize("queue_type", ["quorum", "classic"])
async def test_a_message_that_keeps_killing_its_worker_ends_in_the_dlq(
    broker: MemoryBroker, publisher: AsyncPublisher, queue_type: str
) -> None:
    # Each connection drop stands for a worker process dying mid-handler.
    queue = qname(f"poison{queue_type}")
    deliveries = 0

    async def handle(self: Any, body: bytes) -> None:
        nonlocal deliveries
        deliveries += 1
        await asyncio.Event().wait()  # never returns: only the "crash" ends it

    def delivered(n: int) -> Callable[[], bool]:
        return lambda: deliveries == n

    def reconnected(n: int) -> Callable[[], bool]:
        return lambda: runner.reconnects == n and runner.healthy

    cls = worker(queue, handle, queue_type=queue_type, delivery_limit=2)
    runner, _ = in_memory([cls], broker=broker, settings=settings(shutdown_grace=0.1))
    # delivery_limit=2 allows 2 redeliveries on both queue types (x-delivery-limit semantics).
    crashes = 3
    async with running(runner):
        await publisher.publish(queue, b"poison")
        for crash in range(1, crashes + 1):
            await wait_for(delivered(crash), 5, f"delivery {crash}")
            broker.drop_connections()
            await wait_for(reconnected(crash), 5)
        await wait_for(lambda: len(broker.messages(f"{queue}.dlq")) == 1, 5)
        await asyncio.sleep(0.05)
    assert deliveries == crashes  # and not one more
    assert broker.messages(queue) == []
    (dead,) = broker.messages(f"{queue}.dlq")
    assert dead.body == b"poison"
    if queue_type == "classic":  # workerkit counts deliveries itself
        assert dead.headers[Header.REASON] == "delivery-limit"
    else:  # the quorum queue's own delivery limit
        assert dead.headers["x-death"][0]["reason"] == "delivery_limit"


async def test_sync_handler_errors_reach_the_retry_policy(
    broker: MemoryBroker, publisher: AsyncPublisher
) -> None:
    queue = qname("sync-fail")
    attempts: list[int] = []

    def handle(self: Any, body: bytes, message: Message) -> None:
        attempts.append(message.attempt)
        raise RuntimeError("disk full")

    policy = RetryPolicy(max_attempts=2, delay=0.05)
    runner, _ = in_memory([worker(queue, handle, retry=policy)], broker=broker, settings=settings())
    async with running(runner):
        await publisher.publish(queue, b"payload")
        await wait_for(lambda: len(broker.messages(f"{queue}.dlq")) == 1, 10)
    (dead,) = broker.messages(f"{queue}.dlq")
    assert attempts == [1, 2]
    assert dead.headers[Header.REASON] == "exhausted"
    assert dead.headers[Header.ERROR_TYPE] == "builtins.RuntimeError"
    no_protocol_errors(broker)


async def test_sync_handlers_past_their_timeout_fail_and_unstarted_ones_wait_for_a_thread(
    broker: MemoryBroker, publisher: AsyncPublisher
) -> None:
    """One pool thread, stuck: the first handler times out and its thread stays busy (counted;
    the worker is unhealthy). The second waits for a thread instead of being dead-lettered as
    HandlerTimeout without running, and runs once the thread is free again."""
    queue = qname("sync-stuck")
    started: list[bytes] = []
    unstick = threading.Event()

    def handle(self: Any, body: bytes) -> None:
        started.append(body)
        unstick.wait(10)

    policy = RetryPolicy(max_attempts=1)
    stuck = worker(queue, handle, retry=policy, concurrency=1, handler_timeout=0.2)
    runner, _ = in_memory([stuck], broker=broker, settings=settings())
    async with running(runner):
        await publisher.publish(queue, b"first")
        await publisher.publish(queue, b"second")
        await wait_for(lambda: len(broker.messages(f"{queue}.dlq")) == 1, 10)
        await wait_for(lambda: runner.runtimes[0].stuck_threads == 1, 5)
        assert not runner.healthy
        assert started == [b"first"]
        unstick.set()
        await wait_for(lambda: broker.unacked() == 0, 5)
        await publisher.publish(queue, b"third")
        await wait_for(lambda: b"third" in started, 5)
        await wait_for(lambda: runner.healthy, 5)
    assert started == [b"first", b"second", b"third"]
    dead = broker.messages(f"{queue}.dlq")
    assert [d.headers[Header.ERROR_TYPE] for d in dead] == ["workerkit.errors.HandlerTimeout"]
    no_protocol_errors(broker)


async def test_a_closed_publish_channel_is_reopened_for_the_next_retry_copy(
    broker: MemoryBroker, publisher: AsyncPublisher
) -> None:
    # The transport closes a channel the broker nacked on (RabbitMQ 3.10 keeps nacking on it
    # after a quorum leader died); retry copies must still go out, on a fresh channel.
    queue = qname("reopen")

    async def handle(self: Any, order: Order) -> None:
        raise RuntimeError("try later")

    policy = RetryPolicy(max_attempts=5, delay=60.0, jitter=0.0)
    runner, _ = in_memory([worker(queue, handle, retry=policy)], broker=broker, settings=settings())
    async with running(runner):
        closed = runner._publish_channel
        assert closed is not None
        await closed.close()
        await publisher.publish(queue, Order(order_id=4, email="a@b"))
        await wait_for(lambda: broker.messages(f"{EXCHANGE}.delay.09") != [], 5, "the copy")
        assert runner._publish_channel is not closed
    no_protocol_errors(broker)


async def test_a_held_ack_is_sent_when_the_publish_connection_is_lost(
    broker: MemoryBroker,
) -> None:
    """Acks wait a few milliseconds to share a frame. When the publish connection is lost the
    runner reconnects both, closing the consume channel: an ack still held then would be lost
    and the handled message delivered again."""
    queue = qname("held")
    seen: list[tuple[bytes, bool]] = []

    async def handle(self: Any, body: bytes, message: Message) -> None:
        seen.append((body, message.redelivered))

    class LoseThePublishConnection(Middleware):
        def after_handle(self, message: Message, outcome: str, duration: float) -> None:
            if message.body != b"once" or message.redelivered:
                return
            # The ack is held now (prefetch 20 holds 10); the consume channel is still open.
            tracker = runner.runtimes[0].tracker
            assert tracker is not None and tracker.held == 1
            runner.connection_lost(ConnectionFailed("the publish connection closed"))

    runner, _ = in_memory(
        [worker(queue, handle)],
        broker=broker,
        settings=settings(concurrency=10, prefetch=20),
        middleware=[LoseThePublishConnection()],
    )
    async with running(runner), memory_publisher(broker, settings()) as pub:
        await pub.publish(queue, b"once")
        await wait_for(lambda: runner.reconnects == 1 and runner.healthy, 5, "reconnection")
        await wait_for(lambda: broker.unacked() == 0 and not broker.messages(queue), 5)
        await pub.publish(queue, b"after")  # the recovered consumer works
        await wait_for(lambda: (b"after", False) in seen, 5)
    assert seen == [(b"once", False), (b"after", False)]  # never delivered again
    no_protocol_errors(broker)


async def test_a_runtime_with_a_held_ack_is_busy(broker: MemoryBroker) -> None:
    """join() and burst mode say drained only once held acks are sent."""
    queue = qname("busy")
    busy_after: list[bool] = []

    async def handle(self: Any, body: bytes) -> None:
        pass

    class Look(Middleware):
        def after_handle(self, message: Message, outcome: str, duration: float) -> None:
            busy_after.append(runner.runtimes[0].busy)  # handled, its ack held

    runner, _ = in_memory(
        [worker(queue, handle)],
        broker=broker,
        settings=settings(concurrency=10, prefetch=20),
        middleware=[Look()],
    )
    async with running(runner), memory_publisher(broker, settings()) as pub:
        await pub.publish(queue, b"x")
        await wait_for(lambda: broker.unacked() == 0 and busy_after == [True], 5)
        await wait_for(lambda: not runner.runtimes[0].busy, 1, "the held ack was sent")
    no_protocol_errors(broker)
