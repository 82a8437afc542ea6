"""Competing consumers: three processes on one queue share uneven work fairly by default.

Every third message is long. The broker hands deliveries round-robin to consumers with credit,
so with a deep prefetch (the old default, 100) one process would receive every long message at
once and work alone on them while its peers sat idle. With the default prefetch (2 x
concurrency) a process holds few messages it has not started, and idle peers take the rest.
"""

from __future__ import annotations

import collections
import json
from collections.abc import Callable, Iterator

import pytest

from .conftest import Group, delete_queues, publish_tasks, wait_until

pytestmark = pytest.mark.integration

PROCESSES = 3
CONCURRENCY = 2
LONG, SHORT = 0.4, 0.02
COUNT = 90


@pytest.fixture
def queue(broker_url: str, unique: Callable[[str], str]) -> Iterator[str]:
    name = unique("fair")
    yield name
    delete_queues(broker_url, name, f"{name}.dlq")


def durations() -> list[float]:
    return [LONG if n % 3 == 0 else SHORT for n in range(COUNT)]


def test_three_processes_share_uneven_work_close_to_the_ideal_time(
    broker_url: str, queue: str, group: Callable[..., Group]
) -> None:
    g = group(broker_url, queue, PROCESSES, "--concurrency", str(CONCURRENCY))
    g.wait_healthy()
    sleeps = durations()
    bodies = [json.dumps({"n": n, "sleep": s}).encode() for n, s in enumerate(sleeps)]
    publish_tasks(broker_url, "wkt", queue, bodies)
    wait_until(lambda: g.done() >= set(range(COUNT)), 60, "every task to be handled")

    lines = g.lines()
    starts = {x.n: x for x in lines if x.kind == "start"}
    ends = {x.n: x for x in lines if x.kind == "done"}
    elapsed = max(x.at for x in ends.values()) - min(x.at for x in starts.values())
    ideal = sum(sleeps) / (PROCESSES * CONCURRENCY)
    work: collections.defaultdict[int, float] = collections.defaultdict(float)
    count: collections.Counter[int] = collections.Counter()
    for n, end in ends.items():
        work[end.pid] += sleeps[n]
        count[end.pid] += 1
    report = f"elapsed {elapsed:.2f}s, ideal {ideal:.2f}s, work {dict(work)}, count {dict(count)}"
    # Every process was busy: each did at least half of its fair share of the work.
    assert len(work) == PROCESSES, report
    assert min(work.values()) >= 0.5 * sum(sleeps) / PROCESSES, report
    assert min(count.values()) >= COUNT / PROCESSES / 3, report
    # Close to the ideal: a prefetched-but-unstarted message waits at most one long handler
    # per slot. Hoarding (prefetch 100) takes 30 x 0.4 / 2 = 6 s against an ideal of 2.2 s.
    assert elapsed <= 1.3 * ideal + 2 * LONG, report
