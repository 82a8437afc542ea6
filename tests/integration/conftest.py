"""Integration-test housekeeping: no worker process outlives its test, no queue outlives it."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from workerkit.settings import Settings

from .workers_fixture import delete_queues, kill_leftovers


@pytest.fixture(autouse=True)
def _no_leftover_worker_processes() -> Iterator[None]:
    yield
    kill_leftovers()


@pytest.fixture
def cleanup(settings: Settings) -> Iterator[list[str]]:
    """Work queues to delete after the test; their DLQs are deleted with them."""
    queues: list[str] = []
    yield queues
    delete_queues(settings.url.get_secret_value(), *queues, *(f"{q}.dlq" for q in queues))
