"""Growth curves: how workerkit's cost grows as the work grows (issue 16, target 3).

``python -m benchmarks.curves CASE ARG...`` runs one point of one curve in this process and
prints one ``RESULT {json}`` line, like the other benchmark modules:

- ``queues N TOTAL``: N workers in one Runner, TOTAL messages spread over their N queues;
  throughput once every worker consumes, and the time from ``Runner.run()`` to consuming.
- ``body SIZE COUNT KIND``: drain COUNT messages of about SIZE bytes; KIND ``wk`` (workerkit,
  ``body: bytes`` handler) or ``pika`` (raw pika asyncio adapter, multiple acks); MB/s. Both
  use the same prefetch, lowered for large bodies (:func:`body_prefetch`).
- ``backlog COUNT``: one default worker drains a COUNT-message backlog; RSS sampled over time.
- ``publish_many COUNT``: one ``Publisher.publish_many`` of COUNT items fed from a generator;
  peak RSS over the process's RSS before it, and the rate.
- ``retry COUNT DELAY``: COUNT messages each fail once, all with the same retry delay; the time
  from the first failure to the last retried arrival, against DELAY + 1 s.

Only workerkit's public API is used (Worker, Runner, Publisher, RetryPolicy). Rates are taken
between the moments the 25% and the 75% mark of the messages were handled, so neither start-up
(deliveries buffered before the clock could see them) nor the draining tail counts.
"""

from __future__ import annotations

import asyncio
import json
import logging
import resource
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from .common import (
    EXCHANGE,
    PREFETCH,
    blocking_channel,
    declare_raw_queue,
    declare_worker_queues,
    delete_queues,
    preload,
    preload_many,
    queue_name,
    report,
    settings,
)

DONE_TIMEOUT = 600.0  # a point that has not finished by then failed: something is stuck
SAMPLE_EVERY = 0.2  # seconds between RSS samples


def rss_mb() -> float:
    import psutil

    return float(psutil.Process().memory_info().rss) / 2**20


