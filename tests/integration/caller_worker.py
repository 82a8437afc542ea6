"""A worker process for the caller's fault tests: echoes each request after SLEEP seconds.

``python caller_worker.py QUEUE URL EXCHANGE SLEEP`` writes ``start <body>`` lines to stdout as
handlers begin (so that a test can kill it mid-request) and answers ``{"echo": body, "pid": pid}``.
"""

from __future__ import annotations

import asyncio
import os
import sys
from typing import Any


def main() -> None:
    from workerkit import Settings, Worker, run

    queue_name, url, exchange, sleep = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])

    class Echo(Worker):
        queue = queue_name
        concurrency = 4

        async def handle(self, body: str) -> dict[str, Any]:
            print(f"start {body}", flush=True)
            await asyncio.sleep(sleep)
            return {"echo": body, "pid": os.getpid()}

    run([Echo], settings=Settings(url=url, exchange=exchange, publish_timeout=5.0))


if __name__ == "__main__":
    main()
