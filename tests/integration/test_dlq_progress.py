"""``workerkit dlq replay --all`` on a big DLQ reports progress on stderr when piped; stdout keeps
only the result."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from workerkit import Settings

from .workers_fixture import declare_raw, delete_queues, publish_many_raw, ready_count

pytestmark = pytest.mark.integration

WORKERKIT = Path(sys.executable).parent / "workerkit"


@pytest.fixture
def queue(settings: Settings, unique: Callable[[str], str]) -> Iterator[str]:
    name = unique("progress")
    yield name
    delete_queues(settings.url.get_secret_value(), name, f"{name}.dlq")


def test_replay_all_prints_progress_lines_when_piped(settings: Settings, queue: str) -> None:
    url = settings.url.get_secret_value()
    declare_raw(url, queue)
    declare_raw(url, f"{queue}.dlq")
    publish_many_raw(url, "", f"{queue}.dlq", [b'{"n": %d}' % n for n in range(1200)])
    env = {**os.environ, "WORKERKIT_URL": url}
    replay = subprocess.run(
        [str(WORKERKIT), "dlq", "replay", queue, "--all"],
        env=env,
        capture_output=True,
        text=True,
        timeout=90,
    )
    assert replay.returncode == 0, replay.stderr
    assert replay.stdout == f"replayed 1200 message(s) to {queue}\n"
    lines = replay.stderr.splitlines()
    assert lines[0] == f"replaying {queue}.dlq: 0/1200 (0%)"
    assert lines[-1] == f"replaying {queue}.dlq: 1200/1200 (100%)"
    assert ready_count(url, queue) == 1200 and ready_count(url, f"{queue}.dlq") == 0

    purge = subprocess.run(
        [str(WORKERKIT), "dlq", "purge", queue, "--yes"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert purge.returncode == 0 and purge.stderr == ""  # no spinner in a pipe
