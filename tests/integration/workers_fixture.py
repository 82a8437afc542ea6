"""Worker processes for subprocess tests, and small raw-pika broker helpers for the tests.

Run as a script, it starts one worker in its own process so that a test can send it SIGTERM or
let its handler kill the process::

    python tests/integration/workers_fixture.py MODE QUEUE URL EXCHANGE LOGFILE [options]

MODE is ``slow`` (async handler sleeps), ``slow-sync`` (plain ``def`` handler sleeps) or
``crash`` (the handler calls ``os._exit(1)``, like a segfault or an OOM kill). The handler
appends ``start <body>`` and ``done <body>`` lines to LOGFILE so that the test can see what ran.

The helpers talk to the broker with raw pika (blocking), never through workerkit, so that a
test checks workerkit against the broker's own view. Call them with ``asyncio.to_thread`` from
async tests so that the runner on the test's event loop keeps running meanwhile.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pika
from pika.spec import BasicProperties

FIXTURE = Path(__file__).resolve()
REPO = FIXTURE.parents[2]

# -- broker helpers (raw pika, blocking) -------------------------------------------------------


@dataclass
class Got:
    """A message read back with basic.get (already acked)."""

    body: bytes
    headers: dict[str, Any]
    properties: BasicProperties
    redelivered: bool


def _connect(url: str) -> pika.BlockingConnection:
    return pika.BlockingConnection(pika.URLParameters(url))


def publish_raw(
    url: str,
    exchange: str,
    routing_key: str,
    body: bytes,
    *,
    headers: Mapping[str, Any] | None = None,
    content_type: str | None = "application/json",
    message_id: str | None = None,
) -> None:
    """A confirmed, mandatory, persistent publish (raises if no queue receives it)."""
    conn = _connect(url)
    try:
        channel = conn.channel()
        channel.confirm_delivery()
        channel.basic_publish(
            exchange,
            routing_key,
            body,
            BasicProperties(
                content_type=content_type,
                headers=dict(headers) if headers else None,
                delivery_mode=2,
                message_id=message_id,
            ),
            mandatory=True,
        )
    finally:
        conn.close()


def publish_many_raw(url: str, exchange: str, routing_key: str, bodies: list[bytes]) -> None:
    conn = _connect(url)
    try:
        channel = conn.channel()
        channel.confirm_delivery()
        props = BasicProperties(content_type="application/json", delivery_mode=2)
        for body in bodies:
            channel.basic_publish(exchange, routing_key, body, props, mandatory=True)
    finally:
        conn.close()


def ready_count(url: str, queue: str) -> int:
    """Messages ready in ``queue`` (a passive declare: unacked messages are not counted)."""
    conn = _connect(url)
    try:
        frame = conn.channel().queue_declare(queue, passive=True)
        return int(frame.method.message_count)
    finally:
        conn.close()


def consumer_count(url: str, queue: str) -> int:
    """Consumers on ``queue``, or -1 while it is not declared yet."""
    try:
        conn = _connect(url)
    except Exception:
        return -1
    try:
        frame = conn.channel().queue_declare(queue, passive=True)
        return int(frame.method.consumer_count)
    except Exception:  # not declared yet (the channel is closed by the 404)
        return -1
    finally:
        if conn.is_open:
            conn.close()


def queue_stats(queue: str) -> tuple[int, int]:
    """(ready, unacknowledged) as the broker reports them (rabbitmqctl)."""
    from broker import session_ctl  # the broker under test (tests/reliability/broker.py)

    out = session_ctl(
        "-q", "list_queues", "name", "messages_ready", "messages_unacknowledged"
    ).stdout
    for line in out.splitlines():
        fields = line.split("\t")
        if fields[0] == queue:
            return int(fields[1]), int(fields[2])
    raise AssertionError(f"queue {queue!r} not found in rabbitmqctl list_queues")


def get_all(url: str, queue: str) -> list[Got]:
    """Read and ack every ready message of ``queue``."""
    conn = _connect(url)
    try:
        channel = conn.channel()
        got: list[Got] = []
        while True:
            method, props, body = channel.basic_get(queue, auto_ack=True)
            if method is None:
                return got
            got.append(Got(body, dict(props.headers or {}), props, bool(method.redelivered)))
    finally:
        conn.close()


def declare_raw(url: str, queue: str, arguments: Mapping[str, Any] | None = None) -> None:
    conn = _connect(url)
    try:
        conn.channel().queue_declare(queue, durable=True, arguments=dict(arguments or {}))
    finally:
        conn.close()


def delete_queues(url: str, *queues: str) -> None:
    conn = _connect(url)
    try:
        for queue in queues:
            channel = conn.channel()
            channel.queue_delete(queue)
            channel.close()
    finally:
        conn.close()


# -- worker subprocesses -----------------------------------------------------------------------


def start_worker(
    mode: str, queue: str, url: str, exchange: str, logfile: Path, *options: str
) -> subprocess.Popen[bytes]:
    """Start this module as a worker process (stderr captured for failure messages)."""
    proc = subprocess.Popen(
        [sys.executable, str(FIXTURE), mode, queue, url, exchange, str(logfile), *options],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    STARTED.append(proc)
    return proc


# Worker processes started by tests; a failing test must not leave one consuming forever.
STARTED: list[subprocess.Popen[Any]] = []  # bytes or text pipes


def kill_leftovers() -> None:
    while STARTED:
        proc = STARTED.pop()
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        for pipe in (proc.stdin, proc.stdout, proc.stderr):
            if pipe is not None:  # else the GC reports it, unclosed, in some later test
                pipe.close()


def log_lines(logfile: Path, kind: str) -> list[str]:
    """Bodies logged with ``kind`` ("start" or "done") by a worker process."""
    if not logfile.exists():
        return []
    prefix = kind + " "
    return [ln[len(prefix) :] for ln in logfile.read_text().splitlines() if ln.startswith(prefix)]


def _note(logfile: str, line: str) -> None:
    # One unbuffered append per line: the test reads this file while we run or after we die.
    fd = os.open(logfile, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (line + "\n").encode())
    finally:
        os.close(fd)


def _worker_class(args: argparse.Namespace) -> type[Any]:
    from workerkit import Worker

    queue_name, logfile, sleep = args.queue, args.logfile, args.sleep
    limit = args.delivery_limit

    if args.mode == "slow":

        class Slow(Worker):
            queue = queue_name
            queue_type = args.queue_type
            delivery_limit = limit
            prefetch = args.prefetch
            concurrency = args.concurrency

            async def handle(self, body: str) -> None:
                _note(logfile, f"start {body}")
                await asyncio.sleep(sleep)
                _note(logfile, f"done {body}")

        return Slow
    if args.mode == "slow-sync":

        class SlowSync(Worker):
            queue = queue_name
            queue_type = args.queue_type
            delivery_limit = limit
            prefetch = args.prefetch
            concurrency = args.concurrency

            def handle(self, body: str) -> None:
                _note(logfile, f"start {body}")
                time.sleep(sleep)
                _note(logfile, f"done {body}")

        return SlowSync

    class Crash(Worker):
        queue = queue_name
        queue_type = args.queue_type
        delivery_limit = limit
        prefetch = args.prefetch
        concurrency = args.concurrency

        async def handle(self, body: str) -> None:
            _note(logfile, f"start {body}")
            os._exit(1)  # what a segfault or the OOM killer does: no ack, no cleanup

    return Crash


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["slow", "slow-sync", "crash"])
    parser.add_argument("queue")
    parser.add_argument("url")
    parser.add_argument("exchange")
    parser.add_argument("logfile")
    parser.add_argument("--sleep", type=float, default=1.0)
    parser.add_argument("--grace", type=float, default=10.0)
    parser.add_argument("--queue-type", default="quorum")
    parser.add_argument("--delivery-limit", type=int, default=None)
    parser.add_argument("--prefetch", type=int, default=10)
    parser.add_argument("--concurrency", type=int, default=2)
    args = parser.parse_args()

    from workerkit import Settings, run
    from workerkit.log import configure_logging

    configure_logging("INFO")
    settings = Settings(
        url=args.url,
        exchange=args.exchange,
        shutdown_grace=args.grace,
        connect_timeout=5.0,
        publish_timeout=5.0,
    )
    run([_worker_class(args)], settings=settings)
    sys.exit(0)


if __name__ == "__main__":
    main()
