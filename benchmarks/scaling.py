"""Scaling figures: total throughput of 1, 2, 4... worker processes on one queue, and of a
publisher and a worker on the same or on different nodes of a 3-node cluster.

    python -m benchmarks.scaling processes --count 20000 --processes 1,2,4 [--cpu-ms 0.5]
    python -m benchmarks.scaling cluster --count 20000          # boots private nodes (root)

``processes`` pre-loads COUNT messages into a fresh quorum queue on the benchmark broker
(WORKERKIT_BENCH_URL, else the local one), then runs ``workerkit run --processes N --burst`` on it
and times the drain from the first message taken to an empty queue: msg/s for each N. ``--cpu-ms``
gives each message that much pure-Python work in a plain ``def`` handler, the case where more
processes buy real parallelism (no-op handlers are bounded by the broker and the GIL of each
process instead).

``cluster`` boots three private RabbitMQ nodes joined into a cluster (tests/cluster/cluster.py),
declares the queue through node 1 (its quorum leader lands there), and times a Publisher pushing
COUNT messages while one worker process drains them, for each placement: publisher and worker
both on node 1, and publisher on node 2 with the worker on node 3. On one machine the nodes
share its cores, so compare the placements with each other, never with a real cluster.

Each line printed is ``RESULT {json}``. Do not read figures from a loaded machine.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pika

from .common import URL, queue_name

ROOT = Path(__file__).resolve().parent.parent
APP = "benchmarks.scaling_app:Drain"


def depth(url: str, queue: str) -> int:
    conn = pika.BlockingConnection(pika.URLParameters(url))
    try:
        return int(conn.channel().queue_declare(queue, passive=True).method.message_count)
    finally:
        conn.close()


def consumers(url: str, queue: str) -> int:
    conn = pika.BlockingConnection(pika.URLParameters(url))
    try:
        return int(conn.channel().queue_declare(queue, passive=True).method.consumer_count)
    finally:
        conn.close()


def preload(url: str, queue: str, count: int) -> None:
    conn = pika.BlockingConnection(pika.URLParameters(url))
    try:
        channel = conn.channel()
        channel.confirm_delivery()
        props = pika.BasicProperties(content_type="application/json", delivery_mode=2)
        for n in range(count):
            channel.basic_publish("", queue, json.dumps({"n": n}).encode(), props)
    finally:
        conn.close()


def delete(url: str, *queues: str) -> None:
    conn = pika.BlockingConnection(pika.URLParameters(url))
    try:
        channel = conn.channel()
        for queue in queues:
            channel.queue_delete(queue)
    finally:
        conn.close()


def group_env(url: str, queue: str, cpu_ms: float) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("WORKERKIT_")}
    env |= {"WORKERKIT_URL": url, "WORKERKIT_EXCHANGE": "wkbench"}
    env |= {"BENCH_SCALING_QUEUE": queue, "BENCH_SCALING_CPU_MS": str(cpu_ms)}
    return env


def declare(url: str, queue: str, cpu_ms: float) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "workerkit", "topology", APP],
        cwd=ROOT,
        env=group_env(url, queue, cpu_ms),
        capture_output=True,
        text=True,
        timeout=60,
    )
    if done.returncode != 0:
        raise RuntimeError(f"workerkit topology failed: {done.stderr.strip()}")


def drain(url: str, queue: str, count: int, processes: int, cpu_ms: float) -> dict[str, Any]:
    """Time ``workerkit run --processes N --burst`` emptying a queue of ``count`` messages."""
    # The group's log goes to a file: a pipe nobody reads while it runs can fill and stall it.
    argv = [sys.executable, "-m", "workerkit", "run", APP, "--burst", "--processes", str(processes)]
    with tempfile.TemporaryFile("w+") as log:
        env = group_env(url, queue, cpu_ms)
        group = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=log)
        try:
            started, ended, code = _watch_drain(url, queue, count, group)
        finally:
            if group.poll() is None:  # the watch itself failed: no group outlives it
                group.kill()
                group.wait(10)
        if ended is None or started is None or code != 0:
            log.seek(0)
            raise RuntimeError(f"the group did not drain the queue (exit {code}): {log.read()}")
    # The first poll that saw messages taken is up to one poll late: count one poll in.
    seconds = max(ended - started + 0.02, 1e-3)
    return {
        "processes": processes,
        "count": count,
        "seconds": round(seconds, 3),
        "msg_per_s": round(count / seconds, 1),
        "cpu_ms": cpu_ms,
    }


def _watch_drain(
    url: str, queue: str, count: int, group: subprocess.Popen[bytes]
) -> tuple[float | None, float | None, int]:
    """When the group took its first message and when the queue was empty (None: never), and
    the group's exit code."""
    started = ended = None
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        left = depth(url, queue)
        now = time.monotonic()
        if started is None and left < count:
            started = now
        if left == 0:
            ended = now
            break
        if group.poll() is not None:
            break
        time.sleep(0.02)
    return started, ended, group.wait(120)


