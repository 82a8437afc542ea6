"""Handler-side faults: a message that kills its process, handlers far longer than the heartbeat,
SIGTERM with handlers longer than the grace period."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import pytest
from broker import PrivateBroker
from harness import Load, WorkerProcess, collect, settle, wait_until
from oracle import Oracle

pytestmark = pytest.mark.reliability


@pytest.mark.parametrize("prefetch", [1, 10])
def test_poison_message_that_kills_its_process_ends_in_dlq(
    prefetch: int,
    private_broker: PrivateBroker,
    workers: Callable[..., WorkerProcess],
    oracle: Oracle,
    out_dir: Path,
    unique: Callable[[str], str],
) -> None:
    queue, url = unique("poison"), private_broker.url
    limit = 2
    settings = {"prefetch": prefetch, "concurrency": 1, "delivery_limit": limit}
    worker = workers(queue, url, **settings)
    worker.wait_healthy()
    Load(oracle, url, queue, 1, body=lambda n: {"n": n, "poison": True}, prefix="p").start().join()
    Load(oracle, url, queue, 50, rate=1000, body=lambda n: {"n": n}).start().join()

    started = [worker]

    def deaths() -> int:
        return sum(w.proc.poll() is not None for w in started)

    def supervise() -> bool:
        """Restart the worker whenever the poison killed it, like a process manager would."""
        nonlocal worker
        if worker.proc.poll() is not None:
            assert worker.proc.returncode == 3, worker.output()
            worker = workers(queue, url, **settings)
            started.append(worker)
        oracle.read_dlq(url, queue)
        return "p0" in oracle.dead

    wait_until(supervise, 60, "the poison message in the DLQ", poll=0.2)
    # Each delivery killed a process: the first one plus ``limit`` redeliveries. The broker can
    # see the last death (socket closed) a moment before the process is reaped.
    wait_until(lambda: deaths() >= limit + 1, 10, f"{limit + 1} deaths")
    if worker.proc.poll() is not None:
        worker = workers(queue, url, **settings)
        started.append(worker)
    worker.wait_healthy()
    settle(oracle, url, queue, out_dir)
    oracle.faults = deaths()
    assert oracle.faults == limit + 1
    assert all(w.proc.returncode in (3, None) for w in started)
    assert "p0" not in oracle.finished
    # Messages prefetched alongside the poison went back to the queue with each crash; they
    # must not share its fate.
    innocents = oracle.dead - {"p0"}
    assert not innocents, f"messages dead-lettered with the poison: {sorted(innocents)}"
    oracle.check(max_duplicates=oracle.faults)


def test_sync_and_cpu_bound_handlers_longer_than_heartbeat(
    private_broker: PrivateBroker,
    workers: Callable[..., WorkerProcess],
    oracle: Oracle,
    out_dir: Path,
    unique: Callable[[str], str],
) -> None:
    queue, url = unique("longsync"), private_broker.url
    # The reconnects once seen here on 4.3 were not the heartbeat: test_consumer_timeout.py left
    # a 5 s consumer_timeout on the session's node, and 4.3 cancelled these consumers. The
    # failure prints the worker's log, which says which it is.
    heartbeat = 6
    worker = workers(queue, url, mode="sync", concurrency=4, prefetch=4, heartbeat=heartbeat)
    worker.wait_healthy()
    # Three times the heartbeat (past both peers' dead-connection checks, 2x and 1x + 5 s):
    # blocking sleeps and GIL-holding pure-Python loops.
    slow = 3 * heartbeat
    bodies = [{"sleep": slow}, {"sleep": slow}, {"cpu": slow}, {"cpu": slow}]
    Load(oracle, url, queue, 4, rate=1000, body=lambda n: {"n": n, **bodies[n]}).start().join()

    def four_finished() -> bool:
        collect(oracle, out_dir)
        return len(oracle.finished) == 4

    wait_until(four_finished, 60, "4 slow jobs")
    settle(oracle, url, queue, out_dir)
    # Healthy again once the long handlers are done (the stats are written every 20 ms).
    wait_until(lambda: worker.healthy, 10, "the worker healthy after its long handlers")
    reconnects = worker.stats()["reconnects"]
    assert reconnects == 0, f"a long handler cost the connection:\n{worker.output()}"
    oracle.check(max_duplicates=0)


def test_sigterm_with_handlers_longer_than_grace(
    private_broker: PrivateBroker,
    workers: Callable[..., WorkerProcess],
    oracle: Oracle,
    out_dir: Path,
    unique: Callable[[str], str],
) -> None:
    queue, url = unique("sigterm"), private_broker.url
    grace = 1.0
    worker = workers(queue, url, prefetch=20, concurrency=5, shutdown_grace=grace)
    worker.wait_healthy()
    Load(
        oracle, url, queue, 5, rate=1000, body=lambda n: {"n": n, "sleep": 4.0}, prefix="s"
    ).start().join()
    Load(oracle, url, queue, 30, rate=1000, body=lambda n: {"n": n}).start().join()
    time.sleep(0.5)  # the long handlers are running
    started = time.monotonic()
    code = worker.terminate(timeout=30)
    took = time.monotonic() - started
    oracle.fault()
    assert code == 0, worker.output()
    assert took < grace + 3.0, f"shutdown took {took:.1f}s with a {grace}s grace period"
    collect(oracle, out_dir)
    assert not {f"s{n}" for n in range(5)} & set(oracle.finished), "a long handler finished?"
    worker = workers(queue, url, shutdown_grace=grace)
    worker.wait_healthy()
    settle(oracle, url, queue, out_dir)
    oracle.check(max_duplicates=0)
