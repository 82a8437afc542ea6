"""Publish throughput with publisher confirms, persistent messages, mandatory flag.

``python -m benchmarks.publish CASE COUNT`` publishes COUNT ~100-byte JSON messages to a fresh
quorum queue through the benchmark exchange, one warm-up message first (connection set-up is not
timed), then checks that the queue holds every message.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import logging
import sys
import time
from collections.abc import Callable
from typing import Any

from .common import (
    EXCHANGE,
    blocking_channel,
    declare_raw_queue,
    delete_queues,
    payload,
    queue_name,
    report,
    settings,
)

IN_FLIGHT = 100
THREADS = 8


def bodies(count: int) -> list[bytes]:
    return [payload(i) for i in range(count)]


def documents(count: int) -> list[dict[str, Any]]:
    """The same bodies as dicts, for publishers that encode JSON themselves."""
    return [json.loads(body) for body in bodies(count)]


# -- raw clients -------------------------------------------------------------------------------


def pika_blocking(queue: str, count: int) -> float:
    import pika

    conn, channel = blocking_channel()
    channel.confirm_delivery()
    props = pika.BasicProperties(delivery_mode=2, content_type="application/json")
    items = bodies(count + 1)
    channel.basic_publish(EXCHANGE, queue, items[0], props, mandatory=True)
    start = time.perf_counter()
    for body in items[1:]:
        channel.basic_publish(EXCHANGE, queue, body, props, mandatory=True)
    elapsed = time.perf_counter() - start
    conn.close()
    return elapsed


async def _aiopika(queue: str, count: int, in_flight: int) -> float:
    import aio_pika

    conn = await aio_pika.connect(aio_pika_url())
    channel = await conn.channel(publisher_confirms=True)
    exchange = await channel.declare_exchange(EXCHANGE, aio_pika.ExchangeType.TOPIC, durable=True)
    items = bodies(count + 1)

    def message(body: bytes) -> aio_pika.Message:
        return aio_pika.Message(
            body, delivery_mode=aio_pika.DeliveryMode.PERSISTENT, content_type="application/json"
        )

    await exchange.publish(message(items[0]), queue, mandatory=True)
    start = time.perf_counter()
    rest = items[1:]
    for i in range(0, len(rest), in_flight):
        await asyncio.gather(
            *(exchange.publish(message(b), queue, mandatory=True) for b in rest[i : i + in_flight])
        )
    elapsed = time.perf_counter() - start
    await conn.close()
    return elapsed


def aio_pika_url() -> str:
    from .common import URL

    return URL


async def aiopika_one(queue: str, count: int) -> float:
    return await _aiopika(queue, count, 1)


async def aiopika_many(queue: str, count: int) -> float:
    return await _aiopika(queue, count, IN_FLIGHT)


# -- workerkit ---------------------------------------------------------------------------------


def _sync_publisher(queue: str, count: int, threads: int) -> float:
    from workerkit import Publisher

    items = documents(count + 1)
    publisher = Publisher(settings=settings())
    publisher.publish(queue, items[0])
    share = [items[1 + t :: threads] for t in range(threads)]

    def publish_all(part: list[dict[str, Any]]) -> None:
        for doc in part:
            publisher.publish(queue, doc)

    start = time.perf_counter()
    if threads == 1:
        publish_all(share[0])
    else:
        with concurrent.futures.ThreadPoolExecutor(threads) as pool:
            list(pool.map(publish_all, share))
    elapsed = time.perf_counter() - start
    publisher.close()
    return elapsed


def wk_publisher_1(queue: str, count: int) -> float:
    return _sync_publisher(queue, count, 1)


def wk_publisher_8(queue: str, count: int) -> float:
    return _sync_publisher(queue, count, THREADS)


def wk_publish_many(queue: str, count: int) -> float:
    from workerkit import Publisher

    items = documents(count + 1)
    publisher = Publisher(settings=settings())
    publisher.publish(queue, items[0])
    start = time.perf_counter()
    publisher.publish_many([(queue, doc) for doc in items[1:]])
    elapsed = time.perf_counter() - start
    publisher.close()
    return elapsed


async def _async_publisher(queue: str, count: int, in_flight: int) -> float:
    from workerkit import AsyncPublisher

    items = documents(count + 1)
    async with AsyncPublisher(settings=settings()) as publisher:
        await publisher.publish(queue, items[0])
        start = time.perf_counter()
        rest = items[1:]
        for i in range(0, len(rest), in_flight):
            await asyncio.gather(*(publisher.publish(queue, d) for d in rest[i : i + in_flight]))
        return time.perf_counter() - start


async def wk_async_one(queue: str, count: int) -> float:
    return await _async_publisher(queue, count, 1)


async def wk_async_many(queue: str, count: int) -> float:
    return await _async_publisher(queue, count, IN_FLIGHT)


# -- driver ------------------------------------------------------------------------------------

CASES: dict[str, Callable[[str, int], Any]] = {
    "pika_blocking": pika_blocking,
    "aiopika_one": aiopika_one,
    "aiopika_many": aiopika_many,
    "wk_publisher_1": wk_publisher_1,
    "wk_publisher_8": wk_publisher_8,
    "wk_publish_many": wk_publish_many,
    "wk_async_one": wk_async_one,
    "wk_async_many": wk_async_many,
}


def measure(case: str, count: int) -> dict[str, Any]:
    queue = queue_name(f"pub-{case}")
    declare_raw_queue(queue, bind_exchange=EXCHANGE)
    try:
        outcome = CASES[case](queue, count)
        seconds = asyncio.run(outcome) if asyncio.iscoroutine(outcome) else outcome
        conn, channel = blocking_channel()
        depth = channel.queue_declare(queue, passive=True).method.message_count
        conn.close()
    finally:
        delete_queues(queue)
    if depth != count + 1:
        raise RuntimeError(f"{case}: the queue holds {depth} of {count + 1} confirmed messages")
    return {"case": case, "count": count, "seconds": seconds, "rate": count / seconds}


def main() -> None:
    logging.basicConfig(level=logging.WARNING)
    report(**measure(sys.argv[1], int(sys.argv[2])))


if __name__ == "__main__":
    main()
