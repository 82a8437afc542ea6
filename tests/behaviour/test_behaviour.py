"""One behaviour suite, run on the in-memory broker and on RabbitMQ: what a user's test sees must
not depend on the broker. Every test uses only the pytest plugin's fixtures (workerkit_broker,
publisher, async_publisher), as a user's test would. Known differences: docs/testing.md."""

from __future__ import annotations

import asyncio
import itertools
import time
import uuid
from typing import Any

import pytest
from pydantic import BaseModel

from workerkit import (
    AsyncPublisher,
    Message,
    Publisher,
    Reject,
    RemoteError,
    RetryLater,
    RetryPolicy,
    Unroutable,
    Worker,
)
from workerkit.testing import BrokerHarness
from workerkit.topology import Topology

pytestmark = pytest.mark.workerkit(broker="both")


def name(label: str) -> str:
    """Class-level queue names must not clash between the tests of one session."""
    return f"b.{label}.{uuid.uuid4().hex[:6]}"


class Order(BaseModel):
    order_id: int
    email: str


# -- routing and fan-out ----------------------------------------------------------------------


async def test_events_fan_out_and_tasks_reach_one_queue(
    workerkit_broker: BrokerHarness, async_publisher: AsyncPublisher
) -> None:
    event = name("placed")
    got: dict[str, list[int]] = {"receipts": [], "stock": [], "audit": []}

    class Receipts(Worker):
        queue = name("receipts")
        bindings = (event,)

        async def handle(self, order: Order) -> None:
            got["receipts"].append(order.order_id)

    class Stock(Worker):
        queue = name("stock")
        bindings = (event,)

        async def handle(self, order: Order) -> None:
            got["stock"].append(order.order_id)

    class Audit(Worker):
        queue = name("audit")
        bindings = (f"{event.rsplit('.', 1)[0]}.#",)  # a topic pattern

        async def handle(self, body: dict[str, Any]) -> None:
            got["audit"].append(body["order_id"])

    async with workerkit_broker.run(Receipts, Stock, Audit):
        await async_publisher.publish(event, Order(order_id=1, email="a@b.c"))
        await async_publisher.publish(Receipts.queue, {"order_id": 2, "email": "a@b.c"})
        await workerkit_broker.join_async(raise_errors=True)
    assert got == {"receipts": [1, 2], "stock": [1], "audit": [1]}


@pytest.mark.parametrize("header", ["CC", "BCC"])
async def test_cc_and_bcc_headers_route_copies_and_bcc_is_not_seen(
    workerkit_broker: BrokerHarness, async_publisher: AsyncPublisher, header: str
) -> None:
    """RabbitMQ's sender-selected distribution (docs/boundaries.md): the in-memory broker
    ignored it, so a test passed there and failed on RabbitMQ (a new-user check)."""
    seen: list[tuple[str, int, list[str]]] = []

    class A(Worker):
        queue = name("cc-a")

        async def handle(self, body: dict[str, int], message: Message) -> None:
            seen.append(("A", body["n"], sorted(k for k in message.headers if k in ("CC", "BCC"))))

    class B(Worker):
        queue = name("cc-b")

        async def handle(self, body: dict[str, int], message: Message) -> None:
            seen.append(("B", body["n"], sorted(k for k in message.headers if k in ("CC", "BCC"))))

    async with workerkit_broker.run(A, B):
        copy_to = [workerkit_broker.queue_name(B)]
        await async_publisher.publish(A.queue, {"n": 1}, headers={header: copy_to})
        await workerkit_broker.join_async(raise_errors=True)
    kept = [] if header == "BCC" else ["CC"]
    assert sorted(seen) == [("A", 1, kept), ("B", 1, kept)]


async def test_a_message_no_queue_takes_is_unroutable(
    workerkit_broker: BrokerHarness, async_publisher: AsyncPublisher
) -> None:
    with pytest.raises(Unroutable):
        await async_publisher.publish(name("nobody.listens"), {"x": 1})


# -- acks and ordering -------------------------------------------------------------------------


def test_each_message_is_handled_once_and_acked(
    workerkit_broker: BrokerHarness, publisher: Publisher
) -> None:
    seen: list[int] = []

    class Count(Worker):
        queue = name("count")
        concurrency = 4

        def handle(self, body: dict[str, int]) -> None:  # a sync handler, in the thread pool
            seen.append(body["n"])

    with workerkit_broker.run(Count):
        publisher.publish_many((Count.queue, {"n": n}) for n in range(50))
        workerkit_broker.join(raise_errors=True)
        assert workerkit_broker.ready(workerkit_broker.queue_name(Count)) == 0
    assert sorted(seen) == list(range(50))
    assert workerkit_broker.dead_letters(Count) == []


