"""Publisher and AsyncPublisher against the real broker."""

from __future__ import annotations

import asyncio
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator

import orjson
import pika
import pytest
from pydantic import BaseModel

from workerkit import (
    AsyncPublisher,
    MessageTooLarge,
    Publisher,
    PublishTimeout,
    Settings,
    Unroutable,
)

pytestmark = pytest.mark.integration


class Order(BaseModel):
    order_id: int
    email: str


@pytest.fixture
def queue(settings: Settings, unique: Callable[[str], str]) -> Iterator[str]:
    """A queue bound to the test exchange by its own name, deleted afterwards."""
    name = unique("pub")
    conn = pika.BlockingConnection(pika.URLParameters(settings.url.get_secret_value()))
    ch = conn.channel()
    ch.exchange_declare(settings.exchange, "topic", durable=True)
    ch.queue_declare(name, durable=True, arguments={"x-queue-type": "quorum"})
    ch.queue_bind(name, settings.exchange, name)
    yield name
    ch.queue_delete(name)
    conn.close()


def drain(settings: Settings, queue: str) -> list[tuple[pika.BasicProperties, bytes]]:
    """Every message in ``queue`` (acked)."""
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


def test_publish_sets_properties_and_confirms(settings: Settings, queue: str) -> None:
    with Publisher(settings=settings) as publisher:
        mid = publisher.publish(
            queue,
            Order(order_id=7, email="a@b.c"),
            headers={"tenant": "acme"},
            correlation_id="corr-1",
        )
    [(props, body)] = drain(settings, queue)
    assert orjson.loads(body) == {"order_id": 7, "email": "a@b.c"}
    assert props.message_id == mid
    assert props.content_type == "application/json"
    assert props.delivery_mode == 2
    assert props.correlation_id == "corr-1"
    assert props.headers["tenant"] == "acme"
    assert abs(props.timestamp - time.time()) < 60


@pytest.mark.parametrize(
    ("body", "expected_body", "ctype"),
    [
        ({"a": [1, 2]}, b'{"a":[1,2]}', "application/json"),
        ([1, 2], b"[1,2]", "application/json"),
        ("héllo", "héllo".encode(), "text/plain"),
        (b"\x00\xff", b"\x00\xff", "application/octet-stream"),
    ],
)
def test_body_types(
    settings: Settings, queue: str, body: object, expected_body: bytes, ctype: str
) -> None:
    with Publisher(settings=settings) as publisher:
        publisher.publish(queue, body)
    [(props, raw)] = drain(settings, queue)
    assert raw == expected_body
    assert props.content_type == ctype


def test_unroutable_raises(settings: Settings, unique: Callable[[str], str]) -> None:
    with Publisher(settings=settings) as publisher, pytest.raises(Unroutable) as info:
        publisher.publish(unique("nobody-listens"), {"x": 1})
    assert "no queue is bound" in str(info.value)


def test_workerkit_headers_are_refused(settings: Settings, queue: str) -> None:
    with Publisher(settings=settings) as publisher, pytest.raises(ValueError):
        publisher.publish(queue, {}, headers={"workerkit-attempt": 1})


def test_too_large_is_refused_before_sending(settings: Settings, queue: str) -> None:
    small = settings.model_copy(update={"max_body_size": 100})
    with Publisher(settings=small) as publisher, pytest.raises(MessageTooLarge):
        publisher.publish(queue, "x" * 101)
    assert drain(settings, queue) == []


