"""Consume throughput: drain a pre-loaded quorum queue with one consumer, prefetch 100.

``python -m benchmarks.consume CASE COUNT`` declares a fresh queue, pre-loads COUNT persistent
JSON messages, then times from the first delivery to the last ack and reports msg/s.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from collections.abc import Callable
from typing import Any

from pydantic import BaseModel

from .common import (
    PREFETCH,
    QUORUM,
    URL,
    declare_raw_queue,
    delete_queues,
    preload,
    queue_name,
    report,
)


class Order(BaseModel):
    """The pydantic-model handler's body."""

    order_id: int
    email: str
    note: str = ""


class Clock:
    """First delivery and last ack, in perf_counter seconds, and the process's CPU seconds
    (every thread) at both: CPU per message varies far less than msg/s when other jobs share
    the machine."""

    def __init__(self, count: int) -> None:
        self.count = count
        self.seen = 0
        self.first = 0.0
        self.last = 0.0
        self.cpu_first = 0.0
        self.cpu_last = 0.0

    def delivered(self) -> None:
        if not self.seen:
            self.first = time.perf_counter()
            self.cpu_first = time.process_time()
        self.seen += 1

    def finished(self) -> None:
        self.last = time.perf_counter()
        self.cpu_last = time.process_time()


# -- raw aio-pika ------------------------------------------------------------------------------


async def aiopika_callback(queue: str, clock: Clock) -> None:
    import aio_pika

    conn = await aio_pika.connect(URL)
    channel = await conn.channel()
    await channel.set_qos(prefetch_count=PREFETCH)
    q = await channel.declare_queue(queue, durable=True, arguments=QUORUM)
    done = asyncio.get_running_loop().create_future()

    async def on_message(message: Any) -> None:
        clock.delivered()
        # Callbacks run as concurrent tasks: decide before awaiting.
        last = clock.seen == clock.count
        await message.ack()
        if last:
            clock.finished()
            done.set_result(None)

    await q.consume(on_message)
    await done
    await conn.close()


async def aiopika_iterator(queue: str, clock: Clock) -> None:
    import aio_pika

    conn = await aio_pika.connect(URL)
    channel = await conn.channel()
    await channel.set_qos(prefetch_count=PREFETCH)
    q = await channel.declare_queue(queue, durable=True, arguments=QUORUM)
    async with q.iterator() as messages:
        async for message in messages:
            clock.delivered()
            await message.ack()
            if clock.seen == clock.count:
                clock.finished()
                break
    await conn.close()


# -- raw pika ----------------------------------------------------------------------------------


def pika_blocking(queue: str, clock: Clock) -> None:
    import pika

    conn = pika.BlockingConnection(pika.URLParameters(URL))
    channel = conn.channel()
    channel.basic_qos(prefetch_count=PREFETCH)

    def on_message(ch: Any, method: Any, _props: Any, _body: bytes) -> None:
        clock.delivered()
        ch.basic_ack(method.delivery_tag)
        if clock.seen == clock.count:
            clock.finished()
            ch.stop_consuming()

    channel.basic_consume(queue, on_message)
    channel.start_consuming()
    conn.close()


