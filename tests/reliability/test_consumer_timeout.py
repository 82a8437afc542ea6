"""Issue 9 item 5 on a real node: a private RabbitMQ with a short ``consumer_timeout``.

The broker counts from delivery, the handler limit from handler start; with prefetch far above
concurrency the last deliveries of a window wait locally. workerkit gives them back before the
broker's clock runs out, so the broker never closes the channel (which would redeliver
everything in flight and raise delivery counts)."""

from __future__ import annotations

import asyncio
import re
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from broker import PrivateBroker

from workerkit import Settings, Worker
from workerkit.publisher import AsyncPublisher
from workerkit.runner import Runner
from workerkit.testing import running, wait_for

CONSUMER_TIMEOUT_MS = 5000


@pytest.fixture
def short_consumer_timeout(private_broker: PrivateBroker) -> Iterator[PrivateBroker]:
    """The session's node with a short ``consumer_timeout``, put back afterwards: it is read
    when a channel opens, so every later test on the node would get it (4.3 then cancelled
    the 18 s handlers of test_handlers.py, which looked like a lost heartbeat)."""
    before = private_broker.ctl("eval", "application:get_env(rabbit, consumer_timeout).")
    private_broker.ctl(
        "eval", f"application:set_env(rabbit, consumer_timeout, {CONSUMER_TIMEOUT_MS})."
    )
    try:
        yield private_broker
    finally:
        found = re.fullmatch(r"\{ok,(\d+)\}", before.stdout.strip())
        restore = (
            f"application:set_env(rabbit, consumer_timeout, {found[1]})."
            if found
            else "application:unset_env(rabbit, consumer_timeout)."
        )
        private_broker.ctl("eval", restore)


async def test_waiting_deliveries_are_given_back_before_the_consumer_timeout(
    short_consumer_timeout: PrivateBroker,
) -> None:
    private_broker = short_consumer_timeout
    queue = f"rel.lease.{uuid.uuid4().hex[:8]}"
    handled: list[int] = []

    async def handle(self: Any, body: dict[str, Any]) -> None:
        await asyncio.sleep(0.8)
        handled.append(body["n"])

    attrs = {"queue": queue, "concurrency": 1, "prefetch": 20, "handler_timeout": 2.0}
    Slow: type[Worker] = type("Slow", (Worker,), {**attrs, "handle": handle})
    settings = Settings(
        url=private_broker.url,
        exchange=f"rel.lease.{uuid.uuid4().hex[:6]}",
        broker_consumer_timeout=CONSUMER_TIMEOUT_MS / 1000,
        shutdown_grace=3.0,
    )
    runner = Runner([Slow], settings=settings, handle_signals=False)
    async with running(runner):
        async with AsyncPublisher(settings=settings) as pub:
            for n in range(14):
                await pub.publish(queue, {"n": n})
        await wait_for(lambda: set(handled) == set(range(14)), 90, "every message handled")
        assert runner.reconnects == 0, "the broker's consumer_timeout closed the channel"
        assert runner.runtimes[0].given_back > 0  # some waited too long and went back in time
        assert runner.healthy
