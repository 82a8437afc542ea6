"""The reliability suite's worker process with two more steering fields for cluster scenarios.

``python cluster_worker.py QUEUE OUT_DIR`` runs worker_proc.py's main loop (finished file,
stats.json) over a worker whose body may ask for a broker-side retry on the first attempt
(``retry_first`` seconds: the message sits in the delay layout meanwhile) or a dead-letter
(``reject``), so that the scenarios prove retries and DLQs through node failures.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "reliability"))

import worker_proc

from workerkit import Message, Reject, RetryLater, Worker


class Step(worker_proc.Job):
    retry_first: float = 0.0
    reject: bool = False


class Steered(Worker):
    abstract = True

    async def handle(self, job: Step, message: Message) -> None:
        if job.reject:
            raise Reject("steered to the DLQ")
        if job.retry_first and message.attempt == 1:
            raise RetryLater(job.retry_first, "steered retry")
        if job.sleep:
            await asyncio.sleep(job.sleep)
        worker_proc.record(message)


def make_worker(queue: str, mode: str, queue_type: str = "quorum") -> type[Worker]:
    return type("SteeredQ", (Steered,), {"queue": queue, "queue_type": queue_type})


if __name__ == "__main__":
    worker_proc.make_worker = make_worker
    asyncio.run(worker_proc.main(sys.argv[1], Path(sys.argv[2]), "async", "quorum"))
