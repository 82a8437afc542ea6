"""What differs between the supported RabbitMQ versions (3.10, 4.0, 4.3), on the broker under test.

Run with ``WORKERKIT_TEST_BROKER=4.0`` (or 4.3) to get a private node of that version; each test
asserts what that version must do, so a broker whose rules change again fails here first.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

import pika
import pytest

from workerkit import Settings, Worker, dlq
from workerkit.topology import DEAD_LETTER_DELIVERY_LIMIT, Topology
from workerkit.transport.pika_asyncio import PikaTransport

from .workers_fixture import declare_raw, publish_many_raw, ready_count

pytestmark = pytest.mark.integration

# 4.0 to 4.2 count a basic.nack(requeue=True) toward the delivery limit; 3.10 too; 4.3 does not
# (it counts basic.reject(requeue=True) and returns of a closed channel, i.e. failures).
NACK_COUNTS = {"3.10": True, "4.0": True, "4.3": False}
# The limit of a quorum queue declared without x-delivery-limit: none on 3.x, 20 from 4.0.
DEFAULT_LIMIT = {"3.10": None, "4.0": 20, "4.3": 20}


def worker_on(name: str, limit: int | None = None) -> type[Worker]:
    class Target(Worker):
        queue = name
        delivery_limit = limit

        async def handle(self, body: dict[str, Any]) -> None:
            pass

    return Target


async def declare(settings: Settings, *workers: type[Worker]) -> Topology:
    topology = Topology(settings)
    conn = await PikaTransport().connect(settings, name="test", on_lost=lambda exc: None)
    try:
        await topology.adopt_dead_letter_queues(conn, workers)
        await topology.declare(await conn.channel(), workers)
    finally:
        await conn.close()
    return topology


GONE_AFTER = 3.0


async def settled(read: Callable[[], Any], expected: Any, within: float = 10.0) -> Any:
    """``read()`` once it returns ``expected``, or its last value after ``within`` seconds."""
    deadline = time.monotonic() + within
    value = await asyncio.to_thread(read)
    while value != expected and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
        value = await asyncio.to_thread(read)
    return value


def give_back(url: str, queue: str, how: str) -> bool:
    """Take the head of ``queue`` and give it back by ``how``: "nack" (requeue), "reject"
    (requeue) or "crash" (the connection closes with it unacked). False if the queue is empty."""
    conn = pika.BlockingConnection(pika.URLParameters(url))
    try:
        channel = conn.channel()
        # A quorum queue applies the previous give-back through its log: the message may take a
        # moment to be ready again. Empty for GONE_AFTER seconds means it is gone.
        deadline = time.monotonic() + GONE_AFTER
        method, _props, _body = channel.basic_get(queue, auto_ack=False)
        while method is None and time.monotonic() < deadline:
            conn.sleep(0.05)
            method, _props, _body = channel.basic_get(queue, auto_ack=False)
        if method is None:
            return False
        if how == "nack":
            channel.basic_nack(method.delivery_tag, requeue=True)
        elif how == "reject":
            channel.basic_reject(method.delivery_tag, requeue=True)
        channel.close() if how != "crash" else None
    finally:
        conn.close()
    return True


async def test_dlq_listed_50_times_keeps_all_100(
    settings: Settings, unique: Callable[[str], str], cleanup: list[str]
) -> None:
    """Issue 13's reproduction: on 4.0.5 a DLQ without a delivery limit lost all 100 here."""
    name = unique("list50")
    cleanup.append(name)
    await declare(settings, worker_on(name))
    url = settings.url.get_secret_value()
    bodies = [f'{{"n": {i}}}'.encode() for i in range(100)]
    await asyncio.to_thread(publish_many_raw, url, "", f"{name}.dlq", bodies)
    first = [d.id for d in await dlq.list_dead(name, settings=settings)]
    assert len(set(first)) == 100
    for _ in range(49):
        listed = [d.id for d in await dlq.list_dead(name, settings=settings)]
        assert sorted(listed) == sorted(first)
    assert await asyncio.to_thread(ready_count, url, f"{name}.dlq") == 100


@pytest.mark.parametrize("how", ["crash", "reject"])
async def test_failed_deliveries_end_in_the_dlq_on_every_version(
    settings: Settings, unique: Callable[[str], str], cleanup: list[str], how: str
) -> None:
    """A message whose consumer dies (or rejects it) on every delivery is dead-lettered after
    delivery_limit + 1 deliveries, whatever the version: the poison-message guarantee."""
    name = unique(f"limit{how}")
    cleanup.append(name)
    await declare(settings, worker_on(name, limit=2))
    url = settings.url.get_secret_value()
    await asyncio.to_thread(publish_many_raw, url, "", name, [b'{"poison": true}'])
    deliveries = 0
    while await asyncio.to_thread(give_back, url, name, how):
        deliveries += 1
        assert deliveries <= 10, "the delivery limit never ended the loop"
    assert deliveries == 3
    assert await asyncio.to_thread(ready_count, url, f"{name}.dlq") == 1


