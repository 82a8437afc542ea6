"""Per-queue options of a Worker against the real broker (RabbitMQ 3.10 here)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import orjson
import pika
import pytest
from broker import session_ctl

from workerkit import Publisher, PublishNacked, Runner, Settings, TopologyError, Worker
from workerkit.dlq import list_dead
from workerkit.testing import running, wait_for

from .workers_fixture import publish_raw, ready_count

pytestmark = pytest.mark.integration


def _runner(settings: Settings, *workers: type[Worker]) -> Runner:
    return Runner(list(workers), settings=settings, handle_signals=False)


def _queue_arguments(queue: str) -> dict[str, Any]:
    """The queue's arguments as the broker under test reports them (rabbitmqctl, JSON)."""
    listing = session_ctl("list_queues", "-q", "--formatter", "json", "name", "arguments")
    for row in orjson.loads(listing.stdout):
        if row["name"] == queue:
            arguments = row["arguments"]
            if isinstance(arguments, dict):  # 4.x
                return dict(arguments)
            return {key: value for key, _type, value in arguments}  # 3.10: [key, type, value]
    raise AssertionError(f"queue {queue!r} is not on the broker")


async def test_expired_messages_go_to_the_dlq_with_reason_expired(
    settings: Settings, unique: Callable[[str], str], cleanup: list[str]
) -> None:
    q = unique("ttl")
    cleanup.append(q)
    url = settings.url.get_secret_value()
    release = asyncio.Event()
    handled: list[int] = []

    class Expiring(Worker):
        queue = q
        message_ttl = 0.5
        prefetch = 1
        concurrency = 1

        async def handle(self, body: dict[str, Any]) -> None:
            handled.append(body["n"])
            await release.wait()

    async with running(_runner(settings, Expiring)):
        assert _queue_arguments(q)["x-message-ttl"] == 500
        for n in range(3):  # the first is taken by the handler; the others wait and expire
            await asyncio.to_thread(
                publish_raw, url, settings.exchange, q, orjson.dumps({"n": n}), message_id=f"m{n}"
            )
        await wait_for(lambda: handled == [0], 10, "the first delivery")
        deadline = time.monotonic() + 15
        while await asyncio.to_thread(ready_count, url, f"{q}.dlq") < 2:
            assert time.monotonic() < deadline, "expired messages never reached the DLQ"
            await asyncio.sleep(0.1)
        release.set()
    dead = await list_dead(q, settings=settings)
    assert sorted(d.id for d in dead) == ["m1", "m2"]
    assert {d.reason for d in dead} == {"expired"}
    assert handled == [0]


async def test_a_full_reject_publish_queue_is_a_typed_publish_error(
    settings: Settings, unique: Callable[[str], str], cleanup: list[str]
) -> None:
    q = unique("full")
    cleanup.append(q)
    release = asyncio.Event()

    class Bounded(Worker):
        queue = q
        max_length = 2
        overflow = "reject-publish"
        prefetch = 1
        concurrency = 1

        async def handle(self, body: dict[str, Any]) -> None:
            await release.wait()

    async with running(_runner(settings, Bounded)):
        args = _queue_arguments(q)
        assert args["x-max-length"] == 2 and args["x-overflow"] == "reject-publish"
        publisher = Publisher(settings=settings)
        try:
            refused: Exception | None = None
            for n in range(10):
                try:
                    await asyncio.to_thread(publisher.publish, q, {"n": n})
                except PublishNacked as exc:
                    refused = exc
                    break
            assert refused is not None, "a full queue accepted 10 publishes"
            assert n <= 4  # 1 delivered + 2 ready (+1 in flight at the worst)
        finally:
            release.set()
            publisher.close()


async def test_single_active_consumer_gives_every_message_to_one_runner(
    settings: Settings, unique: Callable[[str], str], cleanup: list[str]
) -> None:
    q = unique("sac")
    cleanup.append(q)
    url = settings.url.get_secret_value()
    seen: dict[str, list[int]] = {"a": [], "b": []}

    def worker(tag: str) -> type[Worker]:
        class Ordered(Worker):
            queue = q
            single_active_consumer = True
            concurrency = 1

            async def handle(self, body: dict[str, Any]) -> None:
                seen[tag].append(body["n"])

        return Ordered

    first, second = _runner(settings, worker("a")), _runner(settings, worker("b"))
    async with running(first), running(second):
        assert _queue_arguments(q)["x-single-active-consumer"] is True
        bodies = [orjson.dumps({"n": n}) for n in range(30)]
        for body in bodies:
            await asyncio.to_thread(publish_raw, url, settings.exchange, q, body)
        await wait_for(lambda: len(seen["a"]) + len(seen["b"]) == 30, 15, "30 handled")
    assert seen["a"] == list(range(30)) and seen["b"] == []  # one consumer, in order


async def test_classic_priorities_and_the_arguments_escape_hatch(
    settings: Settings, unique: Callable[[str], str], cleanup: list[str]
) -> None:
    q = unique("prio")
    cleanup.append(q)
    url = settings.url.get_secret_value()
    release = asyncio.Event()
    order: list[int] = []

    class Prioritised(Worker):
        queue = q
        queue_type = "classic"
        max_priority = 5
        arguments = {"x-max-length-bytes": 1_000_000}
        prefetch = 1
        concurrency = 1

        async def handle(self, body: dict[str, Any]) -> None:
            order.append(body["p"])
            await release.wait()

    async with running(_runner(settings, Prioritised)):
        args = _queue_arguments(q)
        assert args["x-max-priority"] == 5 and args["x-max-length-bytes"] == 1_000_000
        conn = await asyncio.to_thread(pika.BlockingConnection, pika.URLParameters(url))
        ch = conn.channel()
        ch.basic_publish(settings.exchange, q, orjson.dumps({"p": -1}))  # occupies the handler
        await wait_for(lambda: order == [-1], 10)
        for p in (1, 0, 5, 3):
            ch.basic_publish(
                settings.exchange, q, orjson.dumps({"p": p}), pika.BasicProperties(priority=p)
            )
        conn.close()
        await wait_for(lambda: ready_count(url, q) == 4, 10)
        release.set()
        await wait_for(lambda: len(order) == 5, 10)
    assert order == [-1, 5, 3, 1, 0]


async def test_an_existing_queue_without_the_option_fails_start_up_in_one_line(
    settings: Settings, unique: Callable[[str], str], cleanup: list[str]
) -> None:
    q = unique("clashttl")
    cleanup.append(q)

    class Plain(Worker):
        queue = q

        async def handle(self, body: bytes) -> None: ...

    async with running(_runner(settings, Plain)):
        pass
    del Worker.registry[q]

    class WithTtl(Worker):
        queue = q
        message_ttl = 60

        async def handle(self, body: bytes) -> None: ...

    with pytest.raises(TopologyError) as info:
        async with running(_runner(settings, WithTtl)):
            pass
    message = str(info.value)
    assert "\n" not in message and q in message and "x-message-ttl" in message, message