async def pika_asyncio(queue: str, clock: Clock, batch: int = 1) -> None:
    """pika's asyncio adapter; ``batch`` > 1 acks every batch-th delivery with multiple=True."""
    import pika
    from pika.adapters.asyncio_connection import AsyncioConnection

    loop = asyncio.get_running_loop()
    done = loop.create_future()

    def on_message(ch: Any, method: Any, _props: Any, _body: bytes) -> None:
        clock.delivered()
        last = clock.seen == clock.count
        if batch == 1:
            ch.basic_ack(method.delivery_tag)
        elif last or method.delivery_tag % batch == 0:
            ch.basic_ack(method.delivery_tag, multiple=True)
        if last:
            clock.finished()
            done.set_result(None)

    def on_qos(_frame: Any, ch: Any) -> None:
        ch.basic_consume(queue, on_message)

    def on_channel(ch: Any) -> None:
        ch.basic_qos(prefetch_count=PREFETCH, callback=lambda f: on_qos(f, ch))

    def on_open(conn: Any) -> None:
        conn.channel(on_open_callback=on_channel)

    def on_error(_conn: Any, exc: BaseException) -> None:
        if not done.done():
            done.set_exception(exc)

    conn = AsyncioConnection(
        pika.URLParameters(URL),
        on_open_callback=on_open,
        on_open_error_callback=on_error,
        custom_ioloop=loop,
    )
    await done
    closed = loop.create_future()

    def on_closed(*_: object) -> None:
        if not closed.done():
            closed.set_result(None)

    conn.add_on_close_callback(on_closed)
    conn.close()
    await asyncio.wait_for(closed, 5)


