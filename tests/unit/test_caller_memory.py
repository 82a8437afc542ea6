"""Request/reply on the memory transport: the same caller, no RabbitMQ (users' tests run here)."""

from __future__ import annotations

import asyncio
import concurrent.futures
from typing import Any

import pytest

from workerkit import (
    ConnectionFailed,
    Publisher,
    Reject,
    RemoteError,
    RequestTimeout,
    Settings,
    Unroutable,
    Worker,
)
from workerkit.errors import TopologyError
from workerkit.message import Outgoing, Properties
from workerkit.reply import DIRECT_REPLY_TO
from workerkit.testing import in_memory, memory_publisher, running, wait_for
from workerkit.transport.memory import MemoryBroker, MemoryTransport
from workerkit.transport.specs import QueueSpec

SETTINGS = Settings(exchange="wkm", publish_timeout=5.0)


class Pricing(Worker):
    queue = "pricing.quote"

    async def handle(self, body: dict[str, Any]) -> Any:
        if body.get("reject"):
            raise Reject("no such sku")
        if body.get("slow"):
            await asyncio.sleep(body["slow"])
        return {"sku": body["sku"], "price": 7}


async def test_async_request_on_the_memory_broker() -> None:
    runner, broker = in_memory([Pricing], settings=SETTINGS)
    async with running(runner), memory_publisher(broker, SETTINGS) as pub:
        assert await pub.request("pricing.quote", {"sku": "A"}, timeout=5) == {
            "sku": "A",
            "price": 7,
        }
        with pytest.raises(RemoteError, match="no such sku"):
            await pub.request("pricing.quote", {"sku": "A", "reject": True}, timeout=5)
        with pytest.raises(Unroutable):
            await pub.request("nobody.home", {"sku": "A"}, timeout=5)
        with pytest.raises(RequestTimeout):
            await pub.request("pricing.quote", {"sku": "A", "slow": 0.5}, timeout=0.1)
        await wait_for(lambda: pub.replies_dropped == 1, 5, "the late reply dropped")
        answers = await asyncio.gather(
            *(pub.request("pricing.quote", {"sku": str(i)}, timeout=5) for i in range(50))
        )
        assert [a["sku"] for a in answers] == [str(i) for i in range(50)]


async def test_lost_connection_fails_pending_requests_and_new_ones_work() -> None:
    runner, broker = in_memory([Pricing], settings=SETTINGS)
    async with running(runner), memory_publisher(broker, SETTINGS) as pub:
        pending = asyncio.ensure_future(
            pub.request("pricing.quote", {"sku": "P", "slow": 1.0}, timeout=10)
        )
        requests = pub._core._requests
        await wait_for(lambda: any(r.generation > 0 for r in requests.values()), 5, "sent")
        broker.drop_connections()
        with pytest.raises(ConnectionFailed, match="lost while waiting"):
            await pending
        assert await pub.request("pricing.quote", {"sku": "N"}, timeout=5) == {
            "sku": "N",
            "price": 7,
        }


async def test_sync_publisher_many_threads_on_the_memory_broker() -> None:
    runner, broker = in_memory([Pricing], settings=SETTINGS)
    pub = Publisher(settings=SETTINGS, transport=MemoryTransport(broker))

    def ask(i: int) -> list[Any]:
        return [pub.request("pricing.quote", {"sku": f"{i}.{n}"}) for n in range(10)]

    def ask_all() -> list[list[Any]]:
        with concurrent.futures.ThreadPoolExecutor(16) as pool:
            return list(pool.map(ask, range(16)))

    async with running(runner):
        results = await asyncio.to_thread(ask_all)
        # Closed off the broker's loop: a sync close on it would wait for itself.
        await asyncio.to_thread(pub.close)
    for i, answers in enumerate(results):
        assert [a["sku"] for a in answers] == [f"{i}.{n}" for n in range(10)]


