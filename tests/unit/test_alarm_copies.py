"""Copies under a memory alarm on the in-memory broker (issue 9, item 4): nothing is sent while
the publish connection is blocked, and a copy still pending is not sent a second time when its
original, given back at the end of its lease, fails again."""

from __future__ import annotations

import asyncio
import gc
import uuid
from typing import Any

import pytest

from workerkit import RetryPolicy, Settings, Worker
from workerkit.copies import Copies, identity
from workerkit.errors import PublishTimeout, Unroutable
from workerkit.message import Header, Message, Outgoing, Properties
from workerkit.testing import in_memory, memory_publisher, running, wait_for
from workerkit.transport.memory import MemoryBroker, MemoryTransport
from workerkit.transport.specs import QueueSpec

EXCHANGE = "wka"


def settings(**overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "exchange": EXCHANGE,
        "shutdown_grace": 1.0,
        "publish_timeout": 0.3,
        # A lease of 0.95 s: under the alarm each delivery is given back and comes again.
        "broker_consumer_timeout": 1.0,
        "handler_timeout": 0.1,
        "reconnect_max_delay": 0.2,
    }
    values.update(overrides)
    return Settings(**values)


def qname(label: str) -> str:
    return f"unit.{label}.{uuid.uuid4().hex[:8]}"


async def test_a_failing_message_under_a_long_alarm_is_dead_lettered_once() -> None:
    broker = MemoryBroker()
    queue = qname("alarm")
    runs: list[int] = []

    async def handle(self: Any, body: bytes, message: Message) -> None:
        runs.append(message.attempt)
        raise RuntimeError("always")

    policy = RetryPolicy(max_attempts=2, delay=0.05, jitter=0.0)
    cls = type("AlarmW", (Worker,), {"queue": queue, "handle": handle, "retry": policy})
    runner, _ = in_memory([cls], broker=broker, settings=settings())
    async with running(runner):
        async with memory_publisher(broker, settings()) as publisher:
            await publisher.publish(queue, b"x", message_id="m1")
            broker.set_alarm(True)
            # Its attempt-1 retry copy is held; the lease ends, it goes back and runs again.
            await wait_for(lambda: runs.count(1) >= 3, 10, "attempt 1 given back twice")
            publish_conn = next(c for c in broker.connections if c.name == "workerkit-publish")
            assert publish_conn.blocked
            assert len(broker._held) == 1, "a copy was sent again while the first was pending"
            broker.set_alarm(False)
            await wait_for(lambda: len(broker.messages(f"{queue}.dlq")) >= 1, 10, "the DLQ copy")
            await wait_for(lambda: broker.unacked(queue) == 0, 5, "the original acked")
            await asyncio.sleep(0.3)  # the retry delay: a second copy would be out by now
        (dead,) = broker.messages(f"{queue}.dlq")
    assert dead.headers[Header.REASON] == "exhausted"
    assert dead.headers[Header.ATTEMPT] == 2
    assert runs.count(2) == 1, runs


async def test_nothing_is_sent_on_a_blocked_connection() -> None:
    broker = MemoryBroker()
    conn = await MemoryTransport(broker).connect(settings(), name="p", on_lost=lambda _e: None)
    channel = await conn.channel(confirms=True)
    await channel.declare_queue(QueueSpec("q1", {}))
    copies = Copies(keep=5.0)
    broker.set_alarm(True)
    with pytest.raises(PublishTimeout, match="stays pending"):
        await copies.publish(conn, channel, _copy("a", b"1"), 0.05)
    assert conn.blocked and len(broker._held) == 1  # sent, then the broker blocked it
    with pytest.raises(PublishTimeout, match="not sent"):
        await copies.publish(conn, channel, _copy("b", b"2"), 0.05)
    assert len(broker._held) == 1
    # The first, wanted again while pending (its original came back): joined, not resent.
    waiting = asyncio.ensure_future(copies.publish(conn, channel, _copy("a", b"1"), 2.0))
    await asyncio.sleep(0.05)
    assert not waiting.done() and len(broker._held) == 1
    broker.set_alarm(False)
    await waiting  # confirmed with the first
    assert [m.message_id for m in broker.messages("q1")] == ["a"]
    # Answered after a wait in vain: remembered, so a late original finds it confirmed.
    await copies.publish(conn, channel, _copy("a", b"1"), 0.5)
    assert [m.message_id for m in broker.messages("q1")] == ["a"]
    # Another message with the same id (another body) gets a copy of its own.
    await copies.publish(conn, channel, _copy("a", b"other"), 0.5)
    assert [m.body for m in broker.messages("q1")] == [b"1", b"other"]
    await conn.close()


def test_identity_ignores_the_jittered_delay_of_a_retry() -> None:
    headers = {Header.QUEUE: "orders", Header.ATTEMPT: 2}
    one = Outgoing(
        "wka.delay.9", "retry.0.1.orders", b"x", Properties(message_id="m", headers=headers)
    )
    # Another jitter, another highest bit: it enters the delay layout one level lower.
    two = Outgoing(
        "wka.delay.08", "retry.1.0.orders", b"x", Properties(message_id="m", headers=headers)
    )
    later = Outgoing(
        "wka.delay.9",
        "retry.1.0.orders",
        b"x",
        Properties(message_id="m", headers={**headers, Header.ATTEMPT: 3}),
    )
    assert identity(one) == identity(two) != identity(later)
    dead = Outgoing("", "orders.dlq", b"x", Properties(message_id="m", headers=headers))
    assert identity(dead) != identity(one)
    assert identity(Outgoing("", "q", b"x", Properties(headers={}))) is None


def _copy(message_id: str, body: bytes) -> Outgoing:
    return Outgoing("", "q1", body, Properties(message_id=message_id, headers={Header.ATTEMPT: 1}))


async def test_a_refused_copy_does_not_keep_its_body_alive() -> None:
    """The refusal is raised through the wait: its traceback must not hold the pending entry
    (whose future holds the refusal), or the copy's body lives until the GC runs."""
    broker = MemoryBroker()
    conn = await MemoryTransport(broker).connect(settings(), name="p", on_lost=lambda _e: None)
    copies = Copies()
    gc.collect()
    gc.disable()
    try:
        channel = await conn.channel(confirms=True)
        for n in range(3):
            refused = Outgoing(
                "",
                "no-such-queue",
                b"refused-body",
                Properties(message_id=f"r{n}", headers={Header.ATTEMPT: 1}),
            )
            with pytest.raises(Unroutable):
                await copies.publish(conn, channel, refused, 1.0)
            del refused
        await asyncio.sleep(0)
        alive = [
            o for o in gc.get_objects() if isinstance(o, Outgoing) and o.body == b"refused-body"
        ]
        assert alive == [], f"{len(alive)} refused copies still alive"
    finally:
        gc.enable()
    await conn.close()
