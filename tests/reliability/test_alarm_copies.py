"""Failing handlers under a memory alarm longer than a delivery may be held (issue 9, item 4).

Under an alarm the broker reads no publish of the runner's publish connection: a retry or DLQ
copy sent then is neither confirmed nor refused, it waits in the connection until the alarm
clears and is delivered after it. Once the original has been held as long as the broker's
consumer_timeout allows it must be given back, and it comes back, fails again and wants the
same copy again. If each comes with a copy of its own, one failing message becomes one copy per
consumer timeout of alarm, each climbing the retry ladder into the DLQ.

Here the worker says the broker's consumer_timeout is 6 s (the node's own stays 30 min), so a
15 s alarm outlasts the lease of every delivery it catches two or three times. The oracle must
still find: nothing lost, at most one extra copy per message (one fault) and no more extra
copies than deliveries in flight, each always-failing message in the DLQ exactly once with
workerkit's headers, and a retry ladder that ran each of its attempts.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from broker import PrivateBroker
from harness import Load, WorkerProcess, collect, set_alarm, wait_until
from oracle import Oracle, drain, read_finished_file

pytestmark = [pytest.mark.reliability, pytest.mark.timeout(300)]

PREFETCH = 8  # deliveries in flight: the bound on extra copies per fault
MAX_ATTEMPTS = 3
ALWAYS = 99
ALARM_HOLD = 15.0  # seconds the alarm stays up once failing handlers ran: over two leases
SETTINGS: dict[str, object] = {
    "prefetch": PREFETCH,
    "concurrency": PREFETCH,
    "retry_max_attempts": MAX_ATTEMPTS,
    "retry_delay": 0.2,
    "publish_timeout": 1.0,
    # The lease: 95 % of 6 s. handler_timeout leaves max_wait = 5.7 - 1 = 4.7 s.
    "broker_consumer_timeout": 6.0,
    "handler_timeout": 1.0,
    "delivery_limit": 50,  # give-backs under the alarm must not reach the broker's limit
}


def body(n: int) -> dict[str, object]:
    """Always failing (n % 3 == 0), failing once or twice then succeeding, or succeeding."""
    if n % 3 == 0:
        return {"n": n, "fail": ALWAYS}
    if n % 3 == 1:
        return {"n": n, "fail": 1 + n % 2}
    return {"n": n}


def runs(out_dir: Path) -> dict[str, list[tuple[int, str]]]:
    """message id -> (attempt, verdict) of every handler run, from the workers' attempts file."""
    found: dict[str, list[tuple[int, str]]] = collections.defaultdict(list)
    for line in read_finished_file(out_dir / "attempts"):
        mid, attempt, verdict, _when = line.split()
        found[mid].append((int(attempt), verdict))
    return found


def text(value: object) -> object:
    return value.decode() if isinstance(value, bytes) else value