async def test_nack_requeue_counts_only_before_4_3(
    settings: Settings, unique: Callable[[str], str], cleanup: list[str], broker_version: str
) -> None:
    """basic.nack(requeue=True) is a delivery attempt on 3.10 and 4.0-4.2, not on 4.3: a path
    that relied on it to end a loop would loop forever on 4.3 (workerkit's does not)."""
    name = unique("limitnack")
    cleanup.append(name)
    await declare(settings, worker_on(name, limit=2))
    url = settings.url.get_secret_value()
    await asyncio.to_thread(publish_many_raw, url, "", name, [b"{}"])
    for _ in range(6):
        if not await asyncio.to_thread(give_back, url, name, "nack"):
            break
    expected = (1, 0) if NACK_COUNTS[broker_version] else (0, 1)
    # Dead-lettering is asynchronous too: wait (with a deadline) for the counts to settle.
    counts = await settled(
        lambda: (ready_count(url, f"{name}.dlq"), ready_count(url, name)), expected
    )
    assert counts == expected


async def test_a_quorum_queue_without_a_limit_drops_after_the_default(
    settings: Settings, unique: Callable[[str], str], cleanup: list[str], broker_version: str
) -> None:
    """Why every DLQ carries an explicit limit: on 4.0 a plain quorum queue (what workerkit
    declared as a DLQ before) drops a message given back 21 times; 3.10 and 4.3 keep it."""
    name = unique("nolimit")
    cleanup.append(name)
    url = settings.url.get_secret_value()
    await asyncio.to_thread(declare_raw, url, name, {"x-queue-type": "quorum"})
    await asyncio.to_thread(publish_many_raw, url, "", name, [b"{}"])
    for _ in range(25):
        if not await asyncio.to_thread(give_back, url, name, "nack"):
            break
    dropped = DEFAULT_LIMIT[broker_version] is not None and NACK_COUNTS[broker_version]
    kept = await settled(lambda: ready_count(url, name), 0 if dropped else 1)
    assert kept == (0 if dropped else 1)


async def test_a_dlq_from_an_older_workerkit_is_adopted_not_refused(
    settings: Settings,
    unique: Callable[[str], str],
    cleanup: list[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A DLQ declared without the delivery limit cannot be re-declared with it (inequivalent
    arguments): start-up keeps it as it is and warns with the policy that protects it."""
    name = unique("legacy")
    cleanup.append(name)
    url = settings.url.get_secret_value()
    await asyncio.to_thread(declare_raw, url, f"{name}.dlq", {"x-queue-type": "quorum"})
    with caplog.at_level(logging.WARNING, logger="workerkit.topology"):
        topology = await declare(settings, worker_on(name))
    assert f"{name}.dlq" in topology.legacy_queues
    assert "set_policy" in caplog.text and f"{name}.dlq" in caplog.text
    # A new DLQ gets the limit (declaring it again with it succeeds; without it would not).
    fresh = unique("fresh")
    cleanup.append(fresh)
    assert f"{fresh}.dlq" not in (await declare(settings, worker_on(fresh))).legacy_queues
    conn = pika.BlockingConnection(pika.URLParameters(url))
    try:
        args = {"x-queue-type": "quorum", "x-delivery-limit": DEAD_LETTER_DELIVERY_LIMIT}
        conn.channel().queue_declare(f"{fresh}.dlq", durable=True, arguments=args)
    finally:
        conn.close()


async def test_minus_one_means_unlimited_only_from_4_0(
    settings: Settings, unique: Callable[[str], str], cleanup: list[str], broker_version: str
) -> None:
    """Why DEAD_LETTER_DELIVERY_LIMIT is a huge number and not -1: 3.10 accepts -1 and then
    drops a message at its first return; 4.x reads it as "no limit"."""
    name = unique("minusone")
    cleanup.append(name)
    url = settings.url.get_secret_value()
    await asyncio.to_thread(
        declare_raw, url, name, {"x-queue-type": "quorum", "x-delivery-limit": -1}
    )
    await asyncio.to_thread(publish_many_raw, url, "", name, [b"{}"])
    assert await asyncio.to_thread(give_back, url, name, "nack")
    kept = await asyncio.to_thread(ready_count, url, name)
    assert kept == (0 if broker_version == "3.10" else 1)


def test_pytest_header_names_the_broker_under_test(broker_version: str) -> None:
    import os
    import subprocess
    import sys

    env = {**os.environ, "WORKERKIT_TEST_BROKER": broker_version}
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "tests/unit/test_retry.py"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    expected = {"3.10": "RabbitMQ 3.10.", "4.0": "RabbitMQ 4.0.", "4.3": "RabbitMQ 4.3."}
    header = [line for line in result.stdout.splitlines() if line.startswith("broker:")]
    assert header and expected[broker_version] in header[0], result.stdout[:2000]
