"""A worker process for the reliability suite: ``python worker_proc.py QUEUE OUT_DIR``.

It runs :class:`workerkit.Runner` exactly as ``workerkit run`` would (settings from
``WORKERKIT_*``, SIGTERM drains) over one worker on ``QUEUE`` whose handler is steered by the
message body (``Job``). Every finished handler appends its message id to ``OUT_DIR/finished``
with one ``write()`` on an O_APPEND file: a kill -9 can stop the process between two writes,
never in the middle of one, and the kernel keeps what was written (no fsync needed: the
machine does not crash, only the process). ``OUT_DIR/stats.json`` is rewritten every few
milliseconds with the runner's health, so the test can time how long recovery took.

Handler modes (``WORKERKIT_TEST_MODE``): ``async`` (default) or ``sync`` (runs in the pool).
``WORKERKIT_TEST_QUEUE_TYPE`` picks ``quorum`` (default) or ``classic``. Every handler run, failed
or not, also appends ``<id> <attempt> <ok|fail|reject> <time>`` to ``OUT_DIR/attempts`` (the chaos
soak checks the retry ladder with it), and the runner's ``/health`` endpoint listens on a free
loopback port written to the stats file as ``health_port``.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from pathlib import Path

from pydantic import BaseModel

from workerkit import Message, Reject, Runner, Worker
from workerkit.health import serve_health


class Job(BaseModel):
    n: int
    sleep: float = 0.0  # seconds the handler sleeps (blocking in sync mode)
    cpu: float = 0.0  # seconds of pure-Python busy work (holds the GIL)
    poison: bool = False  # kill the process from inside the handler
    fail: int = 0  # raise ChaosFailure on attempts 1..fail (a large value: always)
    reject: bool = False  # raise Reject (straight to the DLQ)


class ChaosFailure(Exception):
    """What a failing handler raises; its name is checked in the DLQ headers."""


def busy(seconds: float) -> None:
    end = time.monotonic() + seconds
    x = 0
    while time.monotonic() < end:
        for i in range(10_000):
            x += i * i


OUT_FD = -1  # the "finished" file, opened in main()
ATTEMPTS_FD = -1  # the "attempts" file, opened in main()


def record(message: Message) -> None:
    os.write(OUT_FD, f"{message.message_id}\n".encode())


def outcome(job: Job, message: Message) -> None:
    """Fail, reject or record the run, as the body asks; every run is logged to ``attempts``."""
    verdict = "reject" if job.reject else "fail" if message.attempt <= job.fail else "ok"
    line = f"{message.message_id} {message.attempt} {verdict} {time.time():.3f}\n"
    os.write(ATTEMPTS_FD, line.encode())
    if job.reject:
        raise Reject("chaos: rejected by the body")
    if verdict == "fail":
        raise ChaosFailure(f"chaos: attempt {message.attempt} of {job.fail} failing")
    record(message)


class AsyncRecorder(Worker):
    abstract = True

    async def handle(self, job: Job, message: Message) -> None:
        if job.poison:
            os._exit(3)
        if job.cpu:
            busy(job.cpu)
        if job.sleep:
            await asyncio.sleep(job.sleep)
        outcome(job, message)


class SyncRecorder(Worker):
    abstract = True

    def handle(self, job: Job, message: Message) -> None:
        if job.poison:
            os._exit(3)
        if job.cpu:
            busy(job.cpu)
        if job.sleep:
            time.sleep(job.sleep)
        outcome(job, message)


def make_worker(queue: str, mode: str, queue_type: str = "quorum") -> type[Worker]:
    base = SyncRecorder if mode == "sync" else AsyncRecorder
    return type(base.__name__ + "Q", (base,), {"queue": queue, "queue_type": queue_type})


async def watch(runner: Runner, stats: Path, health_port: int) -> None:
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
                    "health_port": health_port,
                }
            )
        )
        tmp.replace(stats)
        await asyncio.sleep(0.02)


async def main(queue: str, out_dir: Path, mode: str, queue_type: str) -> None:
    global OUT_FD, ATTEMPTS_FD
    flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT
    OUT_FD = os.open(out_dir / "finished", flags, 0o644)
    ATTEMPTS_FD = os.open(out_dir / "attempts", flags, 0o644)
    runner = Runner([make_worker(queue, mode, queue_type)])
    health = await serve_health(lambda: bool(runner.healthy), "127.0.0.1", 0)
    watcher = asyncio.create_task(watch(runner, out_dir / "stats.json", health.port))
    try:
        await runner.run()
    finally:
        watcher.cancel()
        await health.close()
        os.close(OUT_FD)
        os.close(ATTEMPTS_FD)


if __name__ == "__main__":
    asyncio.run(
        main(
            sys.argv[1],
            Path(sys.argv[2]),
            os.environ.get("WORKERKIT_TEST_MODE", "async"),
            os.environ.get("WORKERKIT_TEST_QUEUE_TYPE", "quorum"),
        )
    )
