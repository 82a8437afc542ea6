"""A message that went through the delay layout still shows the handler its original route."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from workerkit import AsyncPublisher, Message, RetryPolicy, Runner, Settings, Worker
from workerkit.testing import running, wait_for

from .workers_fixture import delete_queues

pytestmark = pytest.mark.integration


async def test_retried_and_scheduled_messages_keep_their_routing_key(
    settings: Settings, unique: Callable[[str], str]
) -> None:
    queue, event = unique("route"), unique("orders") + ".placed"
    seen: list[tuple[str, str, int, bool]] = []

    async def handle(self: Worker, body: dict[str, str], message: Message) -> None:
        headers = message.headers
        seen.append((message.exchange, message.routing_key, message.attempt, "x-death" in headers))
        if body["kind"] == "fail-once" and message.attempt == 1:
            raise RuntimeError("transient")

    routed = type(
        "Routed",
        (Worker,),
        {"queue": queue, "bindings": (event,), "retry": RetryPolicy(delay=0.2), "handle": handle},
    )
    runner = Runner([routed], settings=settings, handle_signals=False)
    try:
        async with running(runner):
            async with AsyncPublisher(settings=settings) as publisher:
                await publisher.publish(event, {"kind": "fail-once"})
                await publisher.publish(event, {"kind": "scheduled"}, delay=0.5)
            await wait_for(lambda: len(seen) == 3, 15, "two first deliveries and one retry")
    finally:
        delete_queues(settings.url.get_secret_value(), queue, f"{queue}.dlq")
    # Every delivery, retried or scheduled, shows the event as published, without x-death.
    assert sorted(seen) == sorted(
        [
            (settings.exchange, event, 1, False),
            (settings.exchange, event, 2, False),
            (settings.exchange, event, 1, False),
        ]
    )
