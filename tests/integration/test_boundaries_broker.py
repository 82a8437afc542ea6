"""Issue 9 against the real broker: bad input is a typed error before the network and never
costs the shared connection; copies of foreign messages can always be published; returns are
matched to the publish they belong to; every publish keeps its own deadline."""

from __future__ import annotations

import asyncio
import struct
import time
from collections.abc import Callable, Iterator
from decimal import Decimal
from typing import Any

import pika
import pika.data
import pytest

from workerkit import AsyncPublisher, InvalidMessage, Publisher, Settings, Unroutable
from workerkit import dlq as dlq_tools
from workerkit.errors import PublishError
from workerkit.message import Message, Outgoing, Properties
from workerkit.publisher import refuse_sync_publishes_on
from workerkit.topology import Topology

pytestmark = pytest.mark.integration


@pytest.fixture
def queue(settings: Settings, unique: Callable[[str], str]) -> Iterator[str]:
    """A quorum queue with a DLQ, bound to the test exchange by its own name."""
    name = unique("bound")
    conn = pika.BlockingConnection(pika.URLParameters(settings.url.get_secret_value()))
    ch = conn.channel()
    ch.exchange_declare(settings.exchange, "topic", durable=True)
    ch.queue_declare(name, durable=True, arguments={"x-queue-type": "quorum"})
    ch.queue_declare(Topology.dlq_name(name), durable=True, arguments={"x-queue-type": "quorum"})
    ch.queue_bind(name, settings.exchange, name)
    yield name
    ch.queue_delete(name)
    ch.queue_delete(Topology.dlq_name(name))
    conn.close()


def _get_all(settings: Settings, queue: str) -> list[tuple[Any, bytes]]:
    conn = pika.BlockingConnection(pika.URLParameters(settings.url.get_secret_value()))
    ch = conn.channel()
    out = []
    while True:
        method, props, body = ch.basic_get(queue, auto_ack=True)
        if method is None:
            break
        out.append((props, body))
    conn.close()
    return out


def _foreign_publish(settings: Settings, queue: str, headers: dict[str, Any]) -> None:
    """Publish like a Java/Go/.NET client would: floats as AMQP doubles (pika cannot)."""
    original = pika.data.encode_value

    def with_doubles(pieces: list[bytes], value: Any) -> int:
        if isinstance(value, float):
            pieces.append(struct.pack(">cd", b"d", value))
            return 9
        written: int = original(pieces, value)  # pika is untyped: its encoder returns a size
        return written

    conn = pika.BlockingConnection(pika.URLParameters(settings.url.get_secret_value()))
    try:
        pika.data.encode_value = with_doubles
        conn.channel().basic_publish(
            "", queue, b"{}", pika.BasicProperties(headers=headers, message_id="foreign-1")
        )
    finally:
        pika.data.encode_value = original
        conn.close()


# -- item 3 --------------------------------------------------------------------------------------


async def test_an_unencodable_value_never_costs_the_connection(
    settings: Settings, queue: str
) -> None:
    async with AsyncPublisher(settings=settings) as publisher:
        await publisher.publish(queue, {"n": 1})
        core = publisher._core
        connection, channel = core._connection, core._channel
        started = time.monotonic()
        for bad in ({"f": 1.5}, {"big": 2**64}, {"t": (1, 2)}, {"k" * 256: 1}, {"s": "\udc80"}):
            with pytest.raises(InvalidMessage):
                await publisher.publish(queue, {"n": 2}, headers=bad)
        with pytest.raises(InvalidMessage):
            await publisher.publish(queue, {}, message_id="m" * 256)
        with pytest.raises(InvalidMessage):
            await publisher.publish("é" * 100, {}, delay=1)  # 200 bytes: over the delayed limit
        # The transport itself refuses what slips past (an Outgoing built by hand), still
        # without touching the connection.
        assert channel is not None
        raw = Outgoing(
            settings.exchange, queue, b"{}", Properties(headers={"f": 0.5}, message_id="x")
        )
        with pytest.raises(InvalidMessage, match="encode"):
            await channel.publish(raw, mandatory=True, timeout=5)
        assert time.monotonic() - started < 1.0
        assert core._connection is connection and core._channel is channel
        assert channel.is_open
        await publisher.publish(queue, {"n": 3})
    assert [body for _p, body in _get_all(settings, queue)] == [b'{"n":1}', b'{"n":3}']


