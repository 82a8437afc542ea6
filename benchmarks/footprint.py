"""Worker start-up time (process start -> consuming) and idle resident memory.

``python -m benchmarks.footprint KIND STARTED`` is started by the orchestrator with STARTED =
its ``time.time()`` just before spawning, so interpreter start and imports are counted. KIND
``wk`` runs a workerkit Runner with one worker, as ``workerkit run`` does; ``aiopika`` is a
hand-written aio-pika consumer. Once consuming, the process idles a moment and reads its RSS.
"""

from __future__ import annotations

import asyncio
import sys
import time

STARTED = float(sys.argv[2]) if len(sys.argv) > 2 else time.time()
IDLE = 2.0  # seconds idle before reading RSS: lets start-up garbage and lazy imports settle
rss_holder: list[int] = []  # RSS read while the consumer is connected and idle


async def aiopika_consumer(queue: str) -> float:
    import aio_pika

    from .common import PREFETCH, QUORUM, URL

    conn = await aio_pika.connect(URL)
    channel = await conn.channel()
    await channel.set_qos(prefetch_count=PREFETCH)
    q = await channel.declare_queue(queue, durable=True, arguments=QUORUM)

    async def on_message(message: aio_pika.abc.AbstractIncomingMessage) -> None:
        await message.ack()

    await q.consume(on_message)
    ready = time.time()
    await asyncio.sleep(IDLE)
    rss_holder.append(rss())
    await conn.close()
    return ready


async def workerkit_consumer(queue: str) -> float:
    from workerkit import Worker
    from workerkit.runner import Runner

    from .common import settings

    qname = queue

    class Idle(Worker):
        queue = qname

        async def handle(self, body: dict) -> None:  # type: ignore[type-arg]
            pass

    runner = Runner([Idle], settings=settings())
    task = asyncio.create_task(runner.run())
    await runner.wait_ready()
    ready = time.time()
    await asyncio.sleep(IDLE)
    rss_holder.append(rss())
    runner.stop()
    await task
    return ready


def rss() -> int:
    import psutil

    return int(psutil.Process().memory_info().rss)


def main() -> None:
    from .common import delete_queues, queue_name, report

    kind = sys.argv[1]
    queue = queue_name(f"idle-{kind}")
    try:
        consumer = workerkit_consumer if kind == "wk" else aiopika_consumer
        ready = asyncio.run(consumer(queue))
    finally:
        delete_queues(queue, f"{queue}.dlq")
    report(case=kind, startup=ready - STARTED, rss_mb=rss_holder[0] / 2**20)


if __name__ == "__main__":
    main()