async def test_memory_direct_reply_to_follows_rabbitmq_rules() -> None:
    broker = MemoryBroker()
    connection = await MemoryTransport(broker).connect(SETTINGS, name="t", on_lost=print)
    channel = await connection.channel(confirms=True)
    request = Outgoing("", "q", b"x", Properties(reply_to=DIRECT_REPLY_TO))
    with pytest.raises(TopologyError, match="fast reply consumer does not exist"):
        await channel.publish(request, mandatory=False, timeout=1)
    channel = await connection.channel(confirms=True)
    with pytest.raises(TopologyError, match="cannot acknowledge"):
        await channel.consume(DIRECT_REPLY_TO, print, lambda: None)
    channel = await connection.channel(confirms=True)
    got: list[Any] = []
    await channel.declare_queue(QueueSpec("q", {}))
    await channel.consume(DIRECT_REPLY_TO, got.append, lambda: None, no_ack=True)
    await channel.publish(request, mandatory=True, timeout=1)
    [delivered] = broker.messages("q")
    address = delivered.reply_to
    assert address is not None and address.startswith(DIRECT_REPLY_TO + ".")
    # A reply to the address reaches the consumer; once the channel is gone, it is dropped.
    await channel.publish(Outgoing("", address, b"r", Properties()), mandatory=False, timeout=1)
    await wait_for(lambda: len(got) == 1, 5, "the reply")
    assert got[0].body == b"r"
    await channel.close()
    other = await connection.channel(confirms=True)
    with pytest.raises(Unroutable):
        await other.publish(Outgoing("", address, b"r", Properties()), mandatory=True, timeout=1)


async def test_unreachable_broker_and_close_never_leave_a_caller_hanging() -> None:
    from workerkit import PublishError, PublishTimeout

    broker = MemoryBroker()
    broker.connect_error = ConnectionFailed("broker down (test)")
    pub = memory_publisher(broker, SETTINGS)
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(PublishTimeout) as unsent:
        await pub.request("pricing.quote", {"sku": "A"}, timeout=0.3)
    assert loop.time() - started < 2
    # Never sent: the caller hears why (not "no reply", which would blame a worker).
    assert not isinstance(unsent.value, RequestTimeout)
    assert "could not publish" in str(unsent.value) and "broker down (test)" in str(unsent.value)
    assert not pub._core._requests

    broker.connect_error = None
    runner, _ = in_memory([Pricing], broker=broker, settings=SETTINGS)
    async with running(runner):
        waiting = asyncio.ensure_future(
            pub.request("pricing.quote", {"sku": "A", "slow": 1}, timeout=10)
        )
        requests = pub._core._requests
        await wait_for(lambda: any(r.generation > 0 for r in requests.values()), 5, "sent")
        await pub.close()
        with pytest.raises(PublishError, match="closed before the reply"):
            await waiting


async def test_replacing_the_connection_fails_the_requests_waiting_on_it() -> None:
    """The publisher opens a new connection when its channel can no longer publish (a send
    error, a channel retired after a nack): replies to the old channel's address would reach
    nobody, so the requests waiting for them fail at once instead of at their timeout."""
    runner, broker = in_memory([Pricing], settings=SETTINGS)
    async with running(runner), memory_publisher(broker, SETTINGS) as pub:
        core = pub._core
        pending = asyncio.ensure_future(
            pub.request("pricing.quote", {"sku": "P", "slow": 1.0}, timeout=30)
        )
        await wait_for(lambda: any(r.confirmed for r in core._requests.values()), 5, "confirmed")
        assert core._channel is not None
        core._forget(core._channel)  # as after a publish failed with ConnectionFailed
        started = asyncio.get_running_loop().time()
        after = await pub.request("pricing.quote", {"sku": "N"}, timeout=5)
        assert after == {"sku": "N", "price": 7}
        with pytest.raises(ConnectionFailed, match="the channel was replaced"):
            await pending
        assert asyncio.get_running_loop().time() - started < 1  # not the 30 s timeout
