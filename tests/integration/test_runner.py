"""The runner against the real broker: acks, routing, decoding, concurrency, dead-lettering."""

from __future__ import annotations

import asyncio
import collections
import pickle
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pytest
from pydantic import BaseModel

from workerkit import Message, Reject, Runner, Settings, Worker
from workerkit.message import Header
from workerkit.testing import running, wait_for

from .workers_fixture import (
    get_all,
    publish_many_raw,
    publish_raw,
    queue_stats,
    ready_count,
)

pytestmark = pytest.mark.integration


class OrderPlaced(BaseModel):
    order_id: int
    email: str


def _url(settings: Settings) -> str:
    return settings.url.get_secret_value()


async def _publish(settings: Settings, routing_key: str, body: Any, **kwargs: Any) -> None:
    raw = body if isinstance(body, bytes) else orjson.dumps(body)
    await asyncio.to_thread(
        publish_raw, _url(settings), settings.exchange, routing_key, raw, **kwargs
    )


async def _dlq(settings: Settings, queue: str, count: int, timeout: float = 10.0) -> list[Any]:
    """Wait until ``count`` messages sit in the DLQ of ``queue`` and read them."""
    url, dlq = _url(settings), f"{queue}.dlq"
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while await asyncio.to_thread(ready_count, url, dlq) < count:
        assert loop.time() < deadline, f"{dlq} did not reach {count} messages in {timeout}s"
        await asyncio.sleep(0.05)
    return await asyncio.to_thread(get_all, url, dlq)


@pytest.mark.parametrize("kind", ["quorum", "classic"])
async def test_pydantic_worker_handles_each_message_exactly_once(
    settings: Settings, unique: Callable[[str], str], cleanup: list[str], kind: str
) -> None:
    q = unique(f"receipts-{kind}")
    cleanup.append(q)
    seen: collections.Counter[int] = collections.Counter()

    class SendReceipt(Worker):
        queue = q
        queue_type = kind  # type: ignore[assignment]
        prefetch = 50
        concurrency = 10

        async def handle(self, order: OrderPlaced) -> None:
            assert isinstance(order, OrderPlaced)
            seen[order.order_id] += 1

    n = 500
    bodies = [orjson.dumps({"order_id": i, "email": f"{i}@x.y"}) for i in range(n)]
    runner = Runner([SendReceipt], settings=settings)
    async with running(runner):
        await asyncio.to_thread(publish_many_raw, _url(settings), settings.exchange, q, bodies)
        await wait_for(lambda: len(seen) == n, 20, "every message handled")
        # rabbitmqctl's counts of a quorum queue lag by seconds; a classic queue's are live.
        deadline = time.monotonic() + 10
        while kind == "classic" and await asyncio.to_thread(queue_stats, q) != (0, 0):
            assert time.monotonic() < deadline, f"left in {q}: {queue_stats(q)}"
            await asyncio.sleep(0.1)
    # Anything still unacked would have gone back to the queue when the runner's channel closed.
    assert set(seen) == set(range(n))
    assert max(seen.values()) == 1, "a message was handled twice"
    assert await asyncio.to_thread(ready_count, _url(settings), q) == 0
    assert await asyncio.to_thread(ready_count, _url(settings), f"{q}.dlq") == 0


async def test_ack_only_after_the_handler_returned(
    settings: Settings, unique: Callable[[str], str], cleanup: list[str]
) -> None:
    q = unique("blocked")
    cleanup.append(q)
    started, release, finished = asyncio.Event(), asyncio.Event(), asyncio.Event()

    class Blocked(Worker):
        queue = q
        queue_type = "classic"  # rabbitmqctl reports a classic queue's unacked count live

        async def handle(self, body: dict[str, Any]) -> None:
            started.set()
            await release.wait()
            finished.set()

    async with running(Runner([Blocked], settings=settings)):
        await _publish(settings, q, {"n": 1})
        await asyncio.wait_for(started.wait(), 10)
        # Held by the handler: the broker must still see it as delivered but unacked.
        await asyncio.sleep(0.3)
        assert await asyncio.to_thread(queue_stats, q) == (0, 1)
        release.set()
        await asyncio.wait_for(finished.wait(), 5)
        deadline = time.monotonic() + 5
        while await asyncio.to_thread(queue_stats, q) != (0, 0):
            assert time.monotonic() < deadline, "not acked after the handler returned"
            await asyncio.sleep(0.1)


async def test_events_fan_out_and_tasks_reach_one_queue(
    settings: Settings, unique: Callable[[str], str], cleanup: list[str]
) -> None:
    event = unique("orders") + ".placed"
    qa, qb = unique("receipts"), unique("audit")
    cleanup.extend([qa, qb])
    got: dict[str, list[dict[str, Any]]] = {qa: [], qb: []}

    class Receipts(Worker):
        queue = qa
        bindings = (event,)

        async def handle(self, body: dict[str, Any]) -> None:
            got[qa].append(body)

    class Audit(Worker):
        queue = qb
        bindings = (event,)

        async def handle(self, body: dict[str, Any]) -> None:
            got[qb].append(body)

    async with running(Runner([Receipts, Audit], settings=settings)):
        await _publish(settings, event, {"kind": "event"})
        await wait_for(lambda: len(got[qa]) == 1 and len(got[qb]) == 1, 10, "fan-out")
        await _publish(settings, qa, {"kind": "task"})
        await wait_for(lambda: len(got[qa]) == 2, 10, "the task")
        await asyncio.sleep(0.2)
    assert got[qa] == [{"kind": "event"}, {"kind": "task"}]
    assert got[qb] == [{"kind": "event"}], "a task routed by queue name reached another queue"


