"""Helpers for testing workers: run a Runner in the background, wait on conditions."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from .runner import Runner

__all__ = ["running", "wait_for"]


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
