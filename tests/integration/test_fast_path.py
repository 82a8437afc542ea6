"""The fast consume path against the real broker, side by side with pika's own path.

The same messages (headers of every type pika writes, an empty body, a body over frame_max, a
redelivery) are consumed once with the fast path on and once with it off (the fallback), and
the Messages must be equal field by field. Also: a broker-side cancel and a channel closed by the
broker under a fast consumer, and a new channel that reuses the closed one's number.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from decimal import Decimal
from typing import Any

import pika
import pytest

from workerkit import Message, Settings
from workerkit.errors import WorkerkitError
from workerkit.testing import wait_for
from workerkit.transport import _fastframes
from workerkit.transport.pika_asyncio import PikaChannel, PikaConnection, PikaTransport
from workerkit.transport.specs import QueueSpec

from .workers_fixture import delete_queues

pytestmark = pytest.mark.integration

BIG = bytes(range(256)) * 1200  # 300 KiB: three body frames at RabbitMQ's 128 KiB frame_max
HEADERS: dict[str, Any] = {
    "text": "é",
    "bytes": b"\x00\xff",
    "flag": True,
    "int": -(2**40),
    "decimal": Decimal("12.34"),
    "when": datetime(2024, 5, 6, 7, 8, 9, tzinfo=timezone.utc),
    "list": [1, "a", None],
    "table": {"nested": {"n": 1}},
    "none": None,
}
MESSAGES: list[tuple[bytes, pika.BasicProperties]] = [
    (b'{"n": 1}', pika.BasicProperties(content_type="application/json", delivery_mode=2)),
    (b"", pika.BasicProperties()),
    (BIG, pika.BasicProperties(content_encoding="identity", message_id="big")),
    (
        b"x",
        pika.BasicProperties(
            content_type="text/plain",
            headers=HEADERS,
            delivery_mode=2,
            priority=3,
            correlation_id="c-1",
            reply_to="replies.here",
            expiration="60000",
            message_id="",
            timestamp=1700000000,
            type="t",
            app_id="app",
        ),
    ),
]


@pytest.fixture
def queue(settings: Settings, unique: Callable[[str], str]) -> Iterator[str]:
    name = unique("fastpath")
    yield name
    delete_queues(settings.url.get_secret_value(), name)


@pytest.fixture(params=[True, False], ids=["fast", "fallback"])
def fast(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> bool:
    monkeypatch.setattr(_fastframes, "ENABLED", request.param)
    return bool(request.param)


def _publish(url: str, queue: str, messages: list[tuple[bytes, pika.BasicProperties]]) -> None:
    conn = pika.BlockingConnection(pika.URLParameters(url))
    try:
        channel = conn.channel()
        channel.confirm_delivery()
        for body, props in messages:
            channel.basic_publish("", queue, body, props, mandatory=True)
    finally:
        conn.close()


def _fields(message: Message) -> tuple[Any, ...]:
    return tuple(getattr(message, name) for name in Message.__slots__)


async def _open(settings: Settings, queue: str) -> tuple[PikaConnection, PikaChannel]:
    conn = await PikaTransport().connect(settings, name="fastpath", on_lost=lambda _e: None)
    channel = await conn.channel(prefetch=10)
    await channel.declare_queue(QueueSpec(queue, {"x-queue-type": "quorum"}))
    return conn, channel


def _reader_frames(conn: PikaConnection) -> int | None:
    reader = conn._raw._wk_reader
    return None if reader is None else reader.frames


async def _consume_all(
    settings: Settings, queue: str, count: int
) -> tuple[list[Message], int | None]:
    conn, channel = await _open(settings, queue)
    got: list[Message] = []
    try:
        await channel.consume(queue, got.append, lambda: None)
        await wait_for(lambda: len(got) >= count, timeout=20)
        # Give one back: it comes again, redelivered.
        channel.nack(got[0].delivery_tag, requeue=True)
        await wait_for(lambda: len(got) >= count + 1, timeout=20)
        for message in got[1:]:
            channel.ack(message.delivery_tag)
        await channel.flush()
        return got, _reader_frames(conn)
    finally:
        await conn.close()


async def _both_ways(settings: Settings, queue: str) -> dict[bool, list[Message]]:
    url = settings.url.get_secret_value()
    seen: dict[bool, list[Message]] = {}
    for fast in (True, False):
        _fastframes.ENABLED = fast
        conn, _channel = await _open(settings, queue)
        await conn.close()
        await asyncio.to_thread(_publish, url, queue, MESSAGES)
        seen[fast], frames = await _consume_all(settings, queue, len(MESSAGES))
        if fast:
            assert frames, "the fast path did not read the deliveries"
        else:
            assert frames is None, "the fallback still used the fast reader"
    return seen


async def test_fast_path_and_fallback_build_identical_messages(
    settings: Settings, queue: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_fastframes, "ENABLED", True)
    seen = await _both_ways(settings, queue)
    fast, slow = seen[True], seen[False]
    assert [_fields(m)[1:] for m in fast] != []
    # Delivery tags are per channel and both runs start at 1: every field compares.
    assert [_fields(m) for m in fast] == [_fields(m) for m in slow]
    assert [m.body for m in fast[:4]] == [body for body, _ in MESSAGES]
    assert fast[3].headers == HEADERS and fast[3].message_id is None
    assert fast[-1].redelivered and not fast[0].redelivered
    assert fast[-1].body == fast[0].body


async def test_fallback_is_chosen_once_per_connection_and_logged(
    settings: Settings, queue: str, monkeypatch: pytest.MonkeyPatch, caplog: Any
) -> None:
    monkeypatch.setattr(_fastframes, "ENABLED", False)
    with caplog.at_level(logging.INFO, logger="workerkit.transport"):
        conn, channel = await _open(settings, queue)
    monkeypatch.setattr(_fastframes, "ENABLED", True)  # too late for this connection
    try:
        got: list[Message] = []
        await channel.consume(queue, got.append, lambda: None)
        await asyncio.to_thread(_publish, settings.url.get_secret_value(), queue, MESSAGES[:1])
        await wait_for(lambda: len(got) == 1, timeout=20)
        assert _reader_frames(conn) is None
        assert "fast consume path off" in caplog.text
    finally:
        await conn.close()


async def test_broker_cancel_and_channel_close_under_a_fast_consumer(
    settings: Settings, queue: str, fast: bool
) -> None:
    url = settings.url.get_secret_value()
    conn, channel = await _open(settings, queue)
    try:
        got: list[Message] = []
        cancelled: list[bool] = []
        tag = await channel.consume(queue, got.append, lambda: cancelled.append(True))
        await asyncio.to_thread(_publish, url, queue, MESSAGES[:1])
        await wait_for(lambda: len(got) == 1, timeout=20)
        # Deleting the queue makes the broker send Basic.Cancel amid the channel's frames.
        await asyncio.to_thread(delete_queues, url, queue)
        await wait_for(lambda: cancelled == [True], timeout=20)
        assert not channel.has_consumer(tag)

        # A second channel: the broker closes it (an unknown delivery tag), and the next
        # channel reuses its number for a new fast consumer.
        closed: list[Exception] = []
        doomed = await conn.channel(prefetch=10, on_closed=closed.append)
        await doomed.declare_queue(QueueSpec(queue, {"x-queue-type": "quorum"}))
        number = doomed._raw.channel_number
        await doomed.consume(queue, got.append, lambda: None)
        doomed.ack(999_999)
        await wait_for(lambda: len(closed) == 1, timeout=20)
        assert not doomed.is_open
        again = await conn.channel(prefetch=10)
        assert again._raw.channel_number == number
        after: list[Message] = []
        await again.consume(queue, after.append, lambda: None)
        await asyncio.to_thread(_publish, url, queue, MESSAGES[:2])
        await wait_for(lambda: len(after) == 2, timeout=20)
        assert [m.body for m in after] == [body for body, _ in MESSAGES[:2]]
        assert len(got) == 1  # nothing went to the closed channel's consumer
        for message in after:
            again.ack(message.delivery_tag)
        await again.flush()
        assert (_reader_frames(conn) or 0) > 0 if fast else _reader_frames(conn) is None
    finally:
        with contextlib.suppress(WorkerkitError):
            await conn.close()
