"""A worker app for the multi-process tests, run by ``workerkit run tests.scaleout.app``.

The queue comes from ``WORKERKIT_TEST_QUEUE``. Every handler appends ``start PID N TIME`` and
``done PID N TIME`` lines to the file named by ``WORKERKIT_TEST_OUT`` with one ``write()`` on
an O_APPEND file, so that lines from several processes never interleave and a kill -9 never
leaves half a line. ``WORKERKIT_TEST_CRASH=start`` makes every child process exit 1 at import
(a crash at start-up; the supervising parent imports the module too and must not crash).
"""

from __future__ import annotations

import asyncio
import os
import sys
import time

from pydantic import BaseModel

from workerkit import Worker

if os.environ.get("WORKERKIT_TEST_CRASH") == "start" and "--status-fd" in sys.argv:
    os._exit(1)


class Task(BaseModel):
    n: int
    sleep: float = 0.0


def _line(kind: str, n: int) -> None:
    out = os.environ["WORKERKIT_TEST_OUT"]
    fd = os.open(out, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, f"{kind} {os.getpid()} {n} {time.time():.6f}\n".encode())
    finally:
        os.close(fd)


class Sleeper(Worker):
    queue = os.environ.get("WORKERKIT_TEST_QUEUE", "t.scaleout.unset")

    async def handle(self, task: Task) -> None:
        _line("start", task.n)
        if task.sleep:
            await asyncio.sleep(task.sleep)
        _line("done", task.n)