async def test_one_at_a_time_keeps_publish_order(
    workerkit_broker: BrokerHarness, async_publisher: AsyncPublisher
) -> None:
    seen: list[int] = []

    class InOrder(Worker):
        queue = name("order")
        concurrency = 1
        prefetch = 1

        async def handle(self, body: dict[str, int]) -> None:
            await asyncio.sleep(0)
            seen.append(body["n"])

    async with workerkit_broker.run(InOrder):
        for n in range(30):
            await async_publisher.publish(InOrder.queue, {"n": n})
        await workerkit_broker.join_async(raise_errors=True)
    assert seen == list(range(30))


# -- retries, Reject, RetryLater, invalid bodies -----------------------------------------------


async def test_a_failing_handler_is_retried_after_its_delay(
    workerkit_broker: BrokerHarness, async_publisher: AsyncPublisher
) -> None:
    attempts: list[tuple[int, float]] = []

    class Flaky(Worker):
        queue = name("flaky")
        retry = RetryPolicy(max_attempts=3, delay=0.3, backoff=1.0, jitter=0.0)

        async def handle(self, body: dict[str, Any], message: Message) -> None:
            attempts.append((message.attempt, time.monotonic()))
            if message.attempt < 3:
                raise RuntimeError("flaky downstream")

    async with workerkit_broker.run(Flaky):
        await async_publisher.publish(Flaky.queue, {"x": 1})
        await workerkit_broker.join_async(timeout=15)
    assert [a for a, _ in attempts] == [1, 2, 3]
    gaps = [b - a for (_, a), (_, b) in itertools.pairwise(attempts)]
    assert all(gap >= 0.29 for gap in gaps), gaps  # never sooner than asked
    assert [type(e) for e in workerkit_broker.errors] == [RuntimeError, RuntimeError]
    assert workerkit_broker.dead_letters(Flaky) == []


async def test_exhausted_retries_dead_letter_with_the_error_in_headers(
    workerkit_broker: BrokerHarness, async_publisher: AsyncPublisher
) -> None:
    class Broken(Worker):
        queue = name("broken")
        retry = RetryPolicy(max_attempts=2, delay=0.1, jitter=0.0)

        async def handle(self, order: Order) -> None:
            raise ValueError(f"cannot ship {order.order_id}")

    async with workerkit_broker.run(Broken):
        sent = await async_publisher.publish(Broken.queue, Order(order_id=7, email="x@y.z"))
        await workerkit_broker.join_async(timeout=15)
    [dead] = workerkit_broker.dead_letters(Broken)
    assert dead.message_id == sent
    assert dead.reason == "exhausted"
    assert dead.error_type is not None and dead.error_type.endswith("ValueError")
    assert dead.error_message == "cannot ship 7"
    assert dead.attempts == 2
    assert dead.traceback is not None and "cannot ship 7" in dead.traceback
    assert dead.original_routing_key == Broken.queue


async def test_join_raises_the_first_handler_error_when_asked(
    workerkit_broker: BrokerHarness, async_publisher: AsyncPublisher
) -> None:
    class Fails(Worker):
        queue = name("fails")
        retry = RetryPolicy(max_attempts=1)

        async def handle(self, body: bytes) -> None:
            raise KeyError("missing sku")

    async with workerkit_broker.run(Fails):
        await async_publisher.publish(Fails.queue, b"raw")
        with pytest.raises(KeyError, match="missing sku"):
            await workerkit_broker.join_async(raise_errors=True)


async def test_reject_dead_letters_at_once(
    workerkit_broker: BrokerHarness, async_publisher: AsyncPublisher
) -> None:
    calls: list[int] = []

    class Strict(Worker):
        queue = name("strict")
        retry = RetryPolicy(max_attempts=5, delay=0.1)

        async def handle(self, order: Order) -> None:
            calls.append(order.order_id)
            raise Reject("no address")

    async with workerkit_broker.run(Strict):
        await async_publisher.publish(Strict.queue, Order(order_id=3, email=""))
        await workerkit_broker.join_async()
    [dead] = workerkit_broker.dead_letters(Strict)
    assert calls == [3]
    assert dead.reason == "rejected"
    assert dead.error_message == "no address"


async def test_retry_later_waits_the_delay_it_names(
    workerkit_broker: BrokerHarness, async_publisher: AsyncPublisher
) -> None:
    times: list[float] = []

    class Later(Worker):
        queue = name("later")
        retry = RetryPolicy(max_attempts=3, delay=30.0)  # RetryLater's own delay wins

        async def handle(self, body: dict[str, Any], message: Message) -> None:
            times.append(time.monotonic())
            if message.attempt == 1:
                raise RetryLater(0.4)

    async with workerkit_broker.run(Later):
        await async_publisher.publish(Later.queue, {"x": 1})
        await workerkit_broker.join_async(timeout=10)
    assert len(times) == 2
    assert 0.39 <= times[1] - times[0] < 10


