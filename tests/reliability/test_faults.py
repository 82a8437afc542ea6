"""Fault scenarios: workers killed, brokers stopped, connections closed, stalled and reset.

Each scenario publishes a paced stream with confirms while a fault hits, then lets the oracle
judge: no confirmed message lost, nothing unexpected, duplicates within the in-flight bound.
Recovery time is the time from the fault until a consumer was back.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import pytest
from broker import PrivateBroker
from harness import Load, WorkerProcess, collect, settle
from oracle import Oracle
from proxy import Proxy

import workerkit

pytestmark = pytest.mark.reliability

PREFETCH = 20
WORK = {"sleep": 0.005}  # a little work per message keeps deliveries in flight


def job(n: int) -> dict[str, object]:
    return {"n": n, **WORK}


def finish(oracle: Oracle, load: Load, url: str, queue: str, out_dir: Path) -> None:
    load.join()
    assert not load.foreign_errors(), f"non-PublishError escaped publish: {load.foreign_errors()}"
    settle(oracle, url, queue, out_dir)
    oracle.read_dlq(url, queue)
    collect(oracle, out_dir)


def test_kill9_worker_mid_stream(
    private_broker: PrivateBroker,
    workers: Callable[..., WorkerProcess],
    oracle: Oracle,
    out_dir: Path,
    unique: Callable[[str], str],
) -> None:
    queue, url = unique("kill9"), private_broker.url
    worker = workers(queue, url, prefetch=PREFETCH, concurrency=10)
    worker.wait_healthy()
    load = Load(oracle, url, queue, 1500, rate=300, body=job).start()
    for _ in range(3):
        time.sleep(1.0)  # let the stream run into the worker before the next fault
        worker.kill9()
        oracle.fault()
        killed_at = time.time()
        worker = workers(queue, url, prefetch=PREFETCH, concurrency=10)
        oracle.recovered(worker.recovered_after(killed_at))
    finish(oracle, load, url, queue, out_dir)
    assert len(oracle.confirmed) == 1500
    oracle.check(max_duplicates=PREFETCH * oracle.faults)


def test_broker_stop_app_start_app(
    private_broker: PrivateBroker,
    workers: Callable[..., WorkerProcess],
    oracle: Oracle,
    out_dir: Path,
    unique: Callable[[str], str],
) -> None:
    queue, url = unique("stopapp"), private_broker.url
    worker = workers(queue, url, prefetch=PREFETCH, concurrency=10)
    worker.wait_healthy()
    load = Load(oracle, url, queue, 1200, rate=200, body=job, publish_timeout=10).start()
    time.sleep(1.5)
    stopped_at = time.time()
    private_broker.stop_app()
    oracle.fault()
    time.sleep(2.0)  # the outage itself
    private_broker.start_app()
    oracle.recovered(worker.recovered_after(stopped_at))
    finish(oracle, load, url, queue, out_dir)
    assert worker.stats()["reconnects"] >= 1
    oracle.check(max_duplicates=PREFETCH * oracle.faults)


def test_close_all_connections_repeatedly(
    private_broker: PrivateBroker,
    workers: Callable[..., WorkerProcess],
    oracle: Oracle,
    out_dir: Path,
    unique: Callable[[str], str],
) -> None:
    queue, url = unique("closeall"), private_broker.url
    worker = workers(queue, url, prefetch=PREFETCH, concurrency=10)
    worker.wait_healthy()
    load = Load(oracle, url, queue, 1500, rate=250, body=job).start()
    for _ in range(4):
        time.sleep(1.0)
        closed_at = time.time()
        private_broker.close_all_connections()
        oracle.fault()
        oracle.recovered(worker.recovered_after(closed_at))
    finish(oracle, load, url, queue, out_dir)
    assert worker.stats()["reconnects"] >= 4
    oracle.check(max_duplicates=PREFETCH * oracle.faults)


def test_full_broker_restart_keeps_persistent_messages(
    fresh_broker: PrivateBroker,
    workers: Callable[..., WorkerProcess],
    oracle: Oracle,
    out_dir: Path,
    unique: Callable[[str], str],
) -> None:
    queue, url = unique("restart"), fresh_broker.url
    worker = workers(queue, url, prefetch=PREFETCH, concurrency=10)
    worker.wait_healthy()
    assert worker.terminate() == 0
    # A backlog nobody consumes yet: it must survive the node going down.
    backlog = Load(oracle, url, queue, 300, rate=5000, body=job, prefix="b").start()
    backlog.join()
    assert len(oracle.confirmed) == 300
    worker = workers(queue, url, prefetch=PREFETCH, concurrency=10)
    worker.wait_healthy()
    load = Load(oracle, url, queue, 900, rate=150, body=job, publish_timeout=10).start()
    time.sleep(1.0)
    restarted_at = time.time()
    fresh_broker.restart()
    oracle.fault()
    oracle.recovered(worker.recovered_after(restarted_at, timeout=90))
    finish(oracle, load, url, queue, out_dir)
    oracle.check(max_duplicates=PREFETCH * oracle.faults)


def test_proxy_reset(
    private_broker: PrivateBroker,
    proxy: Proxy,
    workers: Callable[..., WorkerProcess],
    oracle: Oracle,
    out_dir: Path,
    unique: Callable[[str], str],
) -> None:
    queue, url = unique("reset"), private_broker.url
    worker = workers(queue, proxy.url(), prefetch=PREFETCH, concurrency=10, heartbeat=2)
    worker.wait_healthy()
    load = Load(oracle, url, queue, 1200, rate=250, body=job).start()
    for _ in range(3):
        time.sleep(1.0)
        cut_at = time.time()
        proxy.cut()
        oracle.fault()
        oracle.recovered(worker.recovered_after(cut_at))
    finish(oracle, load, url, queue, out_dir)
    oracle.check(max_duplicates=PREFETCH * oracle.faults)


def test_proxy_stall_detected_by_heartbeat(
    private_broker: PrivateBroker,
    proxy: Proxy,
    workers: Callable[..., WorkerProcess],
    oracle: Oracle,
    out_dir: Path,
    unique: Callable[[str], str],
) -> None:
    queue, url = unique("stall"), private_broker.url
    worker = workers(queue, proxy.url(), prefetch=PREFETCH, concurrency=10, heartbeat=2)
    worker.wait_healthy()
    load = Load(oracle, url, queue, 1500, rate=100, body=job).start()
    time.sleep(1.0)
    stalled_at = time.time()
    proxy.stall()  # the old connections are a black hole; new ones flow
    oracle.fault()
    # Only a missed heartbeat can reveal the stall: pika checks every heartbeat + 5 s.
    oracle.recovered(worker.recovered_after(stalled_at, timeout=40))
    finish(oracle, load, url, queue, out_dir)
    proxy.resume()
    assert worker.stats()["reconnects"] >= 1
    oracle.check(max_duplicates=PREFETCH * oracle.faults)


def test_memory_alarm_publishers_time_out_consumers_keep_going(
    private_broker: PrivateBroker,
    workers: Callable[..., WorkerProcess],
    oracle: Oracle,
    out_dir: Path,
    unique: Callable[[str], str],
) -> None:
    queue, url = unique("alarm"), private_broker.url
    worker = workers(queue, url, prefetch=PREFETCH, concurrency=1)
    worker.wait_healthy()
    # A backlog of about 20 s of work, so that the consumer is still at it under the alarm
    # (raising it takes two rabbitmqctl runs: over 12 s on a loaded machine, seen with 4.0).
    backlog = 500
    slow_job = lambda n: {"n": n, "sleep": 0.04}  # noqa: E731
    Load(oracle, url, queue, backlog, rate=5000, body=slow_job).start().join()
    bound = 2.0
    blocked = Load(oracle, url, queue, 3, rate=1000, publish_timeout=bound, threads=1, prefix="a")
    private_broker.set_memory_alarm()
    oracle.fault()
    try:
        collect(oracle, out_dir)
        before = len(oracle.finished)
        blocked.start().join()
        collect(oracle, out_dir)
        during = len(oracle.finished) - before
    finally:
        private_broker.clear_memory_alarm()
    assert before < backlog, "the backlog was done before the alarm: the test proves nothing"
    # Every publish under the alarm raised the typed timeout within its bound; none succeeded.
    assert len(blocked.errors) == 3
    assert all(isinstance(e, workerkit.PublishTimeout) for e in blocked.errors), blocked.errors
    assert not {"a0", "a1", "a2"} & oracle.confirmed
    assert max(blocked.failed_after) <= bound + 1.0, f"publish raised after {blocked.failed_after}"
    assert during > 0, "the consumer stopped while publishers were blocked"
    assert worker.stats()["reconnects"] == 0
    after = Load(oracle, url, queue, 50, rate=1000, body=job, prefix="c").start()
    finish(oracle, after, url, queue, out_dir)
    oracle.check(max_duplicates=0)
