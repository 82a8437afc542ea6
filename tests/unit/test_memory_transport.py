"""The in-memory broker behaves like RabbitMQ where workerkit depends on it."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest

from workerkit import Settings, TopologyError, Unroutable
from workerkit.errors import AccessRefused, ConnectionFailed
from workerkit.message import Message, Outgoing, Properties
from workerkit.testing import wait_for
from workerkit.topology import ExchangeSpec, QueueSpec
from workerkit.transport.base import Channel
from workerkit.transport.memory import MemoryBroker, MemoryChannel, MemoryTransport

SETTINGS = Settings()


def out(routing_key: str, body: bytes = b"x", exchange: str = "ex", **headers: Any) -> Outgoing:
    return Outgoing(
        exchange,
        routing_key,
        body,
        Properties(content_type="text/plain", headers=dict(headers), message_id=body.hex()),
    )


@pytest.fixture
def broker() -> MemoryBroker:
    return MemoryBroker()


@pytest.fixture
async def channel(broker: MemoryBroker) -> AsyncIterator[MemoryChannel]:
    conn = await MemoryTransport(broker).connect(SETTINGS, name="t", on_lost=lambda e: None)
    ch = await conn.channel(confirms=True)
    assert isinstance(ch, MemoryChannel)  # the tests read its broker
    await ch.declare_exchange(ExchangeSpec("ex"))
    yield ch
    await conn.close()


async def queue(ch: Channel, name: str, *keys: str, **arguments: Any) -> None:
    await ch.declare_queue(QueueSpec(name, arguments))
    for key in keys:
        await ch.bind_queue(name, "ex", key)


async def bodies(ch: Channel, name: str) -> list[bytes]:
    got = []
    while (message := await ch.get(name)) is not None:
        got.append(message.body)
        ch.ack(message.delivery_tag)
    return got


async def test_topic_routing_and_fifo(channel: MemoryChannel) -> None:
    await queue(channel, "a", "orders.*")
    await queue(channel, "b", "orders.#", "audit")
    for key, body in [("orders.placed", b"1"), ("orders.placed.eu", b"2"), ("audit", b"3")]:
        await channel.publish(out(key, body), mandatory=True, timeout=1)
    assert await bodies(channel, "a") == [b"1"]
    assert await bodies(channel, "b") == [b"1", b"2", b"3"]


async def test_default_exchange_routes_by_queue_name(channel: MemoryChannel) -> None:
    await queue(channel, "direct-q")
    await channel.publish(out("direct-q", b"d", exchange=""), mandatory=True, timeout=1)
    assert await bodies(channel, "direct-q") == [b"d"]


async def test_mandatory_unroutable_raises(channel: MemoryChannel) -> None:
    with pytest.raises(Unroutable, match=r"nobody\.home"):
        await channel.publish(out("nobody.home"), mandatory=True, timeout=1)
    await channel.publish(out("nobody.home"), mandatory=False, timeout=1)  # dropped silently


async def test_publish_to_missing_exchange_closes_the_channel(channel: MemoryChannel) -> None:
    with pytest.raises(TopologyError, match="no exchange"):
        await channel.publish(out("k", exchange="missing"), mandatory=True, timeout=1)
    assert not channel.is_open


async def test_fanout_exchange_bindings_and_alternate(channel: MemoryChannel) -> None:
    await channel.declare_exchange(ExchangeSpec("fan", type="fanout"))
    await channel.declare_exchange(ExchangeSpec("spare", type="fanout"))
    await channel.declare_exchange(
        ExchangeSpec("routed", arguments={"alternate-exchange": "spare"})
    )
    await channel.bind_exchange("fan", "routed", "to.fan")
    await queue(channel, "f1")
    await queue(channel, "f2")
    await queue(channel, "lost-and-found")
    await channel.bind_queue("f1", "fan", "ignored")
    await channel.bind_queue("f2", "fan", "")
    await channel.bind_queue("lost-and-found", "spare", "")
    await channel.publish(out("to.fan", b"1", exchange="routed"), mandatory=True, timeout=1)
    await channel.publish(out("elsewhere", b"2", exchange="routed"), mandatory=True, timeout=1)
    assert await bodies(channel, "f1") == [b"1"]
    assert await bodies(channel, "f2") == [b"1"]
    assert await bodies(channel, "lost-and-found") == [b"2"]


async def test_redeclare_with_other_arguments_names_queue_and_argument(
    broker: MemoryBroker, channel: MemoryChannel
) -> None:
    await queue(channel, "q1", **{"x-queue-type": "quorum", "x-delivery-limit": 5})
    await queue(channel, "q1", **{"x-queue-type": "quorum", "x-delivery-limit": 5})  # same: fine
    with pytest.raises(TopologyError, match=r"'x-delivery-limit' for queue 'q1'.*6.*5"):
        await queue(channel, "q1", **{"x-queue-type": "quorum", "x-delivery-limit": 6})
    assert not channel.is_open  # like PRECONDITION_FAILED on a real broker


async def test_redeclare_exchange_with_other_type(channel: MemoryChannel) -> None:
    with pytest.raises(TopologyError, match="type"):
        await channel.declare_exchange(ExchangeSpec("ex", type="fanout"))


async def test_queue_state_purge_delete(channel: MemoryChannel) -> None:
    await queue(channel, "s", "s")
    for i in range(3):
        await channel.publish(out("s", bytes([i])), mandatory=True, timeout=1)
    assert await channel.queue_state("s") == (3, 0)
    assert await channel.purge("s") == 3
    assert await channel.queue_state("s") == (0, 0)
    await channel.delete_queue("s")
    await channel.delete_queue("s")  # deleting a missing queue is not an error
    with pytest.raises(TopologyError):
        await channel.queue_state("s")


async def collecting(ch: Channel, name: str) -> tuple[list[Message], str]:
    got: list[Message] = []
    tag = await ch.consume(name, got.append, lambda: None)
    return got, tag


async def test_delivery_is_asynchronous_and_limited_by_prefetch(broker: MemoryBroker) -> None:
    conn = await MemoryTransport(broker).connect(SETTINGS, name="t", on_lost=lambda e: None)
    admin = await conn.channel(confirms=True)
    await admin.declare_exchange(ExchangeSpec("ex"))
    await queue(admin, "p", "p")
    consumer = await conn.channel(prefetch=3)
    got, _ = await collecting(consumer, "p")
    for i in range(10):
        await admin.publish(out("p", bytes([i])), mandatory=True, timeout=1)
    await wait_for(lambda: len(got) == 3, 2)
    await asyncio.sleep(0.01)
    assert len(got) == 3  # the prefetch window is full
    assert [m.delivery_tag for m in got] == [1, 2, 3]
    consumer.ack(2, multiple=True)
    await wait_for(lambda: len(got) == 5, 2)
    assert broker.unacked("p") == 3
    assert [m.body for m in got] == [bytes([i]) for i in range(5)]


async def test_nack_requeue_marks_redelivered(channel: MemoryChannel) -> None:
    await queue(channel, "n", "n")
    await channel.publish(out("n", b"once"), mandatory=True, timeout=1)
    first = await channel.get("n")
    assert first is not None and not first.redelivered
    channel.nack(first.delivery_tag, requeue=True)
    again = await channel.get("n")
    assert again is not None and again.redelivered and again.body == b"once"
    assert again.delivery_tag != first.delivery_tag


async def test_closing_a_channel_returns_unacked_messages(broker: MemoryBroker) -> None:
    conn = await MemoryTransport(broker).connect(SETTINGS, name="t", on_lost=lambda e: None)
    admin = await conn.channel(confirms=True)
    await admin.declare_exchange(ExchangeSpec("ex"))
    await queue(admin, "c", "c")
    for i in range(4):
        await admin.publish(out("c", bytes([i])), mandatory=True, timeout=1)
    consumer = await conn.channel(prefetch=10)
    got, _ = await collecting(consumer, "c")
    await wait_for(lambda: len(got) == 4, 2)
    consumer.ack(got[0].delivery_tag)
    await consumer.close()
    messages = broker.messages("c")
    assert [m.body for m in messages] == [b"\x01", b"\x02", b"\x03"]  # order kept
    assert all(m.redelivered for m in messages)


async def test_unknown_delivery_tag_closes_the_channel(
    broker: MemoryBroker, channel: MemoryChannel
) -> None:
    await queue(channel, "u", "u")
    await channel.publish(out("u"), mandatory=True, timeout=1)
    message = await channel.get("u")
    assert message is not None
    channel.ack(message.delivery_tag)
    channel.ack(message.delivery_tag)  # a double ack: RabbitMQ answers PRECONDITION_FAILED
    assert not channel.is_open
    assert broker.channel_errors == ["PRECONDITION_FAILED - unknown delivery tag 1"]


async def test_multiple_ack_needs_an_outstanding_tag(
    broker: MemoryBroker, channel: MemoryChannel
) -> None:
    await queue(channel, "m", "m")
    for _ in range(3):
        await channel.publish(out("m"), mandatory=True, timeout=1)
    tags = [m.delivery_tag for m in [await channel.get("m") for _ in range(3)] if m]
    channel.ack(tags[1])
    channel.ack(tags[1], multiple=True)  # tag 2 is no longer outstanding
    assert broker.channel_errors


async def test_ttl_dead_letters_in_order(channel: MemoryChannel) -> None:
    await queue(channel, "done")
    await queue(
        channel,
        "wait",
        "wait",
        **{"x-message-ttl": 50, "x-dead-letter-exchange": "", "x-dead-letter-routing-key": "done"},
    )
    loop = asyncio.get_running_loop()
    started = loop.time()
    await channel.publish(out("wait", b"late"), mandatory=True, timeout=1)
    assert await channel.queue_state("done") == (0, 0)
    await wait_for(lambda: channel.broker.messages("done") != [], 2)
    assert loop.time() - started >= 0.05
    (dead,) = channel.broker.messages("done")
    assert dead.body == b"late"
    assert dead.headers["x-death"][0]["reason"] == "expired"
    assert dead.headers["x-death"][0]["queue"] == "wait"


async def test_delivery_limit_dead_letters(channel: MemoryChannel) -> None:
    await queue(channel, "poison.dlq")
    await queue(
        channel,
        "poison",
        "poison",
        **{
            "x-delivery-limit": 2,
            "x-dead-letter-exchange": "",
            "x-dead-letter-routing-key": "poison.dlq",
        },
    )
    await channel.publish(out("poison"), mandatory=True, timeout=1)
    for _ in range(3):
        message = await channel.get("poison")
        assert message is not None
        channel.nack(message.delivery_tag, requeue=True)
    assert await channel.get("poison") is None
    (dead,) = channel.broker.messages("poison.dlq")
    assert dead.headers["x-death"][0]["reason"] == "delivery_limit"


async def test_nack_without_requeue_dead_letters(channel: MemoryChannel) -> None:
    await queue(channel, "r.dlq")
    await queue(
        channel, "r", "r", **{"x-dead-letter-exchange": "", "x-dead-letter-routing-key": "r.dlq"}
    )
    await channel.publish(out("r"), mandatory=True, timeout=1)
    message = await channel.get("r")
    assert message is not None
    channel.nack(message.delivery_tag, requeue=False)
    assert [m.headers["x-death"][0]["reason"] for m in channel.broker.messages("r.dlq")] == [
        "rejected"
    ]


async def test_cancel_stops_deliveries_and_deleted_queue_cancels_consumers(
    channel: MemoryChannel,
) -> None:
    await queue(channel, "x", "x")
    got, tag = await collecting(channel, "x")
    await channel.cancel(tag)
    await channel.publish(out("x"), mandatory=True, timeout=1)
    await asyncio.sleep(0.01)
    assert got == [] and await channel.queue_state("x") == (1, 0)
    cancelled: list[bool] = []
    await channel.consume("x", lambda m: None, lambda: cancelled.append(True))
    await channel.delete_queue("x")
    await wait_for(lambda: cancelled == [True], 2)


async def test_drop_connections_fails_channels_and_reports_loss(broker: MemoryBroker) -> None:
    lost: list[Exception] = []
    conn = await MemoryTransport(broker).connect(SETTINGS, name="t", on_lost=lost.append)
    ch = await conn.channel(confirms=True)
    await ch.declare_exchange(ExchangeSpec("ex"))
    await queue(ch, "d", "d")
    await ch.publish(out("d"), mandatory=True, timeout=1)
    assert await ch.get("d") is not None  # unacked when the connection drops
    assert broker.drop_connections() == 1
    assert not conn.is_open and not ch.is_open
    with pytest.raises(ConnectionFailed):
        await ch.publish(out("d"), mandatory=True, timeout=1)
    with pytest.raises(ConnectionFailed):
        await conn.channel()
    await wait_for(lambda: len(lost) == 1, 2)
    assert isinstance(lost[0], ConnectionFailed)
    assert [m.redelivered for m in broker.messages("d")] == [True]


async def test_connect_error(broker: MemoryBroker) -> None:
    broker.connect_error = AccessRefused("refused")
    with pytest.raises(AccessRefused):
        await MemoryTransport(broker).connect(SETTINGS, name="t", on_lost=lambda e: None)
    broker.connect_error = None
    assert (await MemoryTransport(broker).connect(SETTINGS, name="t", on_lost=print)).is_open


async def test_graceful_close_does_not_report_loss(broker: MemoryBroker) -> None:
    lost: list[Exception] = []
    conn = await MemoryTransport(broker).connect(SETTINGS, name="t", on_lost=lost.append)
    await conn.close()
    await asyncio.sleep(0.01)
    assert lost == [] and broker.connections == []