def test_failing_handlers_under_a_long_alarm_make_no_extra_copies(
    private_broker: PrivateBroker,
    workers: Callable[..., WorkerProcess],
    oracle: Oracle,
    out_dir: Path,
    unique: Callable[[str], str],
) -> None:
    queue, url = unique("alarm-fail"), private_broker.url
    worker = workers(queue, url, **SETTINGS)
    worker.wait_healthy(60)
    assert worker.terminate() == 0  # the queue and the layout exist; the backlog waits
    count = 30
    Load(oracle, url, queue, count, rate=1000, body=body, prefix="f").start().join()
    assert len(oracle.confirmed) == count
    set_alarm(private_broker, True)
    oracle.fault()
    try:
        worker = workers(queue, url, **SETTINGS)
        worker.wait_healthy(60)
        wait_until(lambda: len(runs(out_dir)) >= PREFETCH, 30, "handlers to run under the alarm")
        time.sleep(ALARM_HOLD)  # the fault itself: the alarm stays raised this long
        # The premise: the alarm outlasted the lease, so deliveries came back and ran again.
        again = [mid for mid, seen in runs(out_dir).items() if len(seen) > len(set(seen))]
    finally:
        set_alarm(private_broker, False)
    assert again, "no delivery was given back under the alarm: the test proves nothing"

    dlq: dict[str, list[dict[str, object]]] = collections.defaultdict(list)

    def settled() -> bool:
        collect(oracle, out_dir)
        for mid, headers in drain(url, f"{queue}.dlq"):
            oracle.dead.add(mid)
            dlq[mid].append(headers)
        return not oracle.lost and _idle(private_broker, queue)

    wait_until(settled, 90, "every message to be finished or dead-lettered", poll=0.5)

    # Copies the cleared alarm let through reach the queue at once; the ladder takes < 1 s.
    # Settled twice in a row, a second apart, means no copy is still on its way.
    def settled_twice() -> bool:
        if not settled():
            return False
        time.sleep(1.0)
        return settled()

    wait_until(settled_twice, 30, "a quiet queue")
    seen = runs(out_dir)
    problems: list[str] = []
    extra_total = 0
    for n in range(count):
        mid = f"f{n}"
        job = body(n)
        copies = oracle.finished.get(mid, 0) + len(dlq.get(mid, []))
        extra_total += max(0, copies - 1)
        if copies - 1 > oracle.faults:
            problems.append(f"{mid} {job}: {copies} copies, runs {sorted(seen.get(mid, []))}")
        attempts = {attempt for attempt, _verdict in seen.get(mid, [])}
        if job.get("fail") == ALWAYS:
            problems += [
                f"{p}; runs {sorted(seen.get(mid, []))}"
                for p in _dead_lettered_once(mid, queue, dlq.get(mid, []))
            ]
            if mid in oracle.finished:
                problems.append(f"{mid} always fails but was finished")
            want = set(range(1, MAX_ATTEMPTS + 1))
        else:
            if mid in dlq:
                problems.append(f"{mid} {job} should succeed but was dead-lettered")
            want = set(range(1, int(job.get("fail", 0)) + 2))  # type: ignore[call-overload]
        if attempts != want:
            problems.append(f"{mid} ran attempts {sorted(attempts)}, not {sorted(want)}")
    print(
        f"\nalarm {ALARM_HOLD}s, lease 5.7s: runs given back and run again: {len(again)};"
        f" extra copies {extra_total} (bound {PREFETCH * oracle.faults})"
    )
    assert not problems, "\n".join(problems) + "\n" + worker.output()
    assert extra_total <= PREFETCH * oracle.faults
    oracle.check(max_duplicates=PREFETCH * oracle.faults)


def _dead_lettered_once(mid: str, queue: str, copies: list[dict[str, object]]) -> list[str]:
    if len(copies) != 1:
        return [f"{mid} always fails: {len(copies)} DLQ copies, not 1"]
    got = {str(text(k)): text(v) for k, v in copies[0].items()}
    problems = []
    if got.get("workerkit-reason") != "exhausted":
        problems.append(f"{mid} DLQ reason {got.get('workerkit-reason')!r}")
    if got.get("workerkit-attempt") != MAX_ATTEMPTS:
        problems.append(f"{mid} DLQ attempt {got.get('workerkit-attempt')!r}")
    if not str(got.get("workerkit-error-type", "")).endswith("ChaosFailure"):
        problems.append(f"{mid} DLQ error type {got.get('workerkit-error-type')!r}")
    if got.get("workerkit-queue") != queue:
        problems.append(f"{mid} DLQ queue {got.get('workerkit-queue')!r}")
    return problems


def _idle(broker: PrivateBroker, queue: str) -> bool:
    """Nothing ready or unacked in the queue, its delay levels or the delay layout."""
    listing = broker.ctl(
        "list_queues", "-q", "--no-table-headers", "name", "messages", "messages_unacknowledged"
    )
    rows = [line.split() for line in listing.stdout.splitlines() if line.strip()]
    return all(
        row[-1] == "0" and row[-2] == "0"
        for row in rows
        if (row[0] == queue or ".delay." in row[0]) and not row[0].endswith(".dlq")
    )
