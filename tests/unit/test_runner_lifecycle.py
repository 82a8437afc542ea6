"""Runner lifecycle without a broker: start-up warnings, stopping while the broker is down."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterator

import pytest

from workerkit import Settings, Worker
from workerkit.testing import in_memory, running


class Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


@pytest.fixture
def warnings() -> Iterator[list[str]]:
    # Attached to the runner's own logger: configure_logging may have stopped propagation.
    handler = Collect()
    logger = logging.getLogger("workerkit.runner")
    logger.addHandler(handler)
    yield handler.lines
    logger.removeHandler(handler)


def make_worker(timeout: float | None) -> type[Worker]:
    async def handle(self: Worker, body: bytes) -> None:
        return None

    name = f"u.timeouts.{uuid.uuid4().hex[:8]}"
    return type("Slow", (Worker,), {"queue": name, "handle": handle, "handler_timeout": timeout})


@pytest.mark.parametrize(("timeout", "warned"), [(1700.0, True), (60.0, False), (None, False)])
async def test_handler_timeout_close_to_consumer_timeout_is_warned(
    warnings: list[str], timeout: float | None, warned: bool
) -> None:
    settings = Settings(broker_consumer_timeout=1800, shutdown_grace=0.5)
    runner, _ = in_memory([make_worker(timeout)], settings=settings)
    async with running(runner):
        pass
    found = [line for line in warnings if "not safely below" in line]
    assert bool(found) is warned, warnings
    if warned:
        assert "1700s" in found[0] and "1800s" in found[0]


async def test_stop_cuts_a_reconnect_backoff_short(monkeypatch: pytest.MonkeyPatch) -> None:
    """SIGTERM while the broker is down must not wait out the backoff (Docker kills at 10 s)."""
    import asyncio
    from typing import Any

    import tenacity

    import workerkit.runner
    from workerkit.errors import ConnectionFailed
    from workerkit.transport.memory import MemoryBroker

    def slow_backoff(**kwargs: Any) -> tenacity.AsyncRetrying:
        extra = {"sleep": kwargs["sleep"]} if "sleep" in kwargs else {}
        return tenacity.AsyncRetrying(wait=tenacity.wait_fixed(30), reraise=True, **extra)

    monkeypatch.setattr(workerkit.runner, "reconnecting", slow_backoff)
    broker = MemoryBroker()
    broker.connect_error = ConnectionFailed("broker down")
    runner, _ = in_memory([make_worker(None)], broker=broker, settings=Settings())
    attempts = 0
    connect = runner.transport.connect

    async def counted(*args: Any, **kwargs: Any) -> Any:
        nonlocal attempts
        attempts += 1
        return await connect(*args, **kwargs)

    runner.transport.connect = counted  # type: ignore[method-assign]
    task = asyncio.create_task(runner.run())
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 5
    while attempts < 1:
        assert loop.time() < deadline, "the runner never tried to connect"
        await asyncio.sleep(0.01)
    runner.stop()
    await asyncio.wait_for(task, 2)  # not 30 s
    assert not runner.healthy and runner.reconnects == 0
