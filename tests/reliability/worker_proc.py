"""A worker process for the reliability suite: ``python worker_proc.py QUEUE OUT_DIR``.

It runs :class:`workerkit.Runner` exactly as ``workerkit run`` would (settings from
``WORKERKIT_*``, SIGTERM drains) over one worker on ``QUEUE`` whose handler is steered by the
message body (``Job``). Every finished handler appends its message id to ``OUT_DIR/finished``
with one ``write()`` on an O_APPEND file: a kill -9 can stop the process between two writes,
never in the middle of one, and the kernel keeps what was written (no fsync needed: the
machine does not crash, only the process). ``OUT_DIR/stats.json`` is rewritten every few
milliseconds with the runner's health, so the test can time how long recovery took.

Handler modes (``WORKERKIT_TEST_MODE``): ``async`` (default) or ``sync`` (runs in the pool).
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from pathlib import Path

from pydantic import BaseModel

from workerkit import Message, Runner, Worker


class Job(BaseModel):
    n: int
    sleep: float = 0.0  # seconds the handler sleeps (blocking in sync mode)
    cpu: float = 0.0  # seconds of pure-Python busy work (holds the GIL)
    poison: bool = False  # kill the process from inside the handler


def busy(seconds: float) -> None:
    end = time.monotonic() + seconds
    x = 0
    while time.monotonic() < end:
        for i in range(10_000):
            x += i * i


OUT_FD = -1  # the "finished" file, opened in main()


def record(message: Message) -> None:
    os.write(OUT_FD, f"{message.message_id}\n".encode())


class AsyncRecorder(Worker):
    abstract = True

    async def handle(self, job: Job, message: Message) -> None:
        if job.poison:
            os._exit(3)
        if job.cpu:
            busy(job.cpu)
        if job.sleep:
            await asyncio.sleep(job.sleep)
        record(message)


class SyncRecorder(Worker):
    abstract = True

    def handle(self, job: Job, message: Message) -> None:
        if job.poison:
            os._exit(3)
        if job.cpu:
            busy(job.cpu)
        if job.sleep:
            time.sleep(job.sleep)
        record(message)


def make_worker(queue: str, mode: str) -> type[Worker]:
    base = SyncRecorder if mode == "sync" else AsyncRecorder
    return type(base.__name__ + "Q", (base,), {"queue": queue})


async def watch(runner: Runner, stats: Path) -> None:
    """Write the runner's health every 20 ms, with the wall-clock time it came back."""
    back_at: list[float] = []
    was_healthy = False
    tmp = stats.with_suffix(".tmp")
    while True:
        healthy = runner.healthy
        if healthy and not was_healthy:
            back_at.append(time.time())
        was_healthy = healthy
        tmp.write_text(
            json.dumps(
                {
                    "pid": os.getpid(),
                    "healthy": healthy,
                    "reconnects": runner.reconnects,
                    "last_recovery": runner.last_recovery,
                    "back_at": back_at,
                }
            )
        )
        tmp.replace(stats)
        await asyncio.sleep(0.02)


async def main(queue: str, out_dir: Path, mode: str) -> None:
    global OUT_FD
    OUT_FD = os.open(out_dir / "finished", os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    runner = Runner([make_worker(queue, mode)])
    watcher = asyncio.create_task(watch(runner, out_dir / "stats.json"))
    try:
        await runner.run()
    finally:
        watcher.cancel()
        os.close(OUT_FD)


if __name__ == "__main__":
    asyncio.run(
        main(sys.argv[1], Path(sys.argv[2]), os.environ.get("WORKERKIT_TEST_MODE", "async"))
    )