async def test_message_envelope_reaches_the_handler(
    settings: Settings, unique: Callable[[str], str], cleanup: list[str]
) -> None:
    q = unique("envelope")
    cleanup.append(q)
    seen: list[tuple[dict[str, Any], Message]] = []

    class Envelope(Worker):
        queue = q

        async def handle(self, body: dict[str, Any], message: Message) -> None:
            seen.append((body, message))

    async with running(Runner([Envelope], settings=settings)):
        await _publish(settings, q, {"a": 1}, headers={"x-trace": "abc"}, message_id="m-42")
        await wait_for(lambda: len(seen) == 1, 10, "the message")
    body, message = seen[0]
    assert body == {"a": 1}
    assert message.message_id == "m-42"
    assert message.headers["x-trace"] == "abc"
    assert message.attempt == 1
    assert message.routing_key == q
    assert message.exchange == settings.exchange
    assert message.redelivered is False
    assert message.body == b'{"a":1}'


async def test_decoding_follows_the_annotation(
    settings: Settings, unique: Callable[[str], str], cleanup: list[str]
) -> None:
    qd, ql, qs, qb = unique("dict"), unique("list"), unique("str"), unique("bytes")
    cleanup.extend([qd, ql, qs, qb])
    got: dict[str, list[Any]] = {q: [] for q in (qd, ql, qs, qb)}

    class AsDict(Worker):
        queue = qd

        async def handle(self, body: dict) -> None:  # type: ignore[type-arg]
            got[qd].append(body)

    class AsList(Worker):
        queue = ql

        async def handle(self, body: list) -> None:  # type: ignore[type-arg]
            got[ql].append(body)

    class AsStr(Worker):
        queue = qs

        async def handle(self, body: str) -> None:
            got[qs].append(body)

    class AsBytes(Worker):
        queue = qb

        async def handle(self, body: bytes) -> None:
            got[qb].append(body)

    async with running(Runner([AsDict, AsList, AsStr, AsBytes], settings=settings)):
        await _publish(settings, qd, {"k": [1, 2]})
        await _publish(settings, ql, [1, "two", None])
        await _publish(settings, qs, "héllo".encode(), content_type="text/plain")
        await _publish(settings, qb, b"\x00\xffraw", content_type="application/octet-stream")
        await _publish(settings, qd, [1, 2])  # a list where a dict is expected: invalid
        await wait_for(lambda: all(got.values()), 10, "one message per worker")
        dead = await _dlq(settings, qd, 1)
    assert got[qd] == [{"k": [1, 2]}]
    assert got[ql] == [[1, "two", None]]
    assert got[qs] == ["héllo"]
    assert got[qb] == [b"\x00\xffraw"]
    assert dead[0].headers[Header.REASON] == "invalid"
    assert "dict" in dead[0].headers[Header.ERROR_MESSAGE]


async def test_concurrency_is_a_limit_separate_from_prefetch(
    settings: Settings, unique: Callable[[str], str], cleanup: list[str]
) -> None:
    q = unique("limited")
    cleanup.append(q)
    now = peak = done = 0

    class Limited(Worker):
        queue = q
        prefetch = 20
        concurrency = 3

        async def handle(self, body: dict[str, Any]) -> None:
            nonlocal now, peak, done
            now += 1
            peak = max(peak, now)
            await asyncio.sleep(0.15)
            now -= 1
            done += 1

    bodies = [orjson.dumps({"n": i}) for i in range(15)]
    runner = Runner([Limited], settings=settings)
    async with running(runner):
        await asyncio.to_thread(publish_many_raw, _url(settings), settings.exchange, q, bodies)
        rt = runner.runtimes[0]
        # Meanwhile the broker has sent more than `concurrency` ahead (prefetch): they wait
        # in the worker, unstarted.
        await wait_for(lambda: now == 3 and len(rt.deque) >= 5, 10, "prefetched beyond 3")
        await wait_for(lambda: done == 15, 15, "all handled")
    assert peak == 3


