"""A backlog of large bodies against a worker's memory budget (issue 9, item 9).

RabbitMQ sends ``prefetch`` deliveries whatever their size, so a worker's memory was bounded by
prefetch x body size: 40 bodies of 8 MB with prefetch 100 all sit in the worker at once, and a
backlog of bigger ones OOM-kills it, again after every restart, while the broker counts a
delivery against every innocent message of its prefetch window each time. ``max_in_flight_bytes``
caps the prefetch at ``max_in_flight_bytes // max_body_size``.

The worker's peak RSS (``VmHWM``) while it drains the backlog is measured against its idle RSS,
with the budget and without it; every message must be handled exactly once, none dead-lettered.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from broker import PrivateBroker
from harness import Load, WorkerProcess, collect, wait_until
from oracle import Oracle, drain

pytestmark = [pytest.mark.reliability, pytest.mark.timeout(400)]

MiB = 1024 * 1024
BODY = 8 * MiB
COUNT = 40
BUDGET = 64 * MiB
# Just above the bodies, so that the budget's deliveries (7) are nearly all it allows (63 MiB).
MAX_BODY = BODY + 64 * 1024
# Documented (docs/reliability.md, "Memory"): a worker's RSS grows by at most twice its budget
# over its idle RSS (bodies held, the one being received, decoding, allocator slack).
GROWTH_BOUND = 2 * BUDGET
SETTINGS: dict[str, object] = {
    "prefetch": 100,
    "concurrency": 4,
    "max_body_size": MAX_BODY,
    "publish_timeout": 30.0,
}


def big(n: int) -> dict[str, object]:
    return {"n": n, "sleep": 0.3, "pad": "x" * (BODY - 40)}


def status(pid: int, field: str) -> int:
    """A ``/proc/<pid>/status`` memory field in bytes (VmRSS, VmHWM)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no {field} in /proc/{pid}/status")


def drain_backlog(
    budget: int,
    workers: Callable[..., WorkerProcess],
    oracle: Oracle,
    url: str,
    queue: str,
    out_dir: Path,
    prefix: str,
) -> tuple[int, int]:
    """(idle RSS, peak RSS) of a worker draining COUNT big bodies published before it started."""
    settings = {**SETTINGS, "max_in_flight_bytes": budget}
    idle_worker = workers(queue, url, **settings)
    idle_worker.wait_healthy(60)
    idle = status(idle_worker.proc.pid, "VmRSS")
    assert idle_worker.terminate() == 0
    load = Load(oracle, url, queue, COUNT, rate=1000, body=big, threads=2, prefix=prefix)
    load.start().join(240)
    assert not load.errors, load.errors[:3]
    worker = workers(queue, url, **settings)
    ids = {f"{prefix}{n}" for n in range(COUNT)}

    def handled() -> bool:
        collect(oracle, out_dir)
        return ids <= set(oracle.finished) or worker.proc.poll() is not None

    wait_until(handled, 240, f"the {COUNT} big bodies to be handled", poll=0.5)
    assert worker.proc.poll() is None, f"the worker died:\n{worker.output()}"
    peak = status(worker.proc.pid, "VmHWM")
    assert worker.stats().get("reconnects") == 0
    assert worker.terminate() == 0
    return idle, peak


def test_a_backlog_of_big_bodies_stays_within_the_memory_budget(
    private_broker: PrivateBroker,
    workers: Callable[..., WorkerProcess],
    oracle: Oracle,
    out_dir: Path,
    unique: Callable[[str], str],
) -> None:
    queue, url = unique("bigbodies"), private_broker.url
    idle, peak = drain_backlog(BUDGET, workers, oracle, url, queue, out_dir, "b")
    idle_off, peak_off = drain_backlog(0, workers, oracle, url, queue, out_dir, "u")
    growth, growth_off = peak - idle, peak_off - idle_off
    print(
        f"\n{COUNT} x {BODY // MiB} MiB, prefetch 100, concurrency 4: peak RSS growth"
        f" {growth / MiB:.0f} MiB with max_in_flight_bytes {BUDGET // MiB} MiB"
        f" (prefetch {BUDGET // MAX_BODY}),"
        f" {growth_off / MiB:.0f} MiB without (idle {idle / MiB:.0f} MiB)"
    )
    dead = drain(url, f"{queue}.dlq")
    assert not dead, f"{len(dead)} innocent message(s) dead-lettered"
    oracle.check(max_duplicates=0)
    assert len(oracle.finished) == 2 * COUNT
    assert growth <= GROWTH_BOUND, (
        f"RSS grew {growth / MiB:.0f} MiB over idle, bound {GROWTH_BOUND / MiB:.0f} MiB"
    )
    # Without the budget the same backlog takes far more: the measurement can tell them apart.
    assert growth_off > GROWTH_BOUND, f"unbounded growth only {growth_off / MiB:.0f} MiB"


DEAD_BODY = 12 * MiB


def rejected(n: int) -> dict[str, object]:
    return {"n": n, "reject": True, "pad": "x" * (DEAD_BODY - 60)}


def test_dead_lettering_big_bodies_costs_few_copies(
    private_broker: PrivateBroker,
    workers: Callable[..., WorkerProcess],
    oracle: Oracle,
    out_dir: Path,
    unique: Callable[[str], str],
) -> None:
    """A body on its way to the DLQ was held about nine times at peak: the failure's traceback
    kept the delivery's frame (and its body) alive in a cycle until the garbage collector ran,
    and the copy's frames were sliced, marshalled, joined and the unsent rest sliced again.
    Now: the body, its frames built once, and what the allocator keeps (about three)."""
    queue, url = unique("bigdead"), private_broker.url
    settings = {"prefetch": 1, "concurrency": 1, "max_body_size": 16 * MiB, "publish_timeout": 30}
    worker = workers(queue, url, **settings)
    worker.wait_healthy(60)
    idle = status(worker.proc.pid, "VmRSS")
    count = 6
    Load(oracle, url, queue, count, rate=1000, body=rejected, threads=1, prefix="d").start().join(
        240
    )
    dead: set[str] = set()

    def all_dead() -> bool:
        dead.update(mid for mid, _headers in drain(url, f"{queue}.dlq"))
        return len(dead) == count or worker.proc.poll() is not None

    wait_until(all_dead, 120, "the big bodies to be dead-lettered", poll=0.5)
    peak = status(worker.proc.pid, "VmHWM")
    growth = peak - idle
    print(
        f"\ndead-lettering {count} x {DEAD_BODY // MiB} MiB: peak RSS growth"
        f" {growth / MiB:.0f} MiB = {growth / DEAD_BODY:.1f} bodies"
    )
    assert dead == {f"d{n}" for n in range(count)}
    assert growth <= 4 * DEAD_BODY, f"RSS grew by {growth / DEAD_BODY:.1f} bodies"
