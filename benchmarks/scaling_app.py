"""The worker that benchmarks/scaling.py runs: ``BENCH_SCALING_QUEUE``, a plain ``def`` handler
doing ``BENCH_SCALING_CPU_MS`` milliseconds of pure-Python work per message (0: none)."""

from __future__ import annotations

import os
import time

from workerkit import Worker

CPU_S = float(os.environ.get("BENCH_SCALING_CPU_MS", "0")) / 1000


class Drain(Worker):
    queue = os.environ.get("BENCH_SCALING_QUEUE", "bench.scaling.unset")

    def handle(self, body: dict[str, int]) -> None:
        if CPU_S:
            end = time.perf_counter() + CPU_S
            while time.perf_counter() < end:
                pass
