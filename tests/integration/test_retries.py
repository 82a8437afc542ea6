"""Broker-side retries against the real broker: timing, exhaustion, restarts, poison messages."""

from __future__ import annotations

import asyncio
import functools
import itertools
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pika
import pytest

from workerkit import (
    Message,
    Publisher,
    Reject,
    RetryLater,
    RetryPolicy,
    Runner,
    Settings,
    Worker,
)
from workerkit.message import Header
from workerkit.testing import running, wait_for

from .workers_fixture import (
    consumer_count,
    delete_queues,
    get_all,
    log_lines,
    publish_raw,
    ready_count,
    start_worker,
)

pytestmark = pytest.mark.integration

# A retry may arrive later than its delay by the broker's TTL timer, a few dead-letter hops
# and a noisy 2-core machine; never sooner.
LATE = 1.0


def _url(settings: Settings) -> str:
    return settings.url.get_secret_value()


async def _publish(settings: Settings, routing_key: str, body: Any, **kwargs: Any) -> None:
    await asyncio.to_thread(
        publish_raw, _url(settings), settings.exchange, routing_key, orjson.dumps(body), **kwargs
    )


async def _dlq(settings: Settings, queue: str, count: int, timeout: float = 10.0) -> list[Any]:
    url, dlq = _url(settings), f"{queue}.dlq"
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while await asyncio.to_thread(ready_count, url, dlq) < count:
        assert loop.time() < deadline, f"{dlq} did not reach {count} messages in {timeout}s"
        await asyncio.sleep(0.05)
    return await asyncio.to_thread(get_all, url, dlq)


async def test_transient_failures_are_retried_with_growing_delays(
    settings: Settings, unique: Callable[[str], str], cleanup: list[str]
) -> None:
    q = unique("flaky")
    cleanup.append(q)
    arrivals: list[tuple[int, float]] = []
    delays = [0.5, 1.0, 2.0]

    class Flaky(Worker):
        queue = q
        retry = RetryPolicy(max_attempts=4, delay=0.5, backoff=2.0, jitter=0.0)

        async def handle(self, body: dict[str, Any], message: Message) -> None:
            arrivals.append((message.attempt, time.monotonic()))
            if message.attempt < 4:
                raise ConnectionError("smtp down")

    runner = Runner([Flaky], settings=settings)
    async with running(runner):
        # A forged broker counter must not pass for workerkit's attempt number.
        await _publish(settings, q, {"n": 1}, headers={"x-delivery-count": 7, "x-death": []})
        await wait_for(lambda: runner.runtimes[0].processed == 1, 15, "success on attempt 4")
    assert [a for a, _ in arrivals] == [1, 2, 3, 4]
    gaps = [later - earlier for (_, earlier), (_, later) in itertools.pairwise(arrivals)]
    for gap, delay in zip(gaps, delays, strict=True):
        assert delay <= gap < delay + LATE, f"gaps {gaps} for delays {delays}"
    assert gaps[0] < gaps[1] < gaps[2]
    print(f"retry gaps for delays {delays}: {[round(g, 3) for g in gaps]}")
    assert await asyncio.to_thread(ready_count, _url(settings), f"{q}.dlq") == 0


async def test_exhausted_messages_reach_the_dlq_with_what_an_operator_needs(
    settings: Settings, unique: Callable[[str], str], cleanup: list[str]
) -> None:
    q = unique("doomed")
    cleanup.append(q)
    calls = 0

    class Doomed(Worker):
        queue = q
        retry = RetryPolicy(max_attempts=3, delay=0.2, backoff=1.0, jitter=0.0)

        async def handle(self, body: dict[str, Any]) -> None:
            nonlocal calls
            calls += 1
            raise ValueError("boom " * 2000)  # 10 kB of message: must be cut down

    async with running(Runner([Doomed], settings=settings)):
        await _publish(settings, q, {"n": 1}, message_id="doomed-1")
        dead = await _dlq(settings, q, 1)
    assert calls == 3
    (d,) = dead
    h = d.headers
    assert h[Header.REASON] == "exhausted"
    assert h[Header.ATTEMPT] == 3
    assert h[Header.ERROR_TYPE] == "builtins.ValueError"
    assert h[Header.ERROR_MESSAGE].startswith("boom boom")
    assert len(h[Header.ERROR_MESSAGE]) <= 1000
    assert "ValueError" in h[Header.TRACEBACK] and "in handle" in h[Header.TRACEBACK]
    assert len(h[Header.TRACEBACK]) <= 8000
    assert h[Header.FIRST_FAILURE] < h[Header.LAST_FAILURE]  # ISO-8601 UTC sorts by time
    assert h[Header.ORIGINAL_EXCHANGE] == settings.exchange
    assert h[Header.ORIGINAL_ROUTING_KEY] == q
    assert h[Header.QUEUE] == q
    # (A quorum queue adds x-delivery-count on every delivery; x-death would be a leak.)
    assert not [k for k in h if "death" in k], "broker death headers leaked into the DLQ"
    assert d.body == b'{"n":1}' and d.properties.message_id == "doomed-1"


