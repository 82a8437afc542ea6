"""Helpers for testing workers: run a Runner in the background, wait on conditions, and run
workers on an in-memory broker when no RabbitMQ is at hand."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any

from .publisher import AsyncPublisher
from .runner import Runner
from .settings import Settings
from .transport.memory import MemoryBroker, MemoryTransport
from .worker import Worker

__all__ = ["MemoryBroker", "in_memory", "memory_publisher", "running", "wait_for"]


@asynccontextmanager
async def running(runner: Runner, timeout: float = 20.0) -> AsyncIterator[asyncio.Task[None]]:
    """Run ``runner`` in the background for the body of the block, then stop it and wait.

    Start-up errors (bad topology, refused credentials) are raised from the ``async with``.
    """
    task = asyncio.create_task(runner.run())
    try:
        ready = asyncio.create_task(runner.wait_ready(timeout))
        done, _ = await asyncio.wait({ready, task}, return_when=asyncio.FIRST_COMPLETED)
        if task in done:
            ready.cancel()
            task.result()
        await ready
        yield task
    finally:
        runner.stop()
        await asyncio.wait_for(task, timeout + runner.settings.shutdown_grace)


async def wait_for(condition: Callable[[], bool], timeout: float = 10.0, what: str = "") -> None:
    """Poll ``condition`` until it is true; fail after ``timeout`` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():
        if loop.time() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or condition}")
        await asyncio.sleep(0.01)


def in_memory(
    workers: Sequence[type[Worker]],
    *,
    broker: MemoryBroker | None = None,
    settings: Settings | None = None,
    **kwargs: Any,
) -> tuple[Runner, MemoryBroker]:
    """A Runner on an in-memory broker (no RabbitMQ), and that broker to inspect.

    Signal handlers are left alone unless ``handle_signals=True`` is passed.
    """
    broker = broker if broker is not None else MemoryBroker()
    kwargs.setdefault("handle_signals", False)
    runner = Runner(workers, settings=settings, transport=MemoryTransport(broker), **kwargs)
    return runner, broker


def memory_publisher(broker: MemoryBroker, settings: Settings | None = None) -> AsyncPublisher:
    """An AsyncPublisher that publishes to ``broker``: ``async with memory_publisher(b) as p``."""
    return AsyncPublisher(settings=settings, transport=MemoryTransport(broker))
