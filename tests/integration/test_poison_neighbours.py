"""A message that kills its process, next to another worker of the same process whose own
poison kills it too (the README's ``workerkit run module``: every worker of a module in one
process). A classic queue's redelivery count is a copy published before the original is acked;
a neighbour's handler that killed the process in between brought both back, and the poison
message was handled once more and dead-lettered twice."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from workerkit import Settings

from .workers_fixture import delete_queues, publish_raw, ready_count

pytestmark = pytest.mark.integration

APP = """
import os

from workerkit import Worker


def _ran(name: str) -> None:
    fd = os.open(os.environ["POISON_OUT"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    os.write(fd, (name + "\\n").encode())
    os.close(fd)  # on disk before the process dies


class Quorum(Worker):
    queue = {quorum!r}
    delivery_limit = 2
    concurrency = 1
    prefetch = 1

    def handle(self, body: dict) -> None:
        _ran("quorum")
        os._exit(1)


class Classic(Worker):
    queue = {classic!r}
    queue_type = "classic"
    delivery_limit = 2
    concurrency = 1
    prefetch = 1

    def handle(self, body: dict) -> None:
        _ran("classic")
        os._exit(1)
"""


@pytest.fixture
def queues(broker_url: str, unique: Callable[[str], str]) -> Iterator[tuple[str, str]]:
    quorum, classic = unique("poisonq"), unique("poisonc")
    yield quorum, classic
    delete_queues(broker_url, quorum, f"{quorum}.dlq", classic, f"{classic}.dlq")


def test_a_neighbours_crash_never_multiplies_a_classic_poison_message(
    tmp_path: Path, settings: Settings, queues: tuple[str, str]
) -> None:
    quorum, classic = queues
    url = settings.url.get_secret_value()
    (tmp_path / "poison_app.py").write_text(APP.format(quorum=quorum, classic=classic))
    out = tmp_path / "ran.txt"
    env = {k: v for k, v in os.environ.items() if not k.startswith("WORKERKIT_")}
    env |= {"WORKERKIT_URL": url, "WORKERKIT_EXCHANGE": settings.exchange}
    env |= {"POISON_OUT": str(out), "PYTHONPATH": str(tmp_path)}
    command = [sys.executable, "-m", "workerkit", "run", "poison_app:Quorum", "poison_app:Classic"]
    subprocess.run([*command[:3], "topology", *command[4:]], env=env, check=True, timeout=60)
    for queue in (quorum, classic):
        publish_raw(url, "", queue, json.dumps({"poison": queue}).encode())

    def done() -> bool:
        return all(
            ready_count(url, q) == 0 and ready_count(url, f"{q}.dlq") >= 1
            for q in (quorum, classic)
        )

    # Restart the process whenever a poison killed it, as a process manager would: at most 3
    # crashes each (the first delivery and 2 redeliveries), then both are dead letters.
    for _ in range(12):
        proc = subprocess.Popen(command, env=env, cwd=tmp_path, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while proc.poll() is None and not done() and time.monotonic() < deadline:
            time.sleep(0.1)
        if proc.poll() is None:
            proc.terminate()
            assert proc.wait(30) == 0
            break
    ran = out.read_text().split()
    assert ready_count(url, classic) == 0 and ready_count(url, quorum) == 0, "a copy left over"
    assert ready_count(url, f"{classic}.dlq") == 1, "the classic poison was dead-lettered twice"
    assert ready_count(url, f"{quorum}.dlq") == 1
    # At most the first delivery and 2 redeliveries each. The classic one may run fewer times:
    # a redelivery counts as a crash even when it was the neighbour that crashed.
    assert 1 <= ran.count("classic") <= 3, ran
    assert ran.count("quorum") == 3, ran
