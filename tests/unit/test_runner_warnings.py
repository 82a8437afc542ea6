"""Start-up warns when a handler time limit is not safely below the broker's consumer_timeout."""

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
