"""End-to-end latency at a fixed publish rate: publish timestamp in the body -> handler start.

``python -m benchmarks.latency KIND RATE SECONDS`` starts a consumer subprocess (KIND ``wk`` or
``aiopika``), waits until it consumes, publishes RATE msg/s for SECONDS from this process with
pika (the same publisher for both kinds), and reports the consumer's p50/p95/p99 in ms.
"""

from __future__ import annotations

import asyncio
import json
import logging
import statistics
import subprocess
import sys
import time
from typing import Any

from .common import (
    EXCHANGE,
    PREFETCH,
    QUORUM,
    URL,
    blocking_channel,
    declare_raw_queue,
    delete_queues,
    payload,
    queue_name,
    report,
    settings,
)

WARMUP = 50  # first samples dropped: connection and code paths warming up


def percentiles(samples: list[float]) -> dict[str, float]:
    cuts = statistics.quantiles(samples, n=100, method="inclusive")
    return {"p50": cuts[49] * 1000, "p95": cuts[94] * 1000, "p99": cuts[98] * 1000}


# -- consumer side (a subprocess) ----------------------------------------------------------------


async def consume_aiopika(queue: str, count: int, samples: list[float]) -> None:
    import aio_pika

    conn = await aio_pika.connect(URL)
    channel = await conn.channel()
    await channel.set_qos(prefetch_count=PREFETCH)
    q = await channel.declare_queue(queue, durable=True, arguments=QUORUM)
    done = asyncio.get_running_loop().create_future()

    async def on_message(message: Any) -> None:
        samples.append(time.time() - json.loads(message.body)["ts"])
        last = len(samples) == count
        await message.ack()
        if last:
            done.set_result(None)

    await q.consume(on_message)
    print("READY", flush=True)
    await done
    await conn.close()


async def consume_workerkit(queue: str, count: int, samples: list[float]) -> None:
    from workerkit import Worker
    from workerkit.runner import Runner

    stop: list[Runner] = []
    qname = queue

    class Timed(Worker):
        queue = qname

        async def handle(self, body: dict) -> None:  # type: ignore[type-arg]
            samples.append(time.time() - body["ts"])
            if len(samples) == count:
                # Let the ack of this last message go out before the runner drains.
                asyncio.get_running_loop().call_later(0.2, stop[0].stop)

    runner = Runner([Timed], settings=settings())
    stop.append(runner)
    task = asyncio.create_task(runner.run())
    await runner.wait_ready()
    print("READY", flush=True)
    await task


def consumer_main(kind: str, queue: str, count: int) -> None:
    samples: list[float] = []
    if kind == "wk":
        asyncio.run(consume_workerkit(queue, count, samples))
    else:
        asyncio.run(consume_aiopika(queue, count, samples))
    report(kind=kind, count=len(samples), **percentiles(samples[WARMUP:]))


# -- publisher side ----------------------------------------------------------------------------


def publish_paced(queue: str, rate: float, count: int) -> float:
    """Publish ``count`` messages at ``rate`` msg/s; returns the rate actually achieved."""
    import pika

    conn, channel = blocking_channel()
    props = pika.BasicProperties(delivery_mode=2, content_type="application/json")
    start = time.perf_counter()
    for i in range(count):
        due = start + i / rate
        wait = due - time.perf_counter()
        if wait > 0:
            time.sleep(wait)
        channel.basic_publish(EXCHANGE, queue, payload(i, sent_at=time.time()), props)
    achieved = count / max(time.perf_counter() - start, 1e-9)
    conn.close()
    return achieved


def measure(kind: str, rate: float, seconds: float) -> dict[str, Any]:
    count = int(rate * seconds)
    queue = queue_name(f"lat-{kind}")
    if kind == "aiopika":
        declare_raw_queue(queue, bind_exchange=EXCHANGE)
    child = subprocess.Popen(
        [sys.executable, "-m", "benchmarks.latency", "--consumer", kind, queue, str(count)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None
        line = child.stdout.readline()
        if line.strip() != "READY":
            raise RuntimeError(f"latency consumer {kind} did not start: {line!r}")
        achieved = publish_paced(queue, rate, count)
        out, _ = child.communicate(timeout=seconds + 60)
    finally:
        if child.poll() is None:
            child.kill()
        delete_queues(queue, f"{queue}.dlq")
    result = json.loads(out.strip().splitlines()[-1].removeprefix("RESULT "))
    return {"case": kind, "rate": rate, "achieved": achieved, **result}


def main() -> None:
    logging.basicConfig(level=logging.WARNING)
    if sys.argv[1] == "--consumer":
        consumer_main(sys.argv[2], sys.argv[3], int(sys.argv[4]))
    else:
        report(**measure(sys.argv[1], float(sys.argv[2]), float(sys.argv[3])))


if __name__ == "__main__":
    main()