async def test_a_dlq_deleted_while_the_worker_runs_is_declared_again(
    settings: Settings, unique: Callable[[str], str], cleanup: list[str]
) -> None:
    """A dead-letter copy with nowhere to go is not given back forever: on RabbitMQ 4.3 a nack
    with requeue counts toward no delivery limit, so that looped for good (issue found by a
    new-user check). The runner declares the worker's layout again and the copy goes through."""
    q = unique("nodlq")
    cleanup.append(q)
    calls = 0

    class Rejects(Worker):
        queue = q

        async def handle(self, body: dict[str, Any]) -> None:
            nonlocal calls
            calls += 1
            raise Reject("bad")

    async with running(Runner([Rejects], settings=settings)):
        await asyncio.to_thread(delete_queues, _url(settings), f"{q}.dlq")
        await _publish(settings, q, {"n": 1}, message_id="nodlq-1")

        def dead_lettered() -> bool:
            try:
                return ready_count(_url(settings), f"{q}.dlq") >= 1
            except pika.exceptions.ChannelClosedByBroker:  # not declared again yet
                return False

        await wait_for(dead_lettered, 15, "the DLQ to be declared again and take the copy")
        (dead,) = await asyncio.to_thread(get_all, _url(settings), f"{q}.dlq")
    assert dead.headers[Header.REASON] == "rejected"
    assert dead.properties.message_id == "nodlq-1"
    assert calls == 2, "handled once, given back with the copy unroutable, handled again"


async def test_retry_later_waits_the_requested_delay_without_head_of_line_blocking(
    settings: Settings, unique: Callable[[str], str], cleanup: list[str]
) -> None:
    q = unique("later")
    cleanup.append(q)
    seen: list[tuple[str, int, float]] = []
    wanted = {"slow": 4.0, "fast": 1.0}

    class Later(Worker):
        queue = q
        retry = RetryPolicy(max_attempts=3, jitter=0.0)

        async def handle(self, body: dict[str, str], message: Message) -> None:
            seen.append((body["name"], message.attempt, time.monotonic()))
            if message.attempt == 1:
                raise RetryLater(delay=wanted[body["name"]])

    def at(name: str, attempt: int) -> float | None:
        return next((t for n, a, t in seen if n == name and a == attempt), None)

    async with running(Runner([Later], settings=settings)):
        await _publish(settings, q, {"name": "slow"})
        await wait_for(lambda: at("slow", 1) is not None, 10, "the slow one failing first")
        await _publish(settings, q, {"name": "fast"})
        await wait_for(lambda: at("slow", 2) is not None, 15, "the slow one's retry")
    slow1, slow2, fast1, fast2 = at("slow", 1), at("slow", 2), at("fast", 1), at("fast", 2)
    assert slow1 and slow2 and fast1 and fast2, seen
    assert fast2 < slow2, "a 1 s retry waited behind a 4 s one"
    assert 4.0 <= slow2 - slow1 < 4.0 + LATE
    assert 1.0 <= fast2 - fast1 < 1.0 + LATE
    print(f"RetryLater 4 s -> {slow2 - slow1:.3f}s, 1 s -> {fast2 - fast1:.3f}s")


async def test_retries_survive_a_worker_restart(
    settings: Settings, unique: Callable[[str], str], cleanup: list[str]
) -> None:
    q = unique("restart")
    cleanup.append(q)
    seen: list[tuple[int, int, float]] = []

    class Restarted(Worker):
        queue = q
        retry = RetryPolicy(max_attempts=3, delay=2.0, jitter=0.0)

        async def handle(self, body: dict[str, int], message: Message) -> None:
            seen.append((body["n"], message.attempt, time.monotonic()))
            if message.attempt == 1:
                raise ConnectionError("not yet")

    first = Runner([Restarted], settings=settings)
    async with running(first):
        for n in range(3):
            await _publish(settings, q, {"n": n})
        await wait_for(lambda: first.runtimes[0].retried == 3, 10, "three retries scheduled")
    stopped = time.monotonic()
    # Nothing waits in the work queue or in a worker: the delay queues hold them.
    assert await asyncio.to_thread(ready_count, _url(settings), q) == 0
    assert all(attempt == 1 for _, attempt, _ in seen)
    second = Runner([Restarted], settings=settings)
    async with running(second):
        await wait_for(lambda: second.runtimes[0].processed == 3, 10, "the retries")
    retried = sorted(n for n, attempt, _ in seen if attempt == 2)
    assert retried == [0, 1, 2]
    assert min(t for _, a, t in seen if a == 2) > stopped


