"""A failing delivery's slot moves on while its retry copy waits for the broker's confirm
(runtime._confirm_later), on the in-memory broker: the next delivery is handled meanwhile, the
failing one stays in flight until its copy is confirmed and it is acked, and shutdown gives it
back when the copy never comes. With ``after_handle`` hooks installed the slot still waits."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

from workerkit import Message, RetryPolicy, Settings, Worker
from workerkit.decision import Outcome
from workerkit.middleware import Middleware
from workerkit.runner import Runner
from workerkit.testing import in_memory, memory_publisher, running, wait_for
from workerkit.transport.memory import MemoryBroker

EXCHANGE = "wkc"


def settings(**overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "exchange": EXCHANGE,
        "shutdown_grace": 0.5,
        "publish_timeout": 5.0,
        "reconnect_max_delay": 0.2,
    }
    values.update(overrides)
    return Settings(**values)


class Hooked(Middleware):
    def after_handle(self, message: Message, outcome: str, duration: float) -> None:
        pass


def _worker(queue: str, broker: MemoryBroker, seen: list[str], go: asyncio.Event) -> type[Worker]:
    """One slot: "a" raises the broker's memory alarm and fails once (its retry copy is held
    by the broker); "b" is recorded."""

    async def handle(self: Any, body: bytes, message: Message) -> None:
        if body == b"a" and message.attempt == 1:
            await go.wait()
            broker.set_alarm(True)
            raise RuntimeError("fails once")
        seen.append(f"{body.decode()}{message.attempt}")

    policy = RetryPolicy(max_attempts=3, delay=0.05, jitter=0.0)
    attrs = {"queue": queue, "handle": handle, "retry": policy, "concurrency": 1}
    return type("OneSlot", (Worker,), attrs)


async def _start(runner: Runner, broker: MemoryBroker, queue: str, go: asyncio.Event) -> None:
    async with memory_publisher(broker, settings()) as publisher:
        await publisher.publish(queue, b"a")
        await publisher.publish(queue, b"b")
    go.set()
    await wait_for(lambda: len(broker._held) == 1, 5, "the retry copy held by the alarm")


async def test_the_slot_takes_the_next_delivery_while_the_copy_is_confirmed() -> None:
    broker, queue, go = MemoryBroker(), f"unit.later.{uuid.uuid4().hex[:8]}", asyncio.Event()
    seen: list[str] = []
    runner, _ = in_memory([_worker(queue, broker, seen, go)], broker=broker, settings=settings())
    async with running(runner):
        await _start(runner, broker, queue, go)
        (runtime,) = runner.runtimes
        await wait_for(lambda: seen == ["b1"], 5, "b handled while a's copy is pending")
        assert runtime.in_flight == 1 and runtime.busy  # a: not acked until its copy is in
        assert broker.unacked(queue) == 1
        broker.set_alarm(False)
        await wait_for(lambda: seen == ["b1", "a2"], 5, "a retried once its copy was confirmed")
        await wait_for(lambda: not runtime.busy, 5, "everything acked")
    assert runtime.outcomes[Outcome.RETRIED] == 1 and runtime.outcomes[Outcome.ACKED] == 2
    assert broker.messages(f"{queue}.dlq") == []


async def test_after_handle_hooks_keep_the_slot_until_the_copy_is_confirmed() -> None:
    broker, queue, go = MemoryBroker(), f"unit.wait.{uuid.uuid4().hex[:8]}", asyncio.Event()
    seen: list[str] = []
    cls = _worker(queue, broker, seen, go)
    runner, _ = in_memory([cls], broker=broker, settings=settings(), middleware=[Hooked()])
    async with running(runner):
        await _start(runner, broker, queue, go)
        await asyncio.sleep(0.2)  # b would be handled by now if the slot had moved on
        assert seen == []
        broker.set_alarm(False)
        await wait_for(lambda: sorted(seen) == ["a2", "b1"], 5, "both handled after the alarm")


async def test_shutdown_gives_back_a_delivery_whose_copy_never_came() -> None:
    broker, queue, go = MemoryBroker(), f"unit.stop.{uuid.uuid4().hex[:8]}", asyncio.Event()
    seen: list[str] = []
    runner, _ = in_memory([_worker(queue, broker, seen, go)], broker=broker, settings=settings())
    async with running(runner):
        await _start(runner, broker, queue, go)
        (runtime,) = runner.runtimes
        await wait_for(lambda: seen == ["b1"], 5, "b handled")
    # The grace period ended with a's copy still held: a goes back to the broker, counted.
    assert runtime.outcomes[Outcome.GIVEN_BACK] == 1 and not runtime.confirming
    assert runtime.in_flight == 0
    assert [m.body for m in broker.messages(queue)] == [b"a"]