async def test_an_invalid_body_goes_to_the_dlq_without_calling_the_handler(
    workerkit_broker: BrokerHarness, async_publisher: AsyncPublisher
) -> None:
    calls: list[Order] = []

    class Typed(Worker):
        queue = name("typed")

        async def handle(self, order: Order) -> None:
            calls.append(order)

    async with workerkit_broker.run(Typed):
        await async_publisher.publish(Typed.queue, {"order_id": "not a number"})
        await async_publisher.publish(Typed.queue, b"\xff not json")
        await workerkit_broker.join_async()
    dead = workerkit_broker.dead_letters(Typed)
    assert calls == []
    assert [d.reason for d in dead] == ["invalid", "invalid"]
    assert workerkit_broker.errors == []  # never reached the handler


async def test_delayed_publish_arrives_after_its_delay(
    workerkit_broker: BrokerHarness, async_publisher: AsyncPublisher
) -> None:
    arrived: list[float] = []

    class Scheduled(Worker):
        queue = name("scheduled")

        async def handle(self, body: dict[str, Any]) -> None:
            arrived.append(time.monotonic())

    async with workerkit_broker.run(Scheduled):
        start = time.monotonic()
        await async_publisher.publish(Scheduled.queue, {"x": 1}, delay=0.5)
        await workerkit_broker.join_async(timeout=10)
    assert len(arrived) == 1 and arrived[0] - start >= 0.49


# -- the broker's own rules --------------------------------------------------------------------


async def test_the_delivery_limit_dead_letters_a_message_that_keeps_coming_back(
    workerkit_broker: BrokerHarness, async_publisher: AsyncPublisher
) -> None:
    """A message whose consumer dies before acking, again and again (here: handed back with a
    nack), is dead-lettered by the quorum queue itself after ``delivery_limit`` returns."""

    class Poison(Worker):
        queue = name("poison")
        delivery_limit = 2

        async def handle(self, body: bytes) -> None:  # pragma: no cover - never runs
            raise AssertionError("not consumed in this test")

    testable = workerkit_broker.testable(Poison)
    settings = workerkit_broker.settings
    async with workerkit_broker._channel() as channel:
        await Topology(settings).declare(channel, [testable])
        await async_publisher.publish(Poison.queue, b"kills its worker")
        deliveries = 0
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            message = await channel.get(testable.queue)
            if message is None:
                if workerkit_broker.ready(Topology.dlq_name(testable.queue)):
                    break
                await asyncio.sleep(0.02)
                continue
            deliveries += 1
            channel.nack(message.delivery_tag, requeue=True)
    assert deliveries == 3  # the first delivery and two returns
    [dead] = workerkit_broker.dead_letters(Poison)
    assert dead.reason == "delivery-limit"
    assert dead.headers["x-first-death-queue"] == testable.queue
    [death] = dead.headers["x-death"]
    assert death["reason"] == "delivery_limit" and death["queue"] == testable.queue


async def test_a_queue_declared_with_other_arguments_stops_the_runner(
    workerkit_broker: BrokerHarness,
) -> None:
    from workerkit import TopologyError
    from workerkit.topology import QueueSpec

    class Once(Worker):
        queue = name("once")

        async def handle(self, body: bytes) -> None:  # pragma: no cover - never started
            pass

    queue = workerkit_broker.testable(Once).queue
    async with workerkit_broker._channel() as channel:
        await channel.declare_queue(QueueSpec(queue, {"x-queue-type": "classic"}))
    with pytest.raises(TopologyError, match="inequivalent arg"):
        async with workerkit_broker.run(Once):
            pass


# -- the DLQ tools and join() itself -----------------------------------------------------------


async def test_a_dead_letter_replayed_with_the_dlq_tools_is_handled_again(
    workerkit_broker: BrokerHarness, async_publisher: AsyncPublisher
) -> None:
    from workerkit import dlq

    handled: list[int] = []
    fixed = asyncio.Event()

    class Fragile(Worker):
        queue = name("fragile")

        async def handle(self, body: dict[str, int]) -> None:
            if not fixed.is_set():
                raise Reject("downstream rejects it")
            handled.append(body["n"])

    queue = workerkit_broker.queue_name(Fragile)
    options: dict[str, Any] = {
        "settings": workerkit_broker.settings,
        "transport": workerkit_broker.transport(),
    }
    async with workerkit_broker.run(Fragile):
        await async_publisher.publish(Fragile.queue, {"n": 1})
        await workerkit_broker.join_async()
        assert await dlq.count(queue, **options) == 1
        fixed.set()
        result = await dlq.replay(queue, **options)
        assert len(result.replayed) == 1 and result.not_found == []
        await workerkit_broker.join_async(raise_errors=False)
    assert handled == [1]
    assert await dlq.count(queue, **options) == 0


