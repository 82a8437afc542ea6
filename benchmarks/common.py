"""What every benchmark case shares: the broker URL, names, payloads, pre-loading, results.

Each case runs in its own subprocess and reports one ``RESULT {json}`` line on stdout, so that
one client's imports, threads and garbage never slow another one down.
"""

from __future__ import annotations

import json
import os
import sys
import time
import uuid
from typing import Any

import pika


def _broker_url() -> str:
    """WORKERKIT_BENCH_URL, else the local broker.

    workerkit's Settings refuses unknown ``WORKERKIT_*`` variables, so the URL moves to a
    variable of its own before any Settings is built (subprocesses inherit the moved one).
    """
    url = os.environ.pop("WORKERKIT_BENCH_URL", None) or os.environ.get("BENCH_BROKER_URL")
    os.environ["BENCH_BROKER_URL"] = url or "amqp://guest:guest@127.0.0.1:5672/"
    return os.environ["BENCH_BROKER_URL"]


URL = _broker_url()
EXCHANGE = "wkbench"  # workerkit's exchange (and delay layout) for benchmark workers
PREFETCH = 100
PAYLOAD_SIZE = 100
QUORUM = {"x-queue-type": "quorum"}


def queue_name(case: str) -> str:
    return f"bench.{case.replace('_', '-')}.{uuid.uuid4().hex[:8]}"


def payload(i: int, sent_at: float | None = None, size: int = PAYLOAD_SIZE) -> bytes:
    """A persistent-message body: JSON, padded to about ``size`` bytes."""
    doc: dict[str, Any] = {"order_id": i, "email": "customer@example.com"}
    if sent_at is not None:
        doc["ts"] = sent_at
    raw = json.dumps(doc, separators=(",", ":"))
    pad = max(0, size - len(raw) - len(',"note":""'))
    doc["note"] = "x" * pad
    return json.dumps(doc, separators=(",", ":")).encode()


def settings(**overrides: Any) -> Any:
    from workerkit.settings import Settings

    # The memory budget stays on at its default (256 MiB); max_body_size says what these
    # workloads send (at most 1 MB bodies), so a prefetch of up to 128 is not capped. The wide
    # profile declares smaller bodies to get its 1000 (see consume.py).
    values = {"url": URL, "exchange": EXCHANGE, "max_body_size": 2 * 1024 * 1024, **overrides}
    return Settings(**values)


def blocking_channel() -> tuple[pika.BlockingConnection, Any]:
    conn = pika.BlockingConnection(pika.URLParameters(URL))
    return conn, conn.channel()


def declare_raw_queue(name: str, bind_exchange: str | None = None) -> None:
    """A fresh durable quorum queue (optionally bound to ``bind_exchange`` by its own name)."""
    conn, ch = blocking_channel()
    try:
        ch.queue_declare(name, durable=True, arguments=QUORUM)
        if bind_exchange:
            ch.exchange_declare(bind_exchange, "topic", durable=True)
            ch.queue_bind(name, bind_exchange, routing_key=name)
    finally:
        conn.close()


def declare_worker_queue(worker: type) -> None:
    """The worker's queue exactly as its runner declares it (quorum, DLQ, bindings)."""
    declare_worker_queues([worker])


def declare_worker_queues(workers: list[type]) -> None:
    """Every worker's queues exactly as a runner declares them, over one connection.

    The exchange and its 28-level delay layout are declared only when missing: declaring them
    again takes seconds on a loaded machine, and the runner declares them anyway.
    """
    import asyncio

    from workerkit.topology import Topology
    from workerkit.transport.pika_asyncio import PikaTransport

    topology = Topology(settings())
    layout = exchanges_exist(topology.exchange, topology.delay_out, topology.unroutable)

    async def declare() -> None:
        conn = await PikaTransport().connect(settings(), name="bench-declare", on_lost=print)
        try:
            await topology.adopt_dead_letter_queues(conn, workers)
            channel = await conn.channel()
            if not layout:
                await topology.declare_exchanges(channel)
            await topology.declare_queues(channel, workers)
        finally:
            await conn.close()

    asyncio.run(declare())


def exchanges_exist(*names: str) -> bool:
    conn, ch = blocking_channel()
    try:
        for name in names:
            ch.exchange_declare(name, passive=True)
        return True
    except pika.exceptions.ChannelClosedByBroker:
        return False
    finally:
        if conn.is_open:
            conn.close()


def preload(
    queue: str,
    count: int,
    exchange: str = "",
    size: int = PAYLOAD_SIZE,
    headers: dict[str, Any] | None = None,
) -> None:
    """Put ``count`` persistent JSON messages in ``queue`` and wait until the broker holds them.

    Publishes without confirms for speed, then polls the queue depth, so a lost message shows up
    as a timeout rather than as a shorter run. ``headers``: the same on every message.
    """
    preload_many({queue: count}, exchange, size, headers)


def preload_many(
    counts: dict[str, int],
    exchange: str = "",
    size: int = PAYLOAD_SIZE,
    headers: dict[str, Any] | None = None,
) -> None:
    """:func:`preload` for several queues over one connection (routing key = queue name)."""
    conn, ch = blocking_channel()
    props = pika.BasicProperties(delivery_mode=2, content_type="application/json", headers=headers)
    try:
        for queue, count in counts.items():
            for i in range(count):
                ch.basic_publish(exchange, queue, payload(i, size=size), props)
        # Generous for a million-message backlog; a lost message still ends as an error.
        deadline = time.monotonic() + 120 + sum(counts.values()) / 5000
        for queue, count in counts.items():
            while True:
                depth = ch.queue_declare(queue, passive=True).method.message_count
                if depth == count:
                    break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"preload: {queue} holds {depth} of {count} messages")
                conn.sleep(0.05)
    finally:
        conn.close()


def delete_queues(*names: str) -> None:
    conn, ch = blocking_channel()
    try:
        for name in names:
            ch.queue_delete(name)
    finally:
        conn.close()


def report(**result: Any) -> None:
    """The one line the orchestrator reads."""
    sys.stdout.write("RESULT " + json.dumps(result) + "\n")
    sys.stdout.flush()
