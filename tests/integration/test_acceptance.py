"""The core issue's acceptance run, as a new user would do it.

A worker module with a pydantic model runs through the ``workerkit`` command in its own process;
thousands of messages are published from many threads through one ``Publisher``; each is handled
exactly once, nothing is left in the queue or unacked, and SIGTERM drains to exit code 0.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from workerkit import Publisher, Settings

from .workers_fixture import consumer_count, delete_queues, ready_count

pytestmark = pytest.mark.integration

WORKERKIT = Path(sys.executable).parent / "workerkit"

MODULE = """
import os

from pydantic import BaseModel

from workerkit import Worker


class OrderPlaced(BaseModel):
    order_id: int
    email: str


class CountOrders(Worker):
    queue = {queue!r}
    bindings = ({event!r},)
    prefetch = 200
    concurrency = 20

    async def handle(self, order: OrderPlaced) -> None:
        # One write() per line with O_APPEND: lines from a killed process are never torn.
        fd = os.open({log!r}, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, f"{{order.order_id}}\\n".encode())
        finally:
            os.close(fd)
"""

THREADS = 8
PER_THREAD = 500


def test_cli_worker_handles_thousands_from_many_threads_exactly_once(
    settings: Settings, unique: Callable[[str], str], tmp_path: Path
) -> None:
    queue, event = unique("acceptance"), unique("orders") + ".placed"
    log = tmp_path / "handled.log"
    (tmp_path / "shop.py").write_text(MODULE.format(queue=queue, event=event, log=str(log)))
    url = settings.url.get_secret_value()
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("WORKERKIT_")},
        "WORKERKIT_URL": url,
        "WORKERKIT_EXCHANGE": settings.exchange,
        "WORKERKIT_SHUTDOWN_GRACE": "10",
    }
    proc = subprocess.Popen(
        [str(WORKERKIT), "run", "shop:CountOrders"],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 20
        while consumer_count(url, queue) < 1:
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            assert time.monotonic() < deadline, "the worker never started consuming"
            time.sleep(0.05)

        publisher = Publisher(settings=settings)
        errors: list[BaseException] = []

        def produce(thread: int) -> None:
            try:
                for i in range(PER_THREAD):
                    order_id = thread * PER_THREAD + i
                    publisher.publish(event, {"order_id": order_id, "email": f"{order_id}@x.y"})
            except BaseException as exc:  # surfaced below
                errors.append(exc)

        threads = [threading.Thread(target=produce, args=(t,)) for t in range(THREADS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        publisher.close()
        assert not errors, errors

        total = THREADS * PER_THREAD
        deadline = time.monotonic() + 60
        while len(_handled(log)) < total:
            assert time.monotonic() < deadline, f"handled {len(_handled(log))} of {total}"
            time.sleep(0.05)

        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0, proc.stderr.read() if proc.stderr else ""
        handled = _handled(log)
        assert sorted(handled) == list(range(total)), "every order handled exactly once"
        # After the drain nothing is unacked: anything unacked would be back in the queue.
        assert ready_count(url, queue) == 0
        assert ready_count(url, f"{queue}.dlq") == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        delete_queues(url, queue, f"{queue}.dlq")


def _handled(log: Path) -> list[int]:
    if not log.exists():
        return []
    return [int(line) for line in log.read_text().splitlines() if line]
