"""Instructions per delivery, counted by callgrind: a figure other load on the machine cannot move.

``python -m benchmarks.instructions CASE [CASE ...] [--e2e] [--runs N]``

- default, the runtime path without a broker: ``benchmarks.runtime_path.measure(CASE, n)``;
- ``--e2e``, the consuming process of ``benchmarks.consume`` against the broker at
  ``WORKERKIT_BENCH_URL`` (default localhost): this process fills the case's queue first, then
  only the consumer runs under callgrind.

Per delivery is (instructions of a 12,000-delivery run - those of a 2,000 one) / 10,000, so start-up
and shutdown cancel out. ``--runs N`` repeats each case and prints every run and the median: end
to end, how frames batch per socket read moves a run by up to 1,500 instructions. A run takes
15-30 s (valgrind runs Python about 50 times slower). benchmarks/METRICS.md uses it for what the
metrics cost. Needs ``valgrind`` (Debian: ``apt-get install valgrind``).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

BIG, SMALL = 12_000, 2_000


def _count(argv: list[str]) -> int:
    """Instructions of the whole process ``argv`` (a Python run) under callgrind."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "callgrind.out"
        env = {**os.environ, "PYTHONHASHSEED": "0"}  # the same dict layouts every run
        subprocess.run(
            ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", *argv],
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env=env,
        )
        found = re.search(r"^summary: (\d+)", out.read_text(), re.M)
        if found is None:
            raise RuntimeError(f"callgrind wrote no summary for {argv}")
        return int(found.group(1))


def _runtime_path(case: str, count: int) -> int:
    code = (
        "import asyncio; from benchmarks import runtime_path as r; "
        f"asyncio.run(r.measure({case!r}, {count}))"
    )
    return _count([sys.executable, "-c", code])


def _e2e(case: str, count: int) -> int:
    queue = f"bench.instructions.{case}.{uuid.uuid4().hex[:8]}"
    _step("fill", case, count, queue)
    try:
        return _count(_step_argv("consume", case, count, queue))
    finally:
        _step("delete", case, count, queue)


def _step_argv(step: str, case: str, count: int, queue: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "benchmarks.instructions",
        "--step",
        step,
        case,
        str(count),
        queue,
    ]


def _step(step: str, case: str, count: int, queue: str) -> None:
    subprocess.run(_step_argv(step, case, count, queue), check=True)


def step(step: str, case: str, count: int, queue: str) -> None:
    """One part of an end-to-end count, in a process of its own."""
    from . import consume
    from .common import EXCHANGE, declare_worker_queue, delete_queues, preload

    clock = consume.Clock(count)
    worker = consume.workerkit_worker(case, queue, clock.delivered)
    if step == "fill":
        declare_worker_queue(worker)
        headers = None
        if case.endswith("_stamped"):
            from workerkit.stats import PUBLISHED_AT_HEADER

            headers = {PUBLISHED_AT_HEADER: int(time.time() * 1000)}
        preload(queue, count, exchange=EXCHANGE, headers=headers)
    elif step == "consume":
        asyncio.run(consume.run_workerkit(worker, clock, case in consume.WITH_METRICS))
        if clock.seen != count:
            raise RuntimeError(f"{case}: consumed {clock.seen} of {count}")
    else:
        delete_queues(queue, f"{queue}.dlq")


def per_delivery(case: str, e2e: bool) -> float:
    count = _e2e if e2e else _runtime_path
    return (count(case, BIG) - count(case, SMALL)) / (BIG - SMALL)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("cases", nargs="+")
    parser.add_argument("--e2e", action="store_true", help="the consumer process, real broker")
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--step", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.step:
        case, count, queue = args.cases[0], int(args.cases[1]), args.cases[2]
        step(args.step, case, count, queue)
        return
    if shutil.which("valgrind") is None:
        sys.exit("benchmarks.instructions: needs valgrind (Debian: apt-get install valgrind)")
    for case in args.cases:
        runs = [per_delivery(case, args.e2e) for _ in range(args.runs)]
        shown = ", ".join(f"{run:,.0f}" for run in runs)
        print(f"{case}: {statistics.median(runs):,.0f} instructions per delivery ({shown})")


if __name__ == "__main__":
    main()
