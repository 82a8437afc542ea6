"""Integration-test housekeeping."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from .workers_fixture import kill_leftovers


@pytest.fixture(autouse=True)
def _no_leftover_worker_processes() -> Iterator[None]:
    yield
    kill_leftovers()