def reset_peak_rss() -> bool:
    """Restart the kernel's peak-RSS count (VmHWM) from now; False where Linux cannot."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_mb() -> float:
    """Peak RSS since :func:`reset_peak_rss` (else since the process started), in MB."""
    try:
        with open("/proc/self/status") as f:
            line = next(line for line in f if line.startswith("VmHWM:"))
        return int(line.split()[1]) / 1024
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class Sampler:
    """A thread that records ``(seconds, progress(), RSS MB)`` every SAMPLE_EVERY seconds."""

    def __init__(self, progress: Callable[[], int]) -> None:
        self.progress = progress
        self.samples: list[tuple[float, int, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)
        self._start = time.perf_counter()

    def __enter__(self) -> Sampler:
        self._start = time.perf_counter()
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()

    def _sample(self) -> None:
        self.samples.append((time.perf_counter() - self._start, self.progress(), rss_mb()))

    def _run(self) -> None:
        while not self._stop.wait(SAMPLE_EVERY):
            self._sample()


def thin(samples: list[Any], keep: int = 40) -> list[Any]:
    """At most ``keep`` evenly spaced samples, always with the first and the last."""
    if len(samples) <= keep:
        return samples
    step = (len(samples) - 1) / (keep - 1)
    return [samples[round(i * step)] for i in range(keep)]


def settled(queues: list[str], seconds: float = 10.0) -> dict[str, int]:
    """Queues still holding ready messages after up to ``seconds`` (quorum acks lag a little)."""
    conn, channel = blocking_channel()
    deadline = time.monotonic() + seconds
    try:
        while True:
            left = {
                q: int(channel.queue_declare(q, passive=True).method.message_count) for q in queues
            }
            left = {q: n for q, n in left.items() if n}
            if not left or time.monotonic() > deadline:
                return left
            conn.sleep(0.1)
    finally:
        conn.close()


class Counter:
    """Handled messages and when the 25%, 75% and last expected ones were handled."""

    def __init__(self, expected: int) -> None:
        self.expected = expected
        self.seen = 0
        self.marks = {max(1, expected // 4): 0.0, max(1, expected * 3 // 4): 0.0, expected: 0.0}
        self.done = threading.Event()

    def hit(self) -> None:
        self.seen += 1
        if self.seen in self.marks:
            self.marks[self.seen] = time.perf_counter()
            if self.seen == self.expected:
                self.done.set()

    @property
    def last(self) -> float:
        return self.marks[self.expected]

    def steady_rate(self) -> float:
        """msg/s between the 25% and 75% marks: no start-up, no draining tail."""
        q1, q3 = max(1, self.expected // 4), max(1, self.expected * 3 // 4)
        return (q3 - q1) / max(self.marks[q3] - self.marks[q1], 1e-9)

    async def wait(self, what: str) -> None:
        deadline = time.monotonic() + DONE_TIMEOUT
        while not self.done.is_set():
            if time.monotonic() > deadline:
                raise RuntimeError(f"{what}: handled {self.seen} of {self.expected}")
            await asyncio.sleep(0.02)


def noop_worker(queue: str, on_body: Callable[[], None], **attrs: Any) -> type:
    from workerkit import Worker

    async def handle(self: Any, body: dict) -> None:  # type: ignore[type-arg]
        on_body()

    namespace = {"queue": queue, "handle": handle, "__module__": __name__, **attrs}
    return type(f"Noop_{queue.replace('.', '_').replace('-', '_')}", (Worker,), namespace)


async def run_until(
    workers: list[type], counter: Counter, what: str, at_ready: list[int] | None = None
) -> tuple[float, float]:
    """Run ``workers`` in one Runner until ``counter`` is done; (run() -> consuming s, ready at).

    ``at_ready`` receives how many were handled when every worker was consuming.
    """
    from workerkit import Runner

    runner = Runner(workers, settings=settings(), handle_signals=False)
    started = time.perf_counter()
    task = asyncio.create_task(runner.run())
    try:
        await runner.wait_ready(timeout=120)
        ready_at = time.perf_counter()
        if at_ready is not None:
            at_ready.append(counter.seen)
        await counter.wait(what)
    finally:
        runner.stop()
        await task
    return ready_at - started, ready_at


# -- queues per process ------------------------------------------------------------------------


def queues(n: int, total: int) -> dict[str, Any]:
    # Each worker prefetches PREFETCH before all are consuming: keep those under a quarter.
    per = max(total // n, 5 * PREFETCH)
    base = queue_name(f"q{n}")
    counter = Counter(per * n)
    workers = [noop_worker(f"{base}.w{i}", counter.hit) for i in range(n)]
    names = [w.queue for w in workers]  # type: ignore[attr-defined]
    declare_worker_queues(workers)
    try:
        preload_many(dict.fromkeys(names, per), exchange=EXCHANGE)
        # Deliveries may start before the last worker consumes: count from that moment only.
        at_ready: list[int] = []
        startup, _ready_at = asyncio.run(run_until(workers, counter, f"queues {n}", at_ready))
        left = settled(names)
    finally:
        delete_queues(*names, *(f"{q}.dlq" for q in names))
    if left:
        raise RuntimeError(f"queues {n}: {sum(left.values())} messages were not acked")
    if at_ready[0] >= counter.expected // 4:
        raise RuntimeError(f"queues {n}: {at_ready[0]} handled during start-up; raise TOTAL")
    rate = counter.steady_rate()
    return {
        "case": "queues",
        "workers": n,
        "count": counter.expected,
        "rate": rate,
        "startup": startup,
    }


# -- body size ---------------------------------------------------------------------------------


def body_prefetch(size: int) -> int:
    """Prefetch for SIZE-byte bodies, the same for both clients: at most ~4 MB in flight.

    With the default 100 a run of 1 MB messages would be in the client's buffers before the
    first handler runs, and the clock would see none of the transfer.
    """
    return max(1, min(PREFETCH, 4 * 2**20 // size))


async def pika_drain(queue: str, counter: Counter, prefetch: int) -> None:
    """Raw pika asyncio adapter: ack every ``prefetch // 2``-th delivery with multiple=True."""
    import pika
    from pika.adapters.asyncio_connection import AsyncioConnection

    from .common import URL

    loop = asyncio.get_running_loop()
    every = max(1, prefetch // 2)
    failed: asyncio.Future[None] = loop.create_future()

    def on_message(ch: Any, method: Any, _props: Any, _body: bytes) -> None:
        counter.hit()
        if counter.seen == counter.expected or method.delivery_tag % every == 0:
            ch.basic_ack(method.delivery_tag, multiple=True)

    def on_channel(ch: Any) -> None:
        ch.basic_qos(
            prefetch_count=prefetch, callback=lambda _f: ch.basic_consume(queue, on_message)
        )

    def on_error(_conn: Any, exc: BaseException) -> None:
        if not failed.done():
            failed.set_exception(exc)

    conn = AsyncioConnection(
        pika.URLParameters(URL),
        on_open_callback=lambda c: c.channel(on_open_callback=on_channel),
        on_open_error_callback=on_error,
        custom_ioloop=loop,
    )
    waiting = asyncio.ensure_future(counter.wait("body pika"))
    await asyncio.wait([waiting, failed], return_when=asyncio.FIRST_COMPLETED)
    if failed.done():
        waiting.cancel()
        failed.result()
    await waiting
    closed = loop.create_future()

    def on_closed(*_: object) -> None:
        if not closed.done():
            closed.set_result(None)

    conn.add_on_close_callback(on_closed)
    conn.close()
    await asyncio.wait_for(closed, 10)


def bytes_worker(queue: str, on_body: Callable[[], None], prefetch: int) -> type:
    from workerkit import Worker

    async def handle(self: Any, body: bytes) -> None:
        on_body()

    namespace = {"queue": queue, "handle": handle, "prefetch": prefetch, "__module__": __name__}
    return type("BodyBytes", (Worker,), namespace)


def body(size: int, count: int, kind: str) -> dict[str, Any]:
    prefetch = body_prefetch(size)
    counter = Counter(count)
    queue = queue_name(f"body{size}-{kind}")
    try:
        if kind == "wk":
            worker = bytes_worker(queue, counter.hit, prefetch)
            declare_worker_queues([worker])
            preload(queue, count, exchange=EXCHANGE, size=size)
            asyncio.run(run_until([worker], counter, f"body {size} wk"))
        elif kind == "pika":
            declare_raw_queue(queue)
            preload(queue, count, size=size)
            asyncio.run(pika_drain(queue, counter, prefetch))
        else:
            raise ValueError(f"body KIND is wk or pika, not {kind!r}")
        left = settled([queue])
    finally:
        delete_queues(queue, f"{queue}.dlq")
    if left:
        raise RuntimeError(f"body {size} {kind}: {left[queue]} messages were not acked")
    rate = counter.steady_rate()
    return {
        "case": "body",
        "kind": kind,
        "size": size,
        "count": count,
        "prefetch": prefetch,
        "rate": rate,
        "mb_s": rate * size / 1e6,
    }


# -- backlog -----------------------------------------------------------------------------------


def backlog(count: int) -> dict[str, Any]:
    counter = Counter(count)
    queue = queue_name("backlog")
    worker = noop_worker(queue, counter.hit)
    declare_worker_queues([worker])
    try:
        preload(queue, count, exchange=EXCHANGE)
        exact = reset_peak_rss()
        with Sampler(lambda: counter.seen) as sampler:
            startup, _ready_at = asyncio.run(run_until([worker], counter, "backlog"))
        left = settled([queue])
    finally:
        delete_queues(queue, f"{queue}.dlq")
    if left:
        raise RuntimeError(f"backlog: {left[queue]} messages were not acked")
    rss = [s[2] for s in sampler.samples]
    peak = max(max(rss), peak_rss_mb() if exact else 0.0)  # the kernel sees between samples
    return {
        "case": "backlog",
        "count": count,
        "rate": counter.steady_rate(),
        "startup": startup,
        "rss_first": rss[0],
        "rss_peak": peak,
        "rss_last": rss[-1],
        "samples": thin(sampler.samples),
    }


# -- publish_many ------------------------------------------------------------------------------


def publish_many(count: int) -> dict[str, Any]:
    from workerkit import Publisher

    from .common import payload

    queue = queue_name("pubmany")
    declare_raw_queue(queue, bind_exchange=EXCHANGE)
    produced = [0]

    def items() -> Iterator[tuple[str, dict[str, Any]]]:
        # A generator, so the caller's own list is not what the curve measures.
        for i in range(count):
            produced[0] = i + 1
            yield queue, json.loads(payload(i))

    try:
        publisher = Publisher(settings=settings())
        publisher.publish(queue, json.loads(payload(-1)))  # connects; not timed or counted
        before = rss_mb()
        exact = reset_peak_rss()
        start = time.perf_counter()
        with Sampler(lambda: produced[0]) as sampler:
            ids = publisher.publish_many(items())
        seconds = time.perf_counter() - start
        publisher.close()
        conn, channel = blocking_channel()
        depth = int(channel.queue_declare(queue, passive=True).method.message_count)
        conn.close()
    finally:
        delete_queues(queue)
    if len(ids) != count or depth != count + 1:
        raise RuntimeError(f"publish_many: {len(ids)} ids, queue holds {depth} of {count + 1}")
    sampled = max(s[2] for s in sampler.samples)
    peak = max(peak_rss_mb(), sampled) if exact else sampled
    return {
        "case": "publish_many",
        "count": count,
        "rate": count / seconds,
        "rss_before": before,
        "rss_peak": peak,
        "growth": peak - before,
        "samples": thin(sampler.samples),
    }


# -- retry storm -------------------------------------------------------------------------------


def retry(count: int, delay: float) -> dict[str, Any]:
    from workerkit import RetryPolicy

    failed: dict[int, float] = {}  # order id -> when its first delivery failed
    late = [0.0]  # the most any retry came back after its own failure + the delay
    times = {"first_failure": 0.0, "last_failure": 0.0, "first_retry": 0.0}
    counter = Counter(count)

    def seen(order_id: int) -> None:
        now = time.perf_counter()
        failure = failed.get(order_id)
        if failure is None:
            failed[order_id] = now
            times["first_failure"] = times["first_failure"] or now
            times["last_failure"] = now
            raise RuntimeError("benchmark: fail the first delivery")
        times["first_retry"] = times["first_retry"] or now
        late[0] = max(late[0], now - failure - delay)
        counter.hit()

    from workerkit import Worker

    queue = queue_name("retry")

    async def handle(self: Any, body: dict) -> None:  # type: ignore[type-arg]
        seen(body["order_id"])

    # Every message gets the same delay: no backoff growth, no jitter.
    policy = RetryPolicy(max_attempts=2, delay=delay, backoff=1.0, jitter=0.0)
    worker = type(
        "RetryStorm",
        (Worker,),
        {"queue": queue, "handle": handle, "retry": policy, "__module__": __name__},
    )
    declare_worker_queues([worker])
    try:
        preload(queue, count, exchange=EXCHANGE)
        asyncio.run(run_until([worker], counter, "retry"))
        left = settled([queue, f"{queue}.dlq"])
    finally:
        delete_queues(queue, f"{queue}.dlq")
    if left:
        raise RuntimeError(f"retry: messages left over {left}")
    spread = counter.last - times["first_failure"]
    return {
        "case": "retry",
        "count": count,
        "delay": delay,
        "spread": spread,
        "failing": times["last_failure"] - times["first_failure"],
        "arriving": counter.last - times["first_retry"],
        "failures_per_s": count / max(times["last_failure"] - times["first_failure"], 1e-9),
        # A retry lands behind what the queue still holds: while failures last longer than
        # the delay, the first ones wait behind the backlog of first deliveries.
        "max_late": late[0],
        "goal": delay + 1.0,
    }


def main() -> None:
    logging.basicConfig(level=logging.WARNING)
    case, args = sys.argv[1], sys.argv[2:]
    if case == "queues":
        result = queues(int(args[0]), int(args[1]))
    elif case == "body":
        result = body(int(args[0]), int(args[1]), args[2])
    elif case == "backlog":
        result = backlog(int(args[0]))
    elif case == "publish_many":
        result = publish_many(int(args[0]))
    elif case == "retry":
        result = retry(int(args[0]), float(args[1]))
    else:
        sys.exit(f"unknown curve {case!r}: queues, body, backlog, publish_many or retry")
    report(**result)


if __name__ == "__main__":
    main()
