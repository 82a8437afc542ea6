"""Idempotent workers on the in-memory broker, and the in-memory store's rules."""

from __future__ import annotations

import uuid
from typing import Any

import pytest

from workerkit import ConfigurationError, Message, RetryPolicy, Settings, Worker
from workerkit.idempotency import Claim, MemoryStore
from workerkit.testing import in_memory, memory_publisher, running, wait_for
from workerkit.transport.memory import MemoryBroker


def settings() -> Settings:
    return Settings(exchange="wkt", shutdown_grace=3.0, publish_timeout=3.0)


def qname(label: str) -> str:
    return f"unit.{label}.{uuid.uuid4().hex[:8]}"


async def test_memory_store_claims_commits_and_releases() -> None:
    store = MemoryStore()
    assert await store.claim("k", "t1", 10) == (Claim.CLAIMED, 0.0)
    claim, left = await store.claim("k", "t2", 10)
    assert claim is Claim.BUSY and 9 < left <= 10
    await store.release("k", "t2")  # not ours: no effect
    assert (await store.claim("k", "t2", 10))[0] is Claim.BUSY
    await store.release("k", "t1")
    assert (await store.claim("k", "t2", 10))[0] is Claim.CLAIMED
    assert await store.commit("k", "t2", 10) is True
    assert (await store.claim("k", "t3", 10))[0] is Claim.DONE
    # A claim expires (a process killed mid-handler).
    assert (await store.claim("x", "t1", 0.01))[0] is Claim.CLAIMED
    await wait_for(lambda: store._live("x") is None, 2)
    assert (await store.claim("x", "t2", 10))[0] is Claim.CLAIMED


@pytest.mark.parametrize("is_async", [True, False])
async def test_duplicates_run_once_and_failures_release_the_claim(is_async: bool) -> None:
    name = qname("idem")
    store = MemoryStore()
    effects: list[tuple[str, int]] = []

    def effect(body: dict[str, Any], message: Message) -> None:
        effects.append((body["id"], message.attempt))
        if body.get("fail_first") and message.attempt == 1:
            raise ConnectionError("transient")

    if is_async:

        class Charge(Worker):
            queue = name
            idempotent = True
            idempotency_store = store
            retry = RetryPolicy(max_attempts=3, delay=0.05, jitter=0.0)

            async def handle(self, body: dict[str, Any], message: Message) -> None:
                effect(body, message)

    else:

        class Charge(Worker):  # type: ignore[no-redef]
            queue = name
            idempotent = True
            idempotency_store = store
            retry = RetryPolicy(max_attempts=3, delay=0.05, jitter=0.0)

            def handle(self, body: dict[str, Any], message: Message) -> None:
                effect(body, message)

    broker = MemoryBroker()
    runner, _ = in_memory([Charge], broker=broker, settings=settings())
    async with running(runner), memory_publisher(broker, settings()) as pub:
        for _ in range(3):  # the same message id three times: one side effect
            await pub.publish(name, {"id": "a"}, message_id="m-a")
        await pub.publish(name, {"id": "b", "fail_first": True}, message_id="m-b")
        rt = runner.runtimes[0]
        await wait_for(lambda: rt.processed == 4, what="4 acks")
    assert sorted(effects) == [("a", 1), ("b", 1), ("b", 2)]  # b's retry ran after release
    assert rt.duplicates == 2
    assert store.entries[f"workerkit:idem:{name}:m-a"][0] == "done"


async def test_a_busy_claim_is_retried_once_it_expires(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("INFO", logger="workerkit")
    name = qname("busy")
    store = MemoryStore()
    ran: list[int] = []

    class Charge(Worker):
        queue = name
        idempotent = True
        idempotency_store = store
        retry = RetryPolicy(max_attempts=3, delay=0.05, jitter=0.0)

        async def handle(self, body: dict[str, Any], message: Message) -> None:
            ran.append(message.attempt)

    # A claim left behind by a process killed mid-handler, expiring in 0.5 s.
    await store.claim(f"{name}:m-1", "dead-process", 0.5)
    broker = MemoryBroker()
    runner, _ = in_memory([Charge], broker=broker, settings=settings())
    async with running(runner), memory_publisher(broker, settings()) as pub:
        await pub.publish(name, {}, message_id="m-1")
        rt = runner.runtimes[0]
        await wait_for(lambda: rt.processed == 1, 10, "the retry after the claim expired")
    assert ran == [1]  # looking again is not an attempt: the handler never ran before
    assert rt.retried >= 1
    # Said as what it is, at INFO: not a handler failure (which is a WARNING).
    lines = [r for r in caplog.records if "claimed by another delivery" in r.getMessage()]
    assert lines and all(r.levelname == "INFO" for r in lines), caplog.text
    assert "looking again in" in lines[0].getMessage()
    assert not [r for r in caplog.records if "handler failed" in r.getMessage()], caplog.text


def test_idempotent_needs_a_store() -> None:
    with pytest.raises(ConfigurationError, match="idempotency_store"):

        class Charge(Worker):
            queue = qname("nostore")
            idempotent = True

            async def handle(self, body: bytes) -> None: ...

    with pytest.raises(ConfigurationError, match="idempotency_ttl"):

        class Charge2(Worker):
            queue = qname("badttl")
            idempotent = True
            idempotency_store = MemoryStore()
            idempotency_ttl = 0

            async def handle(self, body: bytes) -> None: ...


async def test_a_timed_out_def_handler_keeps_its_claim_so_the_retry_never_overlaps_it() -> None:
    import threading
    import time

    name = qname("stuck")
    store = MemoryStore()
    runs: list[tuple[int, float, float]] = []
    lock = threading.Lock()

    class Slow(Worker):
        queue = name
        idempotent = True
        idempotency_store = store
        handler_timeout = 0.3
        retry = RetryPolicy(max_attempts=3, delay=0.05, jitter=0.0)

        def handle(self, body: dict[str, Any], message: Message) -> None:
            started = time.monotonic()
            if message.attempt == 1:
                time.sleep(1.0)  # past its limit; the thread cannot be stopped
            with lock:
                runs.append((message.attempt, started, time.monotonic()))

    broker = MemoryBroker()
    runner, _ = in_memory([Slow], broker=broker, settings=settings())
    async with running(runner), memory_publisher(broker, settings()) as pub:
        await pub.publish(name, {}, message_id="m-slow")
        rt = runner.runtimes[0]
        await wait_for(lambda: rt.processed == 1, 15, "the retry, after the claim expired")
    (first, _, f_end), (second, s_start, _) = sorted(runs)
    assert (first, second) == (1, 2)
    assert s_start >= f_end, "the retry ran while the timed-out handler was still running"