async def test_a_foreign_messages_float_headers_survive_a_replay(
    settings: Settings, queue: str
) -> None:
    """Other clients send AMQP doubles. pika (1.3, 1.4) decodes them truncated to an int, so a
    large one arrives as an int above 64 bits, which no client can send back: the copy carries
    it as decimal text. CC must not route the copy anywhere else."""
    dlq = Topology.dlq_name(queue)
    headers = {
        "price": 1.5,
        "huge": 1e300,
        "nested": {"r": [2.5, 7]},
        "CC": [dlq],  # kept, the copy would land back in the DLQ
        "d": Decimal("2.5"),
    }
    _foreign_publish(settings, dlq, headers)
    dead = await dlq_tools.list_dead(queue, settings=settings)
    assert dead[0].headers["price"] == 1  # pika's truncation, not ours
    assert dead[0].headers["huge"] == int(1e300)
    result = await dlq_tools.replay(queue, settings=settings)
    assert result.replayed == ["foreign-1"]
    [(props, _body)] = _get_all(settings, queue)  # exactly one: CC did not copy it anywhere
    props.headers.pop("x-delivery-count", None)  # the quorum queue's own count
    assert props.headers == {
        "price": 1,
        "huge": str(int(1e300)),
        "nested": {"r": [2, 7]},
        "d": Decimal("2.5"),
    }
    assert _get_all(settings, dlq) == []


# -- item 11 -------------------------------------------------------------------------------------


async def test_one_id_in_flight_twice_is_reported_per_publish(
    settings: Settings, queue: str, unique: Callable[[str], str]
) -> None:
    from workerkit import Unroutable

    async with AsyncPublisher(settings=settings) as publisher:
        for _ in range(5):
            results = await asyncio.gather(
                publisher.publish(queue, {"ok": 1}, message_id="same"),
                publisher.publish(unique("nobody"), {"ok": 0}, message_id="same"),
                return_exceptions=True,
            )
            assert results[0] == "same"
            assert isinstance(results[1], Unroutable)
    assert len(_get_all(settings, queue)) == 5


# -- item 13 -------------------------------------------------------------------------------------


async def test_publish_many_stops_at_its_first_error(settings: Settings, queue: str) -> None:
    pulled: list[int] = []

    def items() -> Iterator[tuple[str, object]]:
        for n in range(1_000_000):
            pulled.append(n)
            yield (queue if n != 5 else "x" * 300), {"n": n}

    async with AsyncPublisher(settings=settings) as publisher:
        with pytest.raises(InvalidMessage) as raised:
            await publisher.publish_many(items())
    assert (raised.value.sent, raised.value.unconfirmed) == (5, ())
    assert pulled == list(range(6))
    assert sorted(orjson_n(body) for _p, body in _get_all(settings, queue)) == list(range(5))


