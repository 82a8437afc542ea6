"""Batch consumption against the real broker: one call per batch, one outcome per message."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import orjson
import pytest
from pydantic import BaseModel

from workerkit import Message, Reject, RetryPolicy, Runner, Settings, Worker
from workerkit.batch import Failures
from workerkit.testing import running, wait_for

from .workers_fixture import get_all, publish_many_raw, ready_count

pytestmark = pytest.mark.integration


class Order(BaseModel):
    order_id: int
    flag: str = ""


def _runner(settings: Settings, *workers: type[Worker]) -> Runner:
    return Runner(list(workers), settings=settings, handle_signals=False)


@pytest.mark.parametrize("is_async", [True, False])
async def test_each_message_of_a_batch_has_its_own_outcome(
    settings: Settings, unique: Callable[[str], str], cleanup: list[str], is_async: bool
) -> None:
    q = unique("batch")
    cleanup.append(q)
    url = settings.url.get_secret_value()
    calls: list[list[tuple[int, int]]] = []

    def handle(orders: list[Order], messages: list[Message]) -> Failures:
        calls.append([(o.order_id, m.attempt) for o, m in zip(orders, messages, strict=True)])
        failures = Failures()
        for i, (order, message) in enumerate(zip(orders, messages, strict=True)):
            if order.flag == "reject":
                failures[i] = Reject("bad order")
            elif order.flag == "flaky" and message.attempt == 1:
                failures[i] = ConnectionError("try again")
        return failures

    if is_async:

        class Batched(Worker):
            queue = q
            batch_size = 5
            batch_timeout = 0.5
            concurrency = 1
            retry = RetryPolicy(max_attempts=3, delay=0.2, jitter=0.0)

            async def handle(self, orders: list[Order], messages: list[Message]) -> Failures:
                return handle(orders, messages)

    else:

        class Batched(Worker):  # type: ignore[no-redef]
            queue = q
            batch_size = 5
            batch_timeout = 0.5
            concurrency = 1
            retry = RetryPolicy(max_attempts=3, delay=0.2, jitter=0.0)

            def handle(self, orders: list[Order], messages: list[Message]) -> Failures:
                return handle(orders, messages)

    bodies = [orjson.dumps({"order_id": n}) for n in range(10)]
    bodies[3] = orjson.dumps({"order_id": 3, "flag": "reject"})
    bodies[6] = orjson.dumps({"order_id": 6, "flag": "flaky"})
    bodies.insert(4, b'{"no": "order id"}')  # invalid: never reaches the handler
    bodies.insert(8, b"not json")
    runner = _runner(settings, Batched)
    async with running(runner):
        await asyncio.to_thread(publish_many_raw, url, settings.exchange, q, bodies)
        rt = runner.runtimes[0]
        await wait_for(lambda: rt.processed == 9, 15, "9 acked")
        await wait_for(lambda: rt.dead_lettered == 3, 15, "3 dead-lettered")
    seen = [item for call in calls for item in call]
    assert max(len(call) for call in calls) <= 5
    assert any(len(call) > 1 for call in calls), calls  # really batched
    assert sorted(order for order, attempt in seen if attempt == 1) == list(range(10))
    assert [order for order, attempt in seen if attempt == 2] == [6]  # only the flaky one
    assert rt.retried == 1
    dead = await asyncio.to_thread(get_all, url, f"{q}.dlq")
    reasons = sorted(str(d.headers["workerkit-reason"]) for d in dead)
    assert reasons == ["invalid", "invalid", "rejected"]
    assert await asyncio.to_thread(ready_count, url, q) == 0


async def test_a_partial_batch_is_handled_after_batch_timeout_and_a_raise_fails_each(
    settings: Settings, unique: Callable[[str], str], cleanup: list[str]
) -> None:
    q = unique("partial")
    cleanup.append(q)
    url = settings.url.get_secret_value()
    calls: list[tuple[list[int], float]] = []
    published = 0.0

    class Partial(Worker):
        queue = q
        batch_size = 50
        batch_timeout = 0.5
        concurrency = 1
        retry = RetryPolicy(max_attempts=2, delay=0.1, jitter=0.0)

        async def handle(self, items: list[dict[str, Any]], messages: list[Message]) -> None:
            calls.append(([m.attempt for m in messages], time.monotonic() - published))
            if messages[0].attempt == 1:
                raise RuntimeError("the whole batch failed")

    runner = _runner(settings, Partial)
    async with running(runner):
        published = time.monotonic()
        await asyncio.to_thread(publish_many_raw, url, settings.exchange, q, [b"{}", b"{}", b"{}"])
        rt = runner.runtimes[0]
        await wait_for(lambda: rt.processed == 3, 15, "the retries acked")
    first_attempts, waited = calls[0]
    assert first_attempts == [1, 1, 1]  # three of fifty: handled once batch_timeout passed
    assert 0.4 <= waited < 5
    assert rt.retried == 3  # each message retried on its own
    assert sorted(a for attempts, _ in calls[1:] for a in attempts) == [2, 2, 2]


async def test_list_annotation_without_batch_size_is_one_json_list_per_message(
    settings: Settings, unique: Callable[[str], str], cleanup: list[str]
) -> None:
    q = unique("lists")
    cleanup.append(q)
    got: list[list[Order]] = []

    class Lists(Worker):
        queue = q

        async def handle(self, orders: list[Order]) -> None:
            got.append(orders)

    async with running(_runner(settings, Lists)):
        body = orjson.dumps([{"order_id": 1}, {"order_id": 2}])
        await asyncio.to_thread(
            publish_many_raw, settings.url.get_secret_value(), settings.exchange, q, [body]
        )
        await wait_for(lambda: len(got) == 1, 10)
    assert got == [[Order(order_id=1), Order(order_id=2)]]
