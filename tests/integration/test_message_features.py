"""Compression, per-message TTL and priority against the real broker."""

from __future__ import annotations

import asyncio
import gzip
import time
from collections.abc import Callable, Iterator
from typing import Any

import orjson
import pika
import pytest
import zstandard

from workerkit import AsyncPublisher, InvalidMessage, Runner, Settings, Worker
from workerkit.compression import Compression
from workerkit.dlq import list_dead
from workerkit.testing import running, wait_for

from .workers_fixture import Got, delete_queues, get_all, ready_count

pytestmark = pytest.mark.integration


@pytest.fixture
def cleanup(settings: Settings) -> Iterator[list[str]]:
    queues: list[str] = []
    yield queues
    delete_queues(settings.url.get_secret_value(), *queues, *(f"{q}.dlq" for q in queues))


def _runner(settings: Settings, *workers: type[Worker]) -> Runner:
    return Runner(list(workers), settings=settings, handle_signals=False)


def _raw_publish(url: str, exchange: str, key: str, body: bytes, **props: Any) -> None:
    conn = pika.BlockingConnection(pika.URLParameters(url))
    try:
        ch = conn.channel()
        ch.confirm_delivery()
        ch.basic_publish(exchange, key, body, pika.BasicProperties(**props), mandatory=True)
    finally:
        conn.close()


def _wait_dlq(url: str, queue: str, count: int) -> None:
    deadline = time.monotonic() + 15
    while ready_count(url, f"{queue}.dlq") < count:
        assert time.monotonic() < deadline, f"{queue}.dlq never got {count} message(s)"
        time.sleep(0.05)


BIG = {"items": [{"sku": f"SKU-{i:05d}", "name": "a widget", "price": i} for i in range(400)]}


@pytest.mark.parametrize("codec", ["gzip", "zstd"])
async def test_compressed_publishes_are_smaller_and_decoded_transparently(
    settings: Settings, unique: Callable[[str], str], cleanup: list[str], codec: Compression
) -> None:
    q = unique(f"comp-{codec}")
    cleanup.append(q)
    got: list[Any] = []

    class Reader(Worker):
        queue = q

        async def handle(self, body: dict[str, Any]) -> None:
            got.append(body)

    url = settings.url.get_secret_value()
    async with running(_runner(settings, Reader)):
        pass  # declares the queue
    async with AsyncPublisher(settings=settings, compression=codec) as pub:
        await pub.publish(q, BIG)
        await pub.publish(q, {"small": True})  # below compress_min_size: sent as is
    [big, small] = await asyncio.to_thread(get_all, url, q)
    assert big.properties.content_encoding == codec
    assert len(big.body) < len(orjson.dumps(BIG)) / 4
    assert small.properties.content_encoding is None and small.body == b'{"small":true}'
    async with (
        running(_runner(settings, Reader)),
        AsyncPublisher(settings=settings, compression=codec) as pub,
    ):
        await pub.publish(q, BIG)
        await wait_for(lambda: got == [BIG], 10, "the compressed body decoded")


async def test_bodies_compressed_by_another_client_are_decoded(
    settings: Settings, unique: Callable[[str], str], cleanup: list[str]
) -> None:
    q = unique("foreign")
    cleanup.append(q)
    url = settings.url.get_secret_value()
    got: list[Any] = []

    class Reader(Worker):
        queue = q

        async def handle(self, body: dict[str, Any]) -> None:
            got.append(body)

    async with running(_runner(settings, Reader)):
        raw = orjson.dumps({"from": "elsewhere"})
        for body, encoding in (
            (gzip.compress(raw), "gzip"),
            (zstandard.ZstdCompressor().compress(raw), "zstd"),
        ):
            await asyncio.to_thread(
                _raw_publish,
                url,
                settings.exchange,
                q,
                body,
                content_type="application/json",
                content_encoding=encoding,
            )
        await wait_for(lambda: len(got) == 2, 10, "both decoded")
    assert got == [{"from": "elsewhere"}] * 2