@pytest.mark.parametrize("bad", [0, 5, 50])
async def test_publish_many_says_which_items_the_broker_confirmed(
    settings: Settings, queue: str, unique: Callable[[str], str], bad: int
) -> None:
    """An unroutable item is known only when its answer comes, and items after it are on their
    way by then: the error tells what was sent and what was not confirmed, so that the caller
    can send exactly the rest (a new-user check found the docs promised nothing after it)."""
    nobody = unique("nobody")
    items: list[tuple[str, object]] = [
        (nobody if n == bad else queue, {"n": n}) for n in range(bad + 101)
    ]
    async with AsyncPublisher(settings=settings) as publisher:
        with pytest.raises(Unroutable) as raised:
            await publisher.publish_many(items)
    error = raised.value
    assert error.sent is not None and bad < error.sent <= len(items)
    assert error.unconfirmed == (bad,)
    delivered = sorted(orjson_n(body) for _p, body in _get_all(settings, queue))
    confirmed = [n for n in range(error.sent) if n not in error.unconfirmed]
    assert delivered == confirmed
    # What the docs tell a caller to send again completes the batch, without duplicates.
    again = [items[i] for i in error.unconfirmed if i != bad] + items[error.sent :]
    with Publisher(settings=settings) as sync:
        sync.publish_many(again)
    assert len(_get_all(settings, queue)) == len(again)  # the rest, once each


def orjson_n(body: bytes) -> int:
    import orjson

    return int(orjson.loads(body)["n"])


async def test_publish_many_keeps_a_bounded_number_of_tasks(settings: Settings, queue: str) -> None:
    seen: list[int] = []
    done = asyncio.Event()

    async def sample() -> None:
        while not done.is_set():
            seen.append(len(asyncio.all_tasks()))
            await asyncio.sleep(0.001)

    async with AsyncPublisher(settings=settings) as publisher:
        await publisher.connect()
        sampler = asyncio.create_task(sample())
        ids = await publisher.publish_many((queue, n) for n in range(3000))
        done.set()
        await sampler
    assert len(ids) == 3000
    assert max(seen) < 20  # not one task per item (3000)
    assert len(_get_all(settings, queue)) == 3000


def test_the_sync_publisher_refuses_to_block_a_runner_loop(settings: Settings, queue: str) -> None:
    publisher = Publisher(settings=settings)

    async def handler() -> None:
        refuse_sync_publishes_on(asyncio.get_running_loop())
        started = time.monotonic()
        with pytest.raises(PublishError, match="AsyncPublisher"):
            publisher.publish(queue, {"n": 1})
        assert time.monotonic() - started < 0.5

    asyncio.run(handler())
    publisher.close()
    assert _get_all(settings, queue) == []


async def test_the_runner_dead_letters_a_foreign_message_it_could_not_copy_before(
    settings: Settings, unique: Callable[[str], str]
) -> None:
    """A foreign double too wide for 64 bits reaches the handler as a big int (pika's decoding);
    the dead-letter copy must still be published, once, without a reconnect loop."""
    from workerkit import Reject, RetryPolicy, Runner, Worker
    from workerkit.testing import running, wait_for

    q = unique("foreign")
    handled: list[Any] = []

    class Foreign(Worker):
        queue = q
        retry = RetryPolicy(max_attempts=1)

        async def handle(self, body: dict[str, Any], message: Message) -> None:
            handled.append(message.headers.get("huge"))
            raise Reject("no thanks")

    runner = Runner([Foreign], settings=settings)
    try:
        async with running(runner):
            await asyncio.to_thread(_foreign_publish, settings, q, {"huge": 1e300, "CC": [q]})
            await wait_for(lambda: len(handled) >= 1, timeout=10)
            dlq = Topology.dlq_name(q)
            got: list[tuple[Any, bytes]] = []

            async def dead_lettered() -> bool:
                got.extend(await asyncio.to_thread(_get_all, settings, dlq))
                return bool(got)

            deadline = time.monotonic() + 10
            while not await dead_lettered():
                assert time.monotonic() < deadline, "the dead-letter copy was never published"
                await asyncio.sleep(0.05)
            assert runner.reconnects == 0
        assert handled == [int(1e300)]
        [(props, _body)] = got
        assert props.headers["huge"] == str(int(1e300))
        assert "CC" not in props.headers
        assert props.headers["workerkit-reason"] == "rejected"
    finally:
        conn = pika.BlockingConnection(pika.URLParameters(settings.url.get_secret_value()))
        conn.channel().queue_delete(q)
        conn.channel().queue_delete(Topology.dlq_name(q))
        conn.close()
