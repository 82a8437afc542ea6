"""Declaring topology against the real broker: idempotent, and a clash is one clear error."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import pytest

from workerkit import Runner, Settings, TopologyError, Worker
from workerkit.testing import running, wait_for
from workerkit.topology import LEVELS, Topology
from workerkit.transport.pika_asyncio import PikaTransport

from .workers_fixture import declare_raw, publish_raw

pytestmark = pytest.mark.integration


async def test_declaring_twice_is_idempotent_and_keeps_messages(
    settings: Settings, unique: Callable[[str], str], cleanup: list[str]
) -> None:
    q = unique("twice")
    cleanup.append(q)
    url = settings.url.get_secret_value()
    handled: list[dict[str, Any]] = []

    class Twice(Worker):
        queue = q

        async def handle(self, body: dict[str, Any]) -> None:
            handled.append(body)

    topology = Topology(settings)
    conn = await PikaTransport().connect(settings, name="test", on_lost=lambda exc: None)
    try:
        await topology.adopt_dead_letter_queues(conn, [Twice])  # an older wkt.unroutable
        channel = await conn.channel()
        await topology.declare(channel, [Twice])
        await asyncio.to_thread(publish_raw, url, settings.exchange, q, b'{"n": 1}')
        await topology.declare(channel, [Twice])  # same arguments: no error, nothing purged
        assert await channel.queue_state(q) == (1, 0)
        for level in range(LEVELS):
            await channel.queue_state(topology.level_name(level))  # every delay level exists
    finally:
        await conn.close()
    # A runner declares the same again on start-up and consumes what was waiting.
    async with running(Runner([Twice], settings=settings)):
        await wait_for(lambda: handled == [{"n": 1}], 10, "the waiting message")


# What the queue was declared with before: the same worker as a classic queue, or with another
# delivery limit (an operator's hand edit, an older workerkit version). The broker names the
# first argument it finds different; for classic-vs-quorum that is one the classic queue lacks.
@pytest.mark.parametrize(
    ("change", "arguments"),
    [
        ({"x-queue-type": "classic"}, ("x-queue-type", "x-overflow", "x-delivery-limit")),
        ({"x-delivery-limit": 5}, ("x-delivery-limit",)),
    ],
)
async def test_a_queue_with_other_arguments_stops_start_up_with_one_clear_error(
    settings: Settings,
    unique: Callable[[str], str],
    cleanup: list[str],
    caplog: pytest.LogCaptureFixture,
    change: dict[str, Any],
    arguments: tuple[str, ...],
) -> None:
    q = unique("clash")
    cleanup.append(q)

    class Clash(Worker):
        queue = q

        async def handle(self, body: bytes) -> None:
            raise AssertionError("never consumed")

    wanted = Topology(settings).worker_queues(Clash)[-1].arguments
    existing = {**wanted, **change}
    if change.get("x-queue-type") == "classic":  # quorum-only arguments a classic queue lacks
        for key in ("x-delivery-limit", "x-dead-letter-strategy", "x-overflow"):
            existing.pop(key)
    await asyncio.to_thread(declare_raw, settings.url.get_secret_value(), q, existing)

    started = time.monotonic()
    with pytest.raises(TopologyError) as info:
        async with running(Runner([Clash], settings=settings)):
            pass
    elapsed = time.monotonic() - started
    message = str(info.value)
    assert q in message, message
    assert any(f"'{arg}'" in message for arg in arguments), message
    assert "already exists with other arguments" in message
    # Fatal at once: no reconnect loop hammering the broker with the same declare.
    assert elapsed < 3, f"start-up took {elapsed:.1f}s to give up"
    assert not [r for r in caplog.records if "retrying" in r.getMessage()]