async def test_zip_bomb_and_unknown_encoding_go_to_the_dlq_as_invalid(
    settings: Settings, unique: Callable[[str], str], cleanup: list[str]
) -> None:
    q = unique("bomb")
    cleanup.append(q)
    url = settings.url.get_secret_value()
    capped = settings.model_copy(update={"max_body_size": 1_000_000})
    handled: list[Any] = []

    class Reader(Worker):
        queue = q

        async def handle(self, body: bytes) -> None:
            handled.append(body)

    # 1 GB of zeros is about 1 MB gzipped: inflated it would be 1000x the cap.
    packer = __import__("zlib").compressobj(9, 8, 31)
    chunk = bytes(1 << 20)
    bomb = b"".join(packer.compress(chunk) for _ in range(1024)) + packer.flush()
    assert len(bomb) < 2_000_000
    async with running(_runner(capped, Reader)):
        started = time.monotonic()
        await asyncio.to_thread(
            _raw_publish,
            url,
            settings.exchange,
            q,
            bomb,
            content_encoding="gzip",
            message_id="bomb",
        )
        await asyncio.to_thread(
            _raw_publish, url, settings.exchange, q, b"xx", content_encoding="br", message_id="br"
        )
        await asyncio.to_thread(_wait_dlq, url, q, 2)
        assert time.monotonic() - started < 10
    dead = {d.id: d for d in await list_dead(q, settings=settings)}
    assert {d.reason for d in dead.values()} == {"invalid"}
    assert "above max_body_size=1000000" in (dead["bomb"].error_message or "")
    assert "unsupported content-encoding 'br'" in (dead["br"].error_message or "")
    assert handled == []


async def test_expired_publish_goes_to_the_dlq_as_expired(
    settings: Settings, unique: Callable[[str], str], cleanup: list[str]
) -> None:
    q = unique("exp")
    cleanup.append(q)
    url = settings.url.get_secret_value()

    class Idle(Worker):
        queue = q

        async def handle(self, body: dict[str, Any]) -> None:
            raise AssertionError("never consumed")

    async with running(_runner(settings, Idle)):
        pass  # declares the queue and its dead-letter layout; nobody consumes below
    async with AsyncPublisher(settings=settings) as pub:
        await pub.publish(q, {"n": 1}, expiration=0.2, message_id="short")
        await pub.publish(q, {"n": 2}, expiration=3600, message_id="long")

    def after_the_expiry() -> list[Got]:
        _wait_dlq(url, q, 1)
        return get_all(url, q)

    [long_lived] = await asyncio.to_thread(after_the_expiry)
    assert long_lived.properties.message_id == "long"
    assert long_lived.properties.expiration == "3600000"
    dead = await list_dead(q, settings=settings)
    assert [(d.id, d.reason) for d in dead] == [("short", "expired")]


async def test_priority_is_honoured_on_a_classic_priority_queue(
    settings: Settings, unique: Callable[[str], str], cleanup: list[str]
) -> None:
    q = unique("prio")
    cleanup.append(q)
    order: list[int] = []
    release = asyncio.Event()

    class Prioritised(Worker):
        queue = q
        queue_type = "classic"
        max_priority = 9
        prefetch = 1
        concurrency = 1

        async def handle(self, body: dict[str, Any]) -> None:
            order.append(body["p"])
            await release.wait()

    url = settings.url.get_secret_value()
    async with running(_runner(settings, Prioritised)), AsyncPublisher(settings=settings) as pub:
        await pub.publish(q, {"p": -1})  # occupies the handler
        await wait_for(lambda: order == [-1], 10)
        for p in (1, 0, 9, 4):
            await pub.publish(q, {"p": p}, priority=p)
        await wait_for(lambda: ready_count(url, q) == 4, 10)
        release.set()
        await wait_for(lambda: len(order) == 5, 10)
    assert order == [-1, 9, 4, 1, 0]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"priority": -1}, "priority"),
        ({"priority": 256}, "priority"),
        ({"priority": True}, "priority"),
        ({"expiration": -1}, "expiration"),
        ({"expiration": float("nan")}, "expiration"),
        ({"expiration": float("inf")}, "expiration"),
        ({"expiration": 10**8}, "limit"),
        ({"expiration": 5, "delay": 5}, "both a delay and an expiration"),
    ],
)
async def test_bad_ttl_and_priority_fail_before_the_network(
    settings: Settings, kwargs: dict[str, Any], match: str
) -> None:
    bad = settings.model_copy(update={"url": "amqp://guest:guest@127.0.0.1:1/"})
    pub = AsyncPublisher(settings=bad)  # nothing listens there: an error would be a timeout
    with pytest.raises(InvalidMessage, match=match):
        await pub.publish("any.key", {"a": 1}, **kwargs)
    if "delay" not in kwargs:  # requests take no delay
        with pytest.raises(InvalidMessage, match=match):
            await pub.request("any.key", {"a": 1}, **kwargs)
    await pub.close()