def test_many_threads_each_message_exactly_once(settings: Settings, queue: str) -> None:
    publisher = Publisher(settings=settings)
    ids: list[str] = []
    lock = threading.Lock()

    def produce(thread: int) -> None:
        for i in range(100):
            mid = publisher.publish(queue, {"thread": thread, "i": i})
            with lock:
                ids.append(mid)

    threads = [threading.Thread(target=produce, args=(t,)) for t in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    publisher.close()
    received = drain(settings, queue)
    assert len(ids) == 800
    assert sorted(p.message_id for p, _ in received) == sorted(ids)
    assert {(b["thread"], b["i"]) for b in (orjson.loads(x) for _, x in received)} == {
        (t, i) for t in range(8) for i in range(100)
    }


def test_publish_many(settings: Settings, queue: str) -> None:
    with Publisher(settings=settings) as publisher:
        ids = publisher.publish_many([(queue, {"i": i}) for i in range(500)])
    received = drain(settings, queue)
    assert len(set(ids)) == 500
    assert sorted(p.message_id for p, _ in received) == sorted(ids)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_dead_broker_fails_within_the_bound(settings: Settings) -> None:
    url = f"amqp://guest:guest@127.0.0.1:{_free_port()}/"
    publisher = Publisher(url=url, settings=settings)
    started = time.monotonic()
    with pytest.raises(PublishTimeout):
        publisher.publish("anything", {"x": 1}, timeout=1.5)
    assert time.monotonic() - started < 1.5 + 2.5  # the bound plus scheduling slack
    publisher.close()


def test_password_never_in_errors(settings: Settings) -> None:
    url = f"amqp://guest:s3cr3t-pw@127.0.0.1:{_free_port()}/"
    publisher = Publisher(url=url, settings=settings)
    with pytest.raises(PublishTimeout) as info:
        publisher.publish("anything", {}, timeout=0.5)
    assert "s3cr3t-pw" not in str(info.value)
    assert "s3cr3t-pw" not in repr(publisher.settings)
    publisher.close()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork()")
def test_survives_fork(settings: Settings, queue: str) -> None:
    publisher = Publisher(settings=settings)
    parent_id = publisher.publish(queue, {"who": "parent-before"})
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: the pre-fork connection belongs to the parent
        code = 0
        try:
            mid = publisher.publish(queue, {"who": "child"})
            os.write(write, mid.encode())
        except BaseException:
            code = 1
        os._exit(code)
    os.close(write)
    _, status = os.waitpid(pid, 0)
    child_id = os.read(read, 100).decode()
    os.close(read)
    assert os.waitstatus_to_exitcode(status) == 0
    after_id = publisher.publish(queue, {"who": "parent-after"})
    publisher.close()
    got = {p.message_id for p, _ in drain(settings, queue)}
    assert got == {parent_id, child_id, after_id}


async def test_async_publisher_many_in_flight(settings: Settings, queue: str) -> None:
    async with AsyncPublisher(settings=settings) as publisher:
        ids = await asyncio.gather(*(publisher.publish(queue, {"i": i}) for i in range(300)))
        with pytest.raises(Unroutable):
            await publisher.publish(queue + ".nobody", {})
        # The channel survives an unroutable publish.
        ids.append(await publisher.publish(queue, {"i": 300}))
    received = drain(settings, queue)
    assert sorted(p.message_id for p, _ in received) == sorted(ids)


async def test_delayed_publish_arrives_after_the_delay(settings: Settings, queue: str) -> None:
    from workerkit.topology import Topology
    from workerkit.transport.pika_asyncio import PikaTransport

    # The delay layout delivers to worker queues through delay.out: bind the test queue there.
    conn = await PikaTransport().connect(settings, name="test", on_lost=lambda _e: None)
    topology = Topology(settings)
    await topology.adopt_dead_letter_queues(conn)  # an older wkt.unroutable is kept as it is
    channel = await conn.channel()
    await topology.declare_exchanges(channel)
    stars = ".".join(["*"] * 28)
    await channel.bind_queue(queue, topology.delay_out, f"p.{stars}.{queue}")
    await conn.close()

    async with AsyncPublisher(settings=settings) as publisher:
        sent = time.monotonic()
        await publisher.publish(queue, {"late": True}, delay=1.5)
        assert drain(settings, queue) == []
        arrived = None
        while time.monotonic() - sent < 10:
            got = drain(settings, queue)
            if got:
                arrived = time.monotonic()
                break
            await asyncio.sleep(0.05)
    assert arrived is not None, "the delayed message never arrived"
    assert 1.5 <= arrived - sent < 3.0


def test_refused_credentials_fail_at_once(settings: Settings, broker_url: str) -> None:
    from workerkit import AccessRefused

    bad = broker_url.replace("guest:guest@", "guest:not-the-password@")
    publisher = Publisher(url=bad, settings=settings)
    started = time.monotonic()
    with pytest.raises(AccessRefused) as info:
        publisher.publish("anything", {}, timeout=5)
    assert time.monotonic() - started < 4, "refused credentials must not be retried"
    assert "not-the-password" not in str(info.value)
    publisher.close()


async def test_message_without_id_is_still_reported_unroutable(
    settings: Settings, unique: Callable[[str], str]
) -> None:
    """The runner republishes users' id-less messages; a return must still be noticed."""
    from workerkit.message import Outgoing, Properties
    from workerkit.transport.pika_asyncio import PikaTransport

    conn = await PikaTransport().connect(settings, name="test", on_lost=lambda _e: None)
    channel = await conn.channel(confirms=True)
    message = Outgoing("", unique("nobody"), b"{}", Properties(content_type="application/json"))
    with pytest.raises(Unroutable):
        await channel.publish(message, mandatory=True, timeout=5)
    await conn.close()


def test_publish_after_close_is_a_publish_error(settings: Settings, queue: str) -> None:
    from workerkit import PublishError

    publisher = Publisher(settings=settings)
    publisher.publish(queue, {"first": True})
    publisher.close()
    with pytest.raises(PublishError, match="closed"):
        publisher.publish(queue, {"after": "close"})


def test_a_delay_beyond_the_longest_is_refused(settings: Settings, queue: str) -> None:
    with Publisher(settings=settings) as publisher, pytest.raises(ValueError, match="longest"):
        publisher.publish(queue, {}, delay=400 * 24 * 3600)
    assert drain(settings, queue) == []


def test_an_idle_publisher_keeps_its_connection(
    settings: Settings, queue: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Nobody publishing means nobody drives the loop but the housekeeper: heartbeats still go
    out, so a connection idle for several heartbeat timeouts is still the same one."""
    publisher = Publisher(settings=settings.model_copy(update={"heartbeat": 1}))
    publisher.publish(queue, {"n": 1})
    core = publisher._core
    assert core is not None
    before = core._connection
    threading.Event().wait(4.0)  # the idle time is the scenario: the broker gives up after ~2 s
    publisher.publish(queue, {"n": 2})
    assert core._connection is before
    assert before is not None and before.is_open
    assert "connection lost" not in caplog.text
    publisher.close()
    assert len(drain(settings, queue)) == 2


def test_publish_from_inside_an_event_loop(settings: Settings, queue: str) -> None:
    """Sync code called from a coroutine cannot drive the publisher's loop; it still works."""
    publisher = Publisher(settings=settings)

    async def handler() -> str:
        return publisher.publish(queue, {"from": "a coroutine"})

    mid = asyncio.run(handler())
    plain = publisher.publish(queue, {"from": "a plain thread"})
    publisher.close()
    assert {p.message_id for p, _ in drain(settings, queue)} == {mid, plain}


def test_a_body_larger_than_a_frame_arrives_whole(settings: Settings, queue: str) -> None:
    """Bodies above the negotiated frame size (128 KiB) are split into several body frames."""
    body = bytes(range(256)) * 1200  # 300 KiB, not a multiple of the frame size
    with Publisher(settings=settings) as publisher:
        publisher.publish(queue, body)
    [(props, raw)] = drain(settings, queue)
    assert raw == body
    assert props.content_type == "application/octet-stream"


def test_close_while_threads_publish_ends_every_call(settings: Settings, queue: str) -> None:
    """close() racing four publishing threads: every call returns or raises PublishError (none
    hangs), and every publish that returned is in the queue."""
    from workerkit import PublishError

    publisher = Publisher(settings=settings)
    confirmed: list[str] = []
    outcomes: list[str] = []
    lock = threading.Lock()
    enough = threading.Event()

    def produce(thread: int) -> None:
        for i in range(10_000):
            try:
                mid = publisher.publish(queue, {"thread": thread, "i": i}, timeout=5)
            except PublishError as exc:
                with lock:
                    outcomes.append(type(exc).__name__)
                return
            with lock:
                confirmed.append(mid)
                if len(confirmed) >= 200:
                    enough.set()
        with lock:
            outcomes.append("finished")

    threads = [threading.Thread(target=produce, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    assert enough.wait(30)
    publisher.close()
    for t in threads:
        t.join(20)
    assert not any(t.is_alive() for t in threads), "a publish hung across close()"
    assert len(outcomes) == 4
    assert set(outcomes) <= {"PublishError", "PublishTimeout"}, outcomes
    received = {p.message_id for p, _ in drain(settings, queue)}
    assert set(confirmed) <= received


async def test_async_with_a_dead_broker_retries_then_raises_publish_timeout(
    settings: Settings,
) -> None:
    """Connecting in ``async with`` follows the publish rule: retried within the timeout, then a
    PublishTimeout (a PublishError), not a bare ConnectionFailed on the first refusal."""
    from workerkit import PublishError

    dead = settings.model_copy(update={"publish_timeout": 1.5})
    url = f"amqp://guest:guest@127.0.0.1:{_free_port()}/"
    started = time.monotonic()
    with pytest.raises(PublishTimeout, match=r"could not connect within 1\.5s") as info:
        async with AsyncPublisher(url=url, settings=dead):
            pass
    elapsed = time.monotonic() - started
    assert isinstance(info.value, PublishError)
    assert 1.0 < elapsed < 1.5 + 2.5  # retried for the bound, then gave up


def test_publish_many_on_a_new_publisher_keeps_the_order(settings: Settings, queue: str) -> None:
    """More items than the window: the first connects, the rest leave in the list's order."""
    with Publisher(settings=settings) as publisher:
        ids = publisher.publish_many([(queue, {"i": i}) for i in range(1500)])
    received = drain(settings, queue)
    assert [orjson.loads(body)["i"] for _, body in received] == list(range(1500))
    assert [p.message_id for p, _ in received] == ids


def test_bad_input_is_an_invalid_message_and_a_value_error(settings: Settings, queue: str) -> None:
    from workerkit import InvalidMessage

    with Publisher(settings=settings) as publisher:
        bad_calls: tuple[Callable[[], object], ...] = (
            lambda: publisher.publish(queue, {}, headers={"workerkit-attempt": 1}),
            lambda: publisher.publish("", {}),
            lambda: publisher.publish(queue, object()),
            lambda: publisher.publish(queue, {}, delay=400 * 24 * 3600),
        )
        for bad in bad_calls:
            with pytest.raises(InvalidMessage) as info:
                bad()
            assert isinstance(info.value, ValueError)
    assert drain(settings, queue) == []


def test_a_missing_vhost_says_so(settings: Settings) -> None:
    from workerkit import AccessRefused

    url = settings.url.get_secret_value().rstrip("/") + "/no-such-vhost-for-workerkit"
    with Publisher(url=url, settings=settings) as publisher, pytest.raises(AccessRefused) as info:
        publisher.publish("anything", {}, timeout=5)
    assert "vhost no-such-vhost-for-workerkit not found" in str(info.value)