async def pika_asyncio_batched(queue: str, clock: Clock) -> None:
    await pika_asyncio(queue, clock, batch=PREFETCH // 2)


# -- FastStream --------------------------------------------------------------------------------


async def faststream(queue: str, clock: Clock) -> None:
    # Its per-message INFO log is switched off: that favours FastStream, never workerkit.
    from faststream.rabbit import Channel, QueueType, RabbitBroker, RabbitQueue

    broker = RabbitBroker(URL, default_channel=Channel(prefetch_count=PREFETCH), logger=None)
    done = asyncio.get_running_loop().create_future()

    @broker.subscriber(RabbitQueue(queue, queue_type=QueueType.QUORUM, durable=True))
    async def handle(body: dict[str, Any]) -> None:
        clock.delivered()
        if clock.seen == clock.count:
            done.set_result(None)

    await broker.start()
    await done
    # FastStream acks after the handler returns; let that last ack go out before the clock stops.
    await asyncio.sleep(0)
    clock.finished()
    await broker.stop()


# -- workerkit ---------------------------------------------------------------------------------


def workerkit_worker(kind: str, queue: str, on_body: Callable[[], None]) -> type:
    from workerkit import Worker

    qname = queue
    if kind in ("wk_async", *METRICS_PAIRS):

        class AsyncNoop(Worker):
            queue = qname

            async def handle(self, body: dict) -> None:  # type: ignore[type-arg]
                on_body()

        return AsyncNoop
    if kind == "wk_async_p1000":

        class AsyncWide(Worker):
            # A provisional high-throughput profile (issue 16): a wide prefetch window and more
            # handlers in flight, acks still after the handler and batched.
            queue = qname
            prefetch = 1000
            concurrency = 100

            async def handle(self, body: dict) -> None:  # type: ignore[type-arg]
                on_body()

        return AsyncWide
    if kind == "wk_async_bytes":

        class AsyncBytes(Worker):
            queue = qname

            async def handle(self, body: bytes) -> None:
                on_body()

        return AsyncBytes
    if kind == "wk_sync":

        class SyncNoop(Worker):
            queue = qname

            def handle(self, body: dict) -> None:  # type: ignore[type-arg]
                on_body()

        return SyncNoop
    if kind == "wk_model":

        class ModelNoop(Worker):
            queue = qname

            async def handle(self, body: Order) -> None:
                on_body()

        return ModelNoop
    raise ValueError(kind)


def clock_acks(clock: Clock, on_last: Callable[[], object]) -> None:
    """Stop the clock when the ack covering the last delivery tag leaves the worker."""
    from workerkit.transport import pika_asyncio as transport

    original = transport.PikaChannel.ack

    def ack(self: Any, delivery_tag: int, multiple: bool = False) -> None:
        original(self, delivery_tag, multiple)
        if delivery_tag >= clock.count and not clock.last:
            clock.finished()
            on_last()

    transport.PikaChannel.ack = ack  # type: ignore[method-assign]


async def run_workerkit(worker: type, clock: Clock, metrics: bool = False) -> None:
    from workerkit.runner import Runner

    from .common import settings

    middleware = []
    if metrics:  # what `workerkit run --health-port` installs
        from workerkit.metrics import Metrics

        middleware.append(Metrics())
    # Prefetch as the raw clients get it (the default is 2 x concurrency = 20 since issue 12),
    # unless the worker sets its own (the high-throughput profile).
    prefetch = None if getattr(worker, "prefetch", None) else PREFETCH
    # The wide profile's 1000 deliveries fit the default memory budget with bodies up to 256 KiB.
    wide = getattr(worker, "prefetch", None) == 1000
    config = settings(max_body_size=256 * 1024) if wide else settings()
    runner = Runner([worker], settings=config, burst=True, prefetch=prefetch, middleware=middleware)
    loop = asyncio.get_running_loop()
    clock_acks(clock, lambda: loop.call_soon_threadsafe(runner.stop))
    await runner.run()


# -- driver ------------------------------------------------------------------------------------

RAW: dict[str, Callable[[str, Clock], Any]] = {
    "aiopika_callback": aiopika_callback,
    "aiopika_iterator": aiopika_iterator,
    "pika_blocking": pika_blocking,
    "pika_asyncio": pika_asyncio,
    "pika_asyncio_batched": pika_asyncio_batched,
    "faststream": faststream,
}
# The metrics overhead, side by side: wk_async_metrics is wk_async with the Prometheus
# middleware on. The *_stamped pair consumes messages that carry the publish-time header a
# publisher with metrics adds, so the delivery-lag histogram is filled too (and both sides
# decode the header).
METRICS_PAIRS = ("wk_async_metrics", "wk_async_stamped", "wk_async_metrics_stamped")
WITH_METRICS = ("wk_async_metrics", "wk_async_metrics_stamped")
WORKERKIT = (
    "wk_async",
    *METRICS_PAIRS,
    "wk_async_bytes",
    "wk_sync",
    "wk_model",
    "wk_async_p1000",
)
CASES = (*RAW, *WORKERKIT)


def prepare(case: str, count: int, clock: Clock) -> tuple[str, list[str], Callable[[], Any]]:
    """(queue, queues to delete afterwards, the consumer to time)."""
    queue = queue_name(case)
    if case in WORKERKIT:
        from .common import EXCHANGE, declare_worker_queue

        worker = workerkit_worker(case, queue, clock.delivered)
        declare_worker_queue(worker)
        headers = None
        if case.endswith("_stamped"):
            from workerkit.metrics import PUBLISHED_AT_HEADER

            headers = {PUBLISHED_AT_HEADER: int(time.time() * 1000)}
        preload(queue, count, exchange=EXCHANGE, headers=headers)
        metrics = case in WITH_METRICS
        return queue, [queue, f"{queue}.dlq"], lambda: run_workerkit(worker, clock, metrics)
    declare_raw_queue(queue)
    preload(queue, count)
    consumer = RAW[case]
    return queue, [queue], lambda: consumer(queue, clock)


def measure(case: str, count: int) -> dict[str, Any]:
    clock = Clock(count)
    _queue, cleanup, consumer = prepare(case, count, clock)
    try:
        outcome = consumer()
        if asyncio.iscoroutine(outcome):
            asyncio.run(outcome)
    finally:
        delete_queues(*cleanup)
    if clock.seen < count or not clock.last:
        raise RuntimeError(f"{case}: consumed {clock.seen} of {count}")
    seconds = clock.last - clock.first
    cpu_us = (clock.cpu_last - clock.cpu_first) / count * 1e6
    return {
        "case": case,
        "count": count,
        "seconds": seconds,
        "rate": count / seconds,
        "cpu_us": cpu_us,
    }


def main() -> None:
    logging.basicConfig(level=logging.WARNING)
    case, count = sys.argv[1], int(sys.argv[2])
    report(**measure(case, count))


if __name__ == "__main__":
    main()