async def test_a_handler_timeout_counts_as_a_failure_and_retries(
    settings: Settings, unique: Callable[[str], str], cleanup: list[str]
) -> None:
    q = unique("timeout")
    cleanup.append(q)
    seen: list[tuple[int, float]] = []

    class Hangs(Worker):
        queue = q
        handler_timeout = 0.3
        retry = RetryPolicy(max_attempts=2, delay=0.2, jitter=0.0)

        async def handle(self, body: dict[str, int], message: Message) -> None:
            seen.append((message.attempt, time.monotonic()))
            if message.attempt == 1:
                await asyncio.sleep(30)  # a stuck call: must not hold the message forever

    runner = Runner([Hangs], settings=settings)
    async with running(runner):
        await _publish(settings, q, {"n": 1})
        await wait_for(lambda: runner.runtimes[0].processed == 1, 10, "the retry succeeding")
    assert [a for a, _ in seen] == [1, 2]
    gap = seen[1][1] - seen[0][1]
    assert 0.3 + 0.2 <= gap < 0.5 + LATE, gap


@pytest.mark.parametrize("kind", ["quorum", "classic"])
async def test_a_message_that_kills_its_process_ends_in_the_dlq(
    settings: Settings,
    unique: Callable[[str], str],
    cleanup: list[str],
    tmp_path: Path,
    kind: str,
) -> None:
    """quorum: the broker's delivery limit; classic: workerkit's persisted delivery count."""
    q = unique(f"poison-{kind}")
    cleanup.append(q)
    url = _url(settings)
    logfile = tmp_path / "worker.log"
    limit = 2
    options = ("--queue-type", kind, "--delivery-limit", str(limit))
    dlq = f"{q}.dlq"
    published = False
    starts = 0
    for _ in range(limit + 3):
        proc = start_worker("crash", q, url, settings.exchange, logfile, *options)
        starts += 1
        if not published:  # the queue exists once the first worker declared it
            declared = functools.partial(_declared_or_dead, url, q, proc)
            await wait_for(declared, 15, "the queue declared")
            await _publish(settings, q, "poison")
            published = True
        deadline = time.monotonic() + 15
        while proc.poll() is None and await asyncio.to_thread(_ready, url, dlq) < 1:
            assert time.monotonic() < deadline, "the worker neither crashed nor dead-lettered"
            await asyncio.sleep(0.05)
        if proc.poll() is None:  # alive and the message is in the DLQ: done
            # SIGTERM, not kill -9: the original's ack may still be held (acks are batched for
            # up to 5 ms), and a kill would hand the original back after its DLQ copy.
            proc.terminate()
            await asyncio.to_thread(proc.wait, 30)
            break
        assert proc.returncode == 1, proc.stderr.read() if proc.stderr else ""
    dead = await _dlq(settings, q, 1)
    crashes = log_lines(logfile, "start")
    # delivery_limit redeliveries are allowed on both queue types, so limit + 1 deliveries crash.
    assert len(crashes) == limit + 1, crashes
    headers = dead[0].headers
    if kind == "quorum":
        assert headers["x-first-death-reason"] == "delivery_limit"
    else:
        assert headers[Header.REASON] == "delivery-limit"
    assert await asyncio.to_thread(ready_count, url, q) == 0
    print(f"{kind}: {len(crashes)} crashes, {starts} worker starts before the DLQ")


def _declared_or_dead(url: str, queue: str, proc: subprocess.Popen[bytes]) -> bool:
    # Consuming means the queue and its bindings exist, so the publish will route.
    return consumer_count(url, queue) >= 1 or proc.poll() is not None


def _ready(url: str, queue: str) -> int:
    """Ready messages, or -1 while the queue does not exist yet."""
    try:
        return ready_count(url, queue)
    except Exception:
        return -1


async def test_publish_with_delay_arrives_after_the_delay(
    settings: Settings, unique: Callable[[str], str], cleanup: list[str]
) -> None:
    q = unique("scheduled")
    cleanup.append(q)
    arrived: list[float] = []

    class Scheduled(Worker):
        queue = q

        async def handle(self, body: dict[str, Any]) -> None:
            arrived.append(time.monotonic())

    async with running(Runner([Scheduled], settings=settings)):
        with Publisher(settings=settings) as publisher:
            sent = time.monotonic()
            await asyncio.to_thread(publisher.publish, q, {"n": 1}, delay=2)
        await wait_for(lambda: bool(arrived), 10, "the scheduled message")
    assert 2.0 <= arrived[0] - sent < 2.0 + LATE, arrived[0] - sent
    print(f"publish(delay=2) arrived after {arrived[0] - sent:.3f}s")