async def test_join_says_what_is_still_busy_when_it_times_out(
    workerkit_broker: BrokerHarness, async_publisher: AsyncPublisher
) -> None:
    release = asyncio.Event()

    class Slow(Worker):
        queue = name("slow")

        async def handle(self, body: bytes) -> None:
            await release.wait()

    async with workerkit_broker.run(Slow):
        await async_publisher.publish(Slow.queue, b"x")
        with pytest.raises(AssertionError, match=r"still busy after 0\.5s: .*slow"):
            await workerkit_broker.join_async(timeout=0.5)
        release.set()
        await workerkit_broker.join_async()


async def test_a_blocking_join_in_an_async_test_says_to_await_join_async(
    workerkit_broker: BrokerHarness,
) -> None:
    """It would block the loop the workers run on and end in a misleading "still busy"."""

    class Idle(Worker):
        queue = name("idle")

        async def handle(self, body: bytes) -> None:
            pass

    async with workerkit_broker.run(Idle):
        with pytest.raises(RuntimeError, match=r"await workerkit_broker\.join_async\(\)"):
            workerkit_broker.join()


def test_the_worker_registry_is_left_as_it_was(workerkit_broker: BrokerHarness) -> None:
    class Registered(Worker):
        queue = name("registered")

        def handle(self, body: bytes) -> None:  # pragma: no cover - never run
            pass

    before = dict(Worker.registry)
    testable = workerkit_broker.testable(Registered)
    assert testable is not Registered and issubclass(testable, Registered)
    workerkit_broker.close()
    assert Worker.registry == before


# -- request/reply -----------------------------------------------------------------------------


class Quote(BaseModel):
    sku: str
    price: float


async def test_a_request_gets_the_value_its_handler_returns(
    workerkit_broker: BrokerHarness, async_publisher: AsyncPublisher
) -> None:
    class Pricing(Worker):
        queue = name("pricing")

        async def handle(self, body: dict[str, Any]) -> Quote:
            return Quote(sku=body["sku"], price=9.5)

    async with workerkit_broker.run(Pricing):
        raw = await async_publisher.request(Pricing.queue, {"sku": "A1"}, timeout=10)
        typed = await async_publisher.request(
            Pricing.queue, {"sku": "B2"}, timeout=10, reply_type=Quote
        )
    assert raw == {"sku": "A1", "price": 9.5}  # decoded like a dict body
    assert typed == Quote(sku="B2", price=9.5)


def test_requests_from_threads_each_get_their_own_reply(
    workerkit_broker: BrokerHarness, publisher: Publisher
) -> None:
    class Double(Worker):
        queue = name("double")
        concurrency = 4

        def handle(self, body: dict[str, int]) -> dict[str, int]:
            return {"n": body["n"], "twice": 2 * body["n"]}

    with workerkit_broker.run(Double):
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(4) as pool:
            replies = list(
                pool.map(lambda n: publisher.request(Double.queue, {"n": n}, timeout=10), range(20))
            )
    assert replies == [{"n": n, "twice": 2 * n} for n in range(20)]


async def test_a_rejected_request_fails_with_remote_error_not_a_timeout(
    workerkit_broker: BrokerHarness, async_publisher: AsyncPublisher
) -> None:
    class Strict(Worker):
        queue = name("strict.req")
        retry = RetryPolicy(max_attempts=3, delay=30.0)  # a retry would outlast the timeout

        async def handle(self, body: dict[str, Any]) -> None:
            raise Reject("unknown sku")

    async with workerkit_broker.run(Strict):
        with pytest.raises(RemoteError) as failed:
            await async_publisher.request(Strict.queue, {"sku": "X"}, timeout=20)
        await workerkit_broker.join_async()
    assert failed.value.reason == "rejected"
    assert failed.value.message == "unknown sku"
    assert failed.value.type == "workerkit.errors.Reject"
    [dead] = workerkit_broker.dead_letters(Strict)
    assert dead.reason == "rejected"


async def test_a_request_no_queue_takes_is_unroutable_at_once(
    workerkit_broker: BrokerHarness, async_publisher: AsyncPublisher
) -> None:
    started = time.monotonic()
    with pytest.raises(Unroutable):
        await async_publisher.request(name("nobody.answers"), {"x": 1}, timeout=20)
    assert time.monotonic() - started < 10  # the broker's return, not the timeout
