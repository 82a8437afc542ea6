"""Profile workerkit's per-message consume path with pyinstrument.

``python -m benchmarks.profile_consume [CASE] [COUNT]`` (default ``wk_async 20000``) pre-loads a
queue like the consume benchmark, then drains it under the profiler and prints where the
time went (pre-loading is not profiled).
"""

from __future__ import annotations

import asyncio
import sys

from pyinstrument import Profiler

from .common import delete_queues
from .consume import Clock, prepare


def main() -> None:
    case = sys.argv[1] if len(sys.argv) > 1 else "wk_async"
    count = int(sys.argv[2]) if len(sys.argv) > 2 else 20000
    clock = Clock(count)
    _queue, cleanup, consumer = prepare(case, count, clock)
    profiler = Profiler(interval=0.0005, async_mode="disabled")
    try:
        with profiler:
            outcome = consumer()
            if asyncio.iscoroutine(outcome):
                asyncio.run(outcome)
    finally:
        delete_queues(*cleanup)
    print(f"{case}: {count / (clock.last - clock.first):,.0f} msg/s under the profiler")
    print(profiler.output_text(unicode=False, color=False, show_all=True, short_mode=False))


if __name__ == "__main__":
    main()
