"""The metrics through the real broker: the delivery lag a consumer measures is the
publisher's millisecond publish time to the handler's start (off the wire the header is an int
subclass of the client library's, which the in-memory broker never shows)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from prometheus_client import REGISTRY

from workerkit import Publisher, Runner, Settings, Worker
from workerkit.message import Outgoing
from workerkit.metrics import PUBLISHED_AT_HEADER, Metrics
from workerkit.middleware import Middleware
from workerkit.testing import running, wait_for

from .workers_fixture import delete_queues

pytestmark = pytest.mark.integration

LATE = 2.5  # seconds: how long before its publish a test message says it was published
COUNT = 3


@pytest.fixture
def queue(settings: Settings, unique: Callable[[str], str]) -> Iterator[str]:
    name = unique("lag")
    yield name
    delete_queues(settings.url.get_secret_value(), name, f"{name}.dlq")


class PublishedEarlier(Middleware):
    """Stamps the publish time LATE seconds back; the metrics middleware keeps a stamp set."""

    def before_publish(self, outgoing: Outgoing) -> None:
        outgoing.headers[PUBLISHED_AT_HEADER] = int((time.time() - LATE) * 1000)


def _value(name: str, queue: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, {"queue": queue, **labels}) or 0.0


async def test_delivery_lag_is_the_publishers_millisecond_stamp_to_handler_start(
    settings: Settings, queue: str
) -> None:
    name = queue

    class Lagging(Worker):
        queue = name

        async def handle(self, body: dict[str, Any]) -> None:
            pass

    runner = Runner([Lagging], settings=settings, middleware=[Metrics()])
    async with running(runner):

        def publish() -> None:
            middleware = [PublishedEarlier(), Metrics()]
            with Publisher(settings=settings, middleware=middleware) as publisher:
                for n in range(COUNT):
                    publisher.publish(queue, {"n": n})

        await asyncio.to_thread(publish)
        await wait_for(lambda: _value("workerkit_delivery_lag_seconds_count", queue) == COUNT, 15)
    # Each lag is LATE and a little: the stamp, not the AMQP timestamp (whole seconds of the
    # real publish time, which would give lags under a second).
    total = _value("workerkit_delivery_lag_seconds_sum", queue)
    assert COUNT * LATE <= total < COUNT * (LATE + 0.5), total
    assert _value("workerkit_delivery_lag_seconds_bucket", queue, le="1.0") == 0
    assert _value("workerkit_delivery_lag_seconds_bucket", queue, le="5.0") == COUNT
