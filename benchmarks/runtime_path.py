"""CPU per delivery in workerkit's own per-message path, without a broker.

``python -m benchmarks.runtime_path [CASE] [COUNT]`` (CASE: wk_async, wk_sync, wk_model, or the
metrics pairs of consume.py: wk_async_metrics, wk_async_stamped, wk_async_metrics_stamped, and
wk_async_hooks, a middleware whose two per-message hooks do nothing; default the first three)
builds a :class:`WorkerRuntime` for consume.py's worker, gives it a channel that only counts
acks, and hands it COUNT ready-made Messages 50 per loop turn (as a read of the socket would):
slots, decoding, the handler, the decision, the ack tracker and the ack frames' channel call,
with the transport's receive path left out (``benchmarks.frames`` measures that). Reports CPU
microseconds per delivery; the ratios between cases are what issue 16's targets compare, and
the metrics cases show what the middleware costs without the broker's noise.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from typing import Any

from workerkit.message import Message
from workerkit.middleware import Middleware, call_hooks
from workerkit.runtime import WorkerRuntime

from .common import payload, settings
from .consume import WITH_METRICS, workerkit_worker

PER_TURN = 50


class CountingChannel:
    """Stands in for the consume channel: acks are counted, nothing is sent."""

    def __init__(self) -> None:
        self.acked = 0
        self.is_open = True

    def ack(self, delivery_tag: int, multiple: bool = False) -> None:
        self.acked = delivery_tag if multiple else self.acked + 1

    def nack(self, delivery_tag: int, requeue: bool = True) -> None:
        raise AssertionError("no message should be given back")

    def has_consumer(self, tag: str) -> bool:
        return True


class NoHost:
    topology: Any = None

    def consumer_lost(self, error: Exception) -> None:
        raise AssertionError(error)

    def slot_died(self) -> None:
        raise AssertionError("a slot died")


class EmptyHooks(Middleware):
    """The hook machinery's own cost: both per-message hooks overridden, doing nothing."""

    def before_handle(self, message: Message) -> None:
        pass

    def after_handle(self, message: Message, outcome: str, duration: float) -> None:
        pass


def _middleware(case: str) -> tuple[Middleware, ...]:
    if case in WITH_METRICS:
        from workerkit.metrics import Metrics

        return (Metrics(),)
    return (EmptyHooks(),) if case == "wk_async_hooks" else ()


def _headers(case: str, i: int) -> dict[str, Any]:
    """What consume.py's publisher puts on the ``_stamped`` cases: the publish time."""
    if not case.endswith("_stamped"):
        return {}
    from workerkit.metrics import PUBLISHED_AT_HEADER

    return {PUBLISHED_AT_HEADER: int(time.time() * 1000)}


async def measure(case: str, count: int) -> dict[str, Any]:
    from workerkit.acks import AckTracker

    kind = "wk_async" if case == "wk_async_hooks" else case
    worker = workerkit_worker(kind, f"bench.runtime.{case}", lambda: None)
    runtime = WorkerRuntime(worker, NoHost(), settings(), middleware=_middleware(case))  # type: ignore[arg-type]
    loop = asyncio.get_running_loop()
    channel = CountingChannel()
    runtime.channel = channel  # type: ignore[assignment]
    runtime.tracker = AckTracker(channel, loop, True, hold=runtime.prefetch // 2)  # type: ignore[arg-type]
    runtime.consumer_tag = "bench"
    runtime.consuming = True
    props = ("application/json", None)
    messages = [
        Message(
            payload(i), i + 1, runtime.queue, runtime.exchange, False, _headers(case, i), *props
        )
        for i in range(count)
    ]
    # What the runner does before it consumes: the metrics read the runtime's own numbers.
    call_hooks(runtime.middleware, "on_worker_start", runtime.instance)
    call_hooks(runtime.middleware, "on_worker_stats", runtime.instance, runtime)
    runtime.start_slots()
    await asyncio.sleep(0)
    cpu, wall = time.process_time(), time.perf_counter()
    window = runtime.prefetch
    sent = 0
    while channel.acked < count:
        # Like the broker: never more than the prefetch window unacked.
        limit = min(count, channel.acked + window, sent + PER_TURN)
        while sent < limit:
            runtime.on_message(messages[sent])
            sent += 1
        await asyncio.sleep(0)
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    runtime.stopping = True
    for slot in runtime.slots:
        slot.task.cancel()
    if runtime.watchdog is not None:
        runtime.watchdog.cancel()
    if runtime.pool is not None:
        runtime.pool.shutdown(wait=True)
    return {
        "case": case,
        "count": count,
        "cpu_us_per_message": round(cpu / count * 1e6, 3),
        "wall_us_per_message": round(wall / count * 1e6, 3),
    }


def main() -> None:
    cases = sys.argv[1].split(",") if len(sys.argv) > 1 else ["wk_async", "wk_sync", "wk_model"]
    count = int(sys.argv[2]) if len(sys.argv) > 2 else 20000
    for case in cases:
        print("RESULT", json.dumps(asyncio.run(measure(case, count))))


if __name__ == "__main__":
    main()
