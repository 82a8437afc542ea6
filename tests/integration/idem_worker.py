"""An idempotent worker process for the kill -9 tests (test_idempotency_faults.py).

    python tests/integration/idem_worker.py MODE QUEUE URL EXCHANGE PREFIX

Every handled message increments ``PREFIX effects:<id>`` in Redis (the side effect the tests
count) and every claim ``PREFIX claims:<id>``. MODE ``kill-after-commit``: the first commit of
the process tree is followed by SIGKILL (the ack is never sent). MODE ``hang-first``: a plain
``def`` handler whose first run writes ``PREFIX started:<id>`` and hangs until it is killed.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from typing import Any

import redis

from workerkit import Settings, Worker, run
from workerkit.idempotency import Claim, RedisStore
from workerkit.log import configure_logging

REDIS = "redis://127.0.0.1:6379/0"


def main() -> None:
    mode, queue_name, url, exchange, prefix = sys.argv[1:6]
    r = redis.Redis.from_url(REDIS)

    class CountingStore(RedisStore):
        async def claim(self, key: str, token: str, ttl: float) -> tuple[Claim, float]:
            r.incr(f"{prefix}claims:{key.rsplit(':', 1)[-1]}")
            return await super().claim(key, token, ttl)

        async def commit(self, key: str, token: str, ttl: float) -> bool:
            ok = await super().commit(key, token, ttl)
            if mode == "kill-after-commit" and r.set(f"{prefix}killed", 1, nx=True):
                os.kill(os.getpid(), signal.SIGKILL)  # after the commit, before the ack
            return ok

    store = CountingStore(REDIS, prefix=prefix)

    if mode == "kill-after-commit":

        class Charge(Worker):
            queue = queue_name
            idempotent = True
            idempotency_store = store
            handler_timeout = 4.0

            async def handle(self, body: dict[str, Any]) -> None:
                r.incr(f"{prefix}effects:{body['id']}")

    else:

        class Charge(Worker):  # type: ignore[no-redef]
            queue = queue_name
            idempotent = True
            idempotency_store = store
            handler_timeout = 4.0

            def handle(self, body: dict[str, Any]) -> None:
                if r.set(f"{prefix}started:{body['id']}", 1, nx=True):
                    time.sleep(60)  # killed here by the test, mid-handler
                r.incr(f"{prefix}effects:{body['id']}")

    configure_logging("INFO")
    run([Charge], settings=Settings(url=url, exchange=exchange, shutdown_grace=2.0))


if __name__ == "__main__":
    main()
