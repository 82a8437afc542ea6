"""A list of broker URLs where the first hosts do not answer: every client still gets through."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import Callable, Iterator

import pytest

from workerkit import (
    AsyncPublisher,
    ConnectionFailed,
    Publisher,
    PublishError,
    Runner,
    Settings,
    Worker,
    dlq,
)
from workerkit.testing import running, wait_for

from .conftest import ROOT, delete_queues, free_port, queue_depth

pytestmark = pytest.mark.integration


@pytest.fixture
def dead_first(broker_url: str) -> str:
    """Two hosts nobody listens on, then the real broker (the order is shuffled per process)."""
    dead = [f"amqp://guest:guest@127.0.0.1:{free_port()}/" for _ in range(2)]
    return ",".join([*dead, broker_url])


@pytest.fixture
def queue(broker_url: str, unique: Callable[[str], str]) -> Iterator[str]:
    name = unique("urls")
    yield name
    delete_queues(broker_url, name, f"{name}.dlq")


def listed(settings: Settings, url: str) -> Settings:
    return Settings(**{**settings.model_dump(), "url": url})


async def test_runner_and_publishers_connect_through_a_list(
    settings: Settings, dead_first: str, queue: str, broker_url: str
) -> None:
    seen: list[int] = []

    class Listed(Worker):
        abstract = True

        async def handle(self, body: dict[str, int]) -> None:
            seen.append(body["n"])

    worker = type("ListedQ", (Listed,), {"queue": queue})
    conf = listed(settings, dead_first)
    async with running(Runner([worker], settings=conf)):
        await asyncio.to_thread(Publisher(settings=conf).publish, queue, {"n": 1})
        async with AsyncPublisher(settings=conf) as publisher:
            await publisher.publish(queue, {"n": 2})
        await wait_for(lambda: sorted(seen) == [1, 2], 10, "both messages")
    assert await dlq.count(queue, settings=conf) == 0


async def test_no_host_answering_is_one_error_naming_every_host_without_passwords(
    settings: Settings,
) -> None:
    urls = [f"amqp://guest:pw-{i}@127.0.0.1:{free_port()}/" for i in range(2)]
    conf = listed(settings, ",".join(urls))
    # The publisher retries within its publish timeout, then raises PublishTimeout with the cause.
    with pytest.raises((ConnectionFailed, PublishError)) as info:
        async with AsyncPublisher(settings=conf) as publisher:
            await publisher.publish("x", {})
    text = str(info.value)
    assert "pw-0" not in text and "pw-1" not in text
    assert "no broker answered" in text and text.count("connection refused") == 2


def test_cli_publish_and_dlq_take_a_list(dead_first: str, queue: str, broker_url: str) -> None:
    env_url = ["--url", dead_first]
    topo = [sys.executable, "-m", "workerkit"]
    declare = subprocess.run(
        [*topo, "topology", "tests.scaleout.app:Sleeper", *env_url],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=_env(queue),
        timeout=60,
    )
    assert declare.returncode == 0, declare.stderr
    published = subprocess.run(
        [*topo, "publish", queue, '{"n": 1}', *env_url],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=_env(queue),
        timeout=60,
    )
    assert published.returncode == 0, published.stderr
    assert queue_depth(broker_url, queue) == 1
    listed_dlq = subprocess.run(
        [*topo, "dlq", "list", queue, *env_url],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=_env(queue),
        timeout=60,
    )
    assert listed_dlq.returncode == 0 and "is empty" in listed_dlq.stdout, listed_dlq.stderr


def _env(queue: str) -> dict[str, str]:
    import os

    env = {k: v for k, v in os.environ.items() if not k.startswith("WORKERKIT_")}
    return env | {"WORKERKIT_EXCHANGE": "wkt", "WORKERKIT_TEST_QUEUE": queue}