def processes_case(
    count: int, counts: Sequence[int], cpu_ms: float, url: str = URL
) -> list[dict[str, Any]]:
    results = []
    for processes in counts:
        queue = queue_name(f"scaling-{processes}")
        declare(url, queue, cpu_ms)
        try:
            preload(url, queue, count)
            result = drain(url, queue, count, processes, cpu_ms)
        finally:
            delete(url, queue, f"{queue}.dlq")
        print("RESULT " + json.dumps({"case": "processes", **result}), flush=True)
        results.append(result)
    return results


def placement(
    publish_url: str, worker_url: str, declare_url: str, count: int, label: str
) -> dict[str, Any]:
    """A Publisher through one node while one worker process on another drains the queue."""
    from workerkit import Publisher, Settings

    queue = queue_name("placement")
    declare(declare_url, queue, 0.0)
    group = subprocess.Popen(
        [sys.executable, "-m", "workerkit", "run", APP],
        cwd=ROOT,
        env=group_env(worker_url, queue, 0.0),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        # Time the flow, not the worker's start-up: wait until its consumer is on the queue.
        deadline = time.monotonic() + 60
        while consumers(declare_url, queue) == 0:
            if time.monotonic() > deadline or group.poll() is not None:
                raise RuntimeError("the worker did not start consuming")
            time.sleep(0.05)
        publisher = Publisher(settings=Settings(url=publish_url, exchange="wkbench"))
        began = time.monotonic()
        threads = [
            threading.Thread(target=_publish_share, args=(publisher, queue, count // 4))
            for _ in range(4)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        published = time.monotonic() - began
        # Until no message is ready; at most the worker's prefetch (20) are still in its hands.
        while depth(declare_url, queue) > 0:
            time.sleep(0.02)
        seconds = time.monotonic() - began
        publisher.close()
    finally:
        group.terminate()
        group.wait(60)
        delete(declare_url, queue, f"{queue}.dlq")
    total = (count // 4) * 4
    return {
        "placement": label,
        "count": total,
        "publish_s": round(published, 3),
        "seconds": round(seconds, 3),
        "msg_per_s": round(total / seconds, 1),
    }


def _publish_share(publisher: Any, queue: str, count: int) -> None:
    for n in range(count):
        publisher.publish(queue, {"n": n})


def cluster_case(count: int) -> list[dict[str, Any]]:
    sys.path.insert(0, str(ROOT / "tests" / "cluster"))
    from cluster import Cluster

    cluster = Cluster(3)
    cluster.start()
    try:
        a, b, c = cluster.urls
        results = [
            placement(a, a, a, count, "publisher and worker on the leader's node"),
            placement(b, c, a, count, "publisher, worker and leader on three nodes"),
        ]
    finally:
        cluster.stop()
    for result in results:
        print("RESULT " + json.dumps({"case": "cluster", **result}), flush=True)
    return results


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="case", required=True)
    procs = sub.add_parser("processes", help="1, 2, 4... processes on one queue")
    procs.add_argument("--count", type=int, default=20000)
    procs.add_argument("--processes", default="1,2,4", help="comma-separated process counts")
    procs.add_argument("--cpu-ms", type=float, default=0.0, help="CPU work per message (def)")
    clus = sub.add_parser("cluster", help="publisher/worker placement on a private 3-node cluster")
    clus.add_argument("--count", type=int, default=20000)
    args = parser.parse_args(argv)
    if args.case == "processes":
        counts = [int(p) for p in args.processes.split(",")]
        return processes_case(args.count, counts, args.cpu_ms)
    return cluster_case(args.count)


if __name__ == "__main__":
    main()