async def test_sync_handlers_run_in_threads_and_do_not_block_the_loop(
    settings: Settings, unique: Callable[[str], str], cleanup: list[str]
) -> None:
    q = unique("sync")
    cleanup.append(q)
    threads: list[str] = []
    ticks: list[float] = []
    windows: list[tuple[float, float]] = []

    class Blocking(Worker):
        queue = q
        concurrency = 2

        def handle(self, body: dict[str, Any]) -> None:
            start = time.monotonic()
            threads.append(threading.current_thread().name)
            time.sleep(0.8)  # blocking I/O or CPU: would freeze heartbeats on the loop
            windows.append((start, time.monotonic()))

    async def heartbeat_probe() -> None:
        while True:
            ticks.append(time.monotonic())
            await asyncio.sleep(0.05)

    async with running(Runner([Blocking], settings=settings)):
        probe = asyncio.create_task(heartbeat_probe())
        try:
            await _publish(settings, q, {"n": 1})
            await _publish(settings, q, {"n": 2})
            await wait_for(lambda: len(windows) == 2, 10, "both handlers")
        finally:
            probe.cancel()
    assert all(name.startswith("workerkit-") for name in threads), threads
    assert threading.main_thread().name not in threads
    start = min(w[0] for w in windows)
    end = max(w[1] for w in windows)
    inside = [t for t in ticks if start <= t <= end]
    # ~0.8 s of sleeping at 50 ms a tick: a blocked loop would tick once or not at all.
    assert len(inside) >= 8, f"the loop ticked {len(inside)} times while handlers slept"
    # Two handlers with concurrency 2 overlap in the pool rather than queueing.
    assert end - start < 1.5


async def test_undecodable_bodies_go_to_the_dlq_and_the_worker_keeps_going(
    settings: Settings, unique: Callable[[str], str], cleanup: list[str], tmp_path: Path
) -> None:
    q = unique("strict")
    cleanup.append(q)
    handled: list[OrderPlaced] = []

    class Strict(Worker):
        queue = q

        async def handle(self, order: OrderPlaced) -> None:
            handled.append(order)

    marker = tmp_path / "unpickled"

    class Exploit:
        def __reduce__(self) -> tuple[Any, ...]:
            return (Path.mkdir, (marker,))

    async with running(Runner([Strict], settings=settings)):
        await _publish(settings, q, b"{not json", message_id="bad-json")
        await _publish(settings, q, {"order_id": "x"}, message_id="bad-model")
        await _publish(
            settings,
            q,
            pickle.dumps(Exploit()),
            content_type="application/x-python-serialize",
            message_id="pickle",
        )
        await _publish(settings, q, {"order_id": 7, "email": "a@b.c"}, message_id="good")
        await wait_for(lambda: len(handled) == 1, 10, "the good message")
        dead = await _dlq(settings, q, 3)
    assert handled == [OrderPlaced(order_id=7, email="a@b.c")]
    assert not marker.exists(), "a pickle body was deserialised"
    by_id = {d.properties.message_id: d for d in dead}
    assert set(by_id) == {"bad-json", "bad-model", "pickle"}
    for d in dead:
        assert d.headers[Header.REASON] == "invalid"
        assert d.headers[Header.ERROR_TYPE] == "workerkit.errors.DecodeError"
        assert d.headers[Header.ERROR_MESSAGE]
    assert "JSON" in by_id["bad-json"].headers[Header.ERROR_MESSAGE]
    assert "order_id" in by_id["bad-model"].headers[Header.ERROR_MESSAGE]
    assert "x-python-serialize" in by_id["pickle"].headers[Header.ERROR_MESSAGE]
    assert by_id["bad-json"].body == b"{not json"  # the body is kept as it came


async def test_reject_dead_letters_at_once(
    settings: Settings, unique: Callable[[str], str], cleanup: list[str]
) -> None:
    q = unique("reject")
    cleanup.append(q)
    calls = 0

    class Rejecting(Worker):
        queue = q

        async def handle(self, order: OrderPlaced) -> None:
            nonlocal calls
            calls += 1
            if not order.email:
                raise Reject("no address")

    async with running(Runner([Rejecting], settings=settings)):
        await _publish(settings, q, {"order_id": 1, "email": ""})
        dead = await _dlq(settings, q, 1)
    assert calls == 1, "a rejected message was retried"
    headers = dead[0].headers
    assert headers[Header.REASON] == "rejected"
    assert headers[Header.ERROR_TYPE] == "workerkit.errors.Reject"
    assert headers[Header.ERROR_MESSAGE] == "no address"
    assert headers[Header.ATTEMPT] == 1


async def test_a_body_over_max_body_size_is_dead_lettered(
    settings: Settings, unique: Callable[[str], str], cleanup: list[str]
) -> None:
    q = unique("small")
    cleanup.append(q)
    handled: list[bytes] = []

    class Small(Worker):
        queue = q

        async def handle(self, body: bytes) -> None:
            handled.append(body)

    small = settings.model_copy(update={"max_body_size": 1000})
    async with running(Runner([Small], settings=small)):
        await _publish(settings, q, b"x" * 1001, content_type="application/octet-stream")
        await _publish(settings, q, b"y" * 1000, content_type="application/octet-stream")
        dead = await _dlq(settings, q, 1)
        await wait_for(lambda: len(handled) == 1, 10, "the message at the limit")
    assert handled == [b"y" * 1000]
    assert dead[0].headers[Header.REASON] == "invalid"
    assert "1001" in dead[0].headers[Header.ERROR_MESSAGE]
