"""Request/reply round trips, and compression on the wire.

``python -m benchmarks.request KIND CALLERS COUNT`` starts a responder subprocess for KIND and
makes COUNT requests from CALLERS concurrent callers in this process, then reports round trips
per second and the p50/p99 round-trip latency in ms. Each KIND is a whole stack, caller and
responder, over RabbitMQ's direct reply-to on a quorum queue:

* ``wk``: workerkit's sync ``Publisher.request`` from CALLERS threads sharing one publisher (one
  connection, one reply consumer; each request confirmed and mandatory), answered by a
  workerkit ``Worker`` whose ``handle`` returns the body (``dict``).
* ``pika``: raw pika, one ``BlockingConnection`` per calling thread consuming
  ``amq.rabbitmq.reply-to`` (requests published without confirms, as a raw caller does),
  answered by a raw pika consumer (ack each, reply on the default exchange).
* ``faststream``: FastStream's ``await broker.request(...)`` from CALLERS tasks on one broker,
  answered by a FastStream subscriber returning the body.

``python -m benchmarks.request compress CODEC COUNT`` publishes COUNT copies of a realistic
20 KB JSON document (an order with 170 line items) through workerkit's ``Publisher`` with
``compression=CODEC`` (``none``, ``gzip``, ``zstd``) and reports confirmed msg/s and the body
bytes each message puts on the wire.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import statistics
import subprocess
import sys
import threading
import time
import uuid
from typing import Any

from .common import (
    EXCHANGE,
    URL,
    declare_raw_queue,
    delete_queues,
    queue_name,
    report,
    settings,
)

KINDS = ("wk", "pika", "faststream")
CODECS = ("none", "gzip", "zstd")
WARMUP = 20  # round trips per caller before the clock starts
DIRECT_REPLY_TO = "amq.rabbitmq.reply-to"


def body(i: int) -> dict[str, Any]:
    return {"n": i, "sku": "A1", "quantity": 3}


# -- responders (a subprocess each) ---------------------------------------------------------------


def serve_wk(queue: str) -> None:
    from workerkit import Runner, Worker

    qname = queue

    class Echo(Worker):
        queue = qname
        concurrency = 64

        async def handle(self, request: dict[str, Any]) -> dict[str, Any]:
            return request

    async def main() -> None:
        runner = Runner([Echo], settings=settings(), handle_signals=True)
        task = asyncio.create_task(runner.run())
        await runner.wait_ready()
        print("READY", flush=True)
        await task

    asyncio.run(main())


def serve_pika(queue: str) -> None:
    import pika

    declare_raw_queue(queue)
    conn = pika.BlockingConnection(pika.URLParameters(URL))
    ch = conn.channel()
    ch.basic_qos(prefetch_count=100)

    def on_request(ch: Any, method: Any, props: Any, payload: bytes) -> None:
        reply = pika.BasicProperties(
            correlation_id=props.correlation_id, content_type="application/json"
        )
        ch.basic_publish("", props.reply_to, payload, reply)
        ch.basic_ack(method.delivery_tag)

    ch.basic_consume(queue, on_request)
    print("READY", flush=True)
    ch.start_consuming()


def serve_faststream(queue: str) -> None:
    from faststream.rabbit import QueueType, RabbitBroker, RabbitQueue

    broker = RabbitBroker(URL, logger=None)

    # The same declaration as x-queue-type=quorum in the arguments, the way faststream types it.
    @broker.subscriber(RabbitQueue(queue, queue_type=QueueType.QUORUM, durable=True))
    async def echo(request: dict[str, Any]) -> dict[str, Any]:
        return request

    async def main() -> None:
        await broker.start()
        print("READY", flush=True)
        await asyncio.Event().wait()

    asyncio.run(main())


# -- callers -----------------------------------------------------------------------------------


def call_wk(queue: str, callers: int, count: int) -> list[float]:
    from workerkit import Publisher

    publisher = Publisher(settings=settings())
    try:
        return _threads(callers, count, lambda: lambda i: publisher.request(queue, body(i)))
    finally:
        publisher.close()


def call_pika(queue: str, callers: int, count: int) -> list[float]:
    import pika

    def caller() -> Any:
        conn = pika.BlockingConnection(pika.URLParameters(URL))
        ch = conn.channel()
        replies: dict[str, bytes] = {}

        def on_reply(_ch: Any, _method: Any, props: Any, payload: bytes) -> None:
            replies[props.correlation_id] = payload

        ch.basic_consume(DIRECT_REPLY_TO, on_reply, auto_ack=True)

        def call(i: int) -> Any:
            corr = uuid.uuid4().hex
            props = pika.BasicProperties(
                reply_to=DIRECT_REPLY_TO,
                correlation_id=corr,
                content_type="application/json",
                delivery_mode=2,
            )
            ch.basic_publish("", queue, json.dumps(body(i)).encode(), props)
            while corr not in replies:
                conn.process_data_events(time_limit=1)
            return json.loads(replies.pop(corr))

        return call

    return _threads(callers, count, caller)


def _threads(callers: int, count: int, make_call: Any) -> list[float]:
    """Round-trip times of ``count`` calls made by ``callers`` threads (after a warm-up)."""
    per = max(1, count // callers)
    samples: list[list[float]] = [[] for _ in range(callers)]
    start = threading.Barrier(callers + 1)

    def run(index: int) -> None:
        call = make_call()
        for i in range(WARMUP):
            call(i)
        start.wait()
        own = samples[index]
        for i in range(per):
            began = time.perf_counter()
            reply = call(i)
            own.append(time.perf_counter() - began)
            assert reply["n"] == i, reply

    threads = [threading.Thread(target=run, args=(k,)) for k in range(callers)]
    for thread in threads:
        thread.start()
    start.wait()
    for thread in threads:
        thread.join()
    return [s for own in samples for s in own]


def call_faststream(queue: str, callers: int, count: int) -> list[float]:
    from faststream.rabbit import RabbitBroker

    async def main() -> list[float]:
        broker = RabbitBroker(URL, logger=None)
        await broker.connect()
        per = max(1, count // callers)

        async def call(i: int) -> None:
            reply = await broker.request(body(i), queue=queue, timeout=30)
            assert json.loads(reply.body)["n"] == i

        async def caller() -> list[float]:
            for i in range(WARMUP):
                await call(i)
            own = []
            for i in range(per):
                began = time.perf_counter()
                await call(i)
                own.append(time.perf_counter() - began)
            return own

        try:
            results = await asyncio.gather(*(caller() for _ in range(callers)))
        finally:
            await broker.stop()
        return [s for own in results for s in own]

    return asyncio.run(main())


CALLERS = {"wk": call_wk, "pika": call_pika, "faststream": call_faststream}


def measure(kind: str, callers: int, count: int) -> dict[str, Any]:
    queue = queue_name(f"rr-{kind}")
    server = subprocess.Popen(
        [sys.executable, "-m", "benchmarks.request", "--serve", kind, queue],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert server.stdout is not None
        line = server.stdout.readline()
        if line.strip() != "READY":
            raise RuntimeError(f"{kind} responder did not start: {line!r}")
        began = time.perf_counter()
        samples = CALLERS[kind](queue, callers, count)
        elapsed = time.perf_counter() - began
    finally:
        server.terminate()
        try:
            server.wait(15)
        except subprocess.TimeoutExpired:
            server.kill()
        delete_queues(queue, f"{queue}.dlq")
    cuts = statistics.quantiles(samples, n=100, method="inclusive") if len(samples) > 1 else []
    return {
        "case": kind,
        "callers": callers,
        "count": len(samples),
        # The warm-up calls are outside ``elapsed``'s window only roughly: rate from samples.
        "rate": len(samples) / max(sum(samples) / callers, 1e-9),
        "wall_rate": len(samples) / elapsed,
        "p50": (cuts[49] if cuts else samples[0]) * 1000,
        "p99": (cuts[98] if cuts else samples[0]) * 1000,
    }


# -- compression -------------------------------------------------------------------------------


def document() -> dict[str, Any]:
    """An order of about 20 KB of JSON: repetitive keys, varied values (as real data is)."""
    rng = random.Random(7)
    words = ["steel", "bolt", "washer", "blue", "large", "pack", "kit", "spare", "metric"]
    items = [
        {
            "sku": f"SKU-{rng.randrange(100000):06d}",
            "name": " ".join(rng.choice(words) for _ in range(3)),
            "quantity": rng.randrange(1, 50),
            "unit_price_cents": rng.randrange(100, 100000),
            "warehouse": rng.choice(["AMS-1", "FRA-2", "DUB-1"]),
            "gift": rng.random() < 0.1,
        }
        for _ in range(170)
    ]
    return {"order_id": 123456, "customer": {"id": 987, "email": "a@b.example"}, "items": items}


def compress_case(codec: str, count: int) -> dict[str, Any]:
    from workerkit import Publisher

    queue = queue_name(f"comp-{codec}")
    declare_raw_queue(queue, bind_exchange=EXCHANGE)
    doc = document()
    raw_size = len(json.dumps(doc, separators=(",", ":")))
    publisher = Publisher(settings=settings(), compression=codec)  # type: ignore[arg-type]
    try:
        publisher.publish(queue, doc)  # connect outside the clock
        core = publisher._core
        assert core is not None
        wire = len(core.message(queue, doc).body)
        began = time.perf_counter()
        publisher.publish_many((queue, doc) for _ in range(count))
        elapsed = time.perf_counter() - began
    finally:
        publisher.close()
        delete_queues(queue)
    return {
        "case": codec,
        "rate": count / elapsed,
        "body_bytes": raw_size,
        "wire_bytes": wire,
        "mb_per_s": count * wire / elapsed / 1e6,
    }


def main() -> None:
    logging.basicConfig(level=logging.WARNING)
    if sys.argv[1] == "--serve":
        {"wk": serve_wk, "pika": serve_pika, "faststream": serve_faststream}[sys.argv[2]](
            sys.argv[3]
        )
    elif sys.argv[1] == "compress":
        report(**compress_case(sys.argv[2], int(sys.argv[3])))
    else:
        report(**measure(sys.argv[1], int(sys.argv[2]), int(sys.argv[3])))


if __name__ == "__main__":
    main()
