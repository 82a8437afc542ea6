"""The "limit" rows: what the broker delivers to a C client that costs almost nothing.

``python -m benchmarks.limit CASE COUNT`` builds the C anchors in ``benchmarks/c/`` with gcc
and librabbitmq (once per source change, into ``benchmarks/.build/``, which git ignores, or
``$BENCH_BUILD_DIR``), then runs one case exactly as consume.py / publish.py run theirs: a
fresh quorum queue, the same ~100-byte persistent JSON bodies, the same clock. Without gcc or
librabbitmq (Debian: ``librabbitmq-dev``; ``benchmarks/setup.sh`` installs both) it reports
``unavailable`` with the reason, and the report says so in the row instead of failing.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from .common import (
    EXCHANGE,
    PREFETCH,
    URL,
    blocking_channel,
    declare_raw_queue,
    delete_queues,
    preload,
    queue_name,
    report,
)

SOURCES = Path(__file__).resolve().parent / "c"
BUILD = Path(os.environ.get("BENCH_BUILD_DIR", Path(__file__).resolve().parent / ".build"))
CFLAGS = ("-O2", "-Wall", "-Wextra")
PUBLISH_IN_FLIGHT = 100

# case -> (program, prefetch, ack every K-th delivery with multiple=True; 1 = ack each)
CONSUME: dict[str, tuple[int, int]] = {
    "c_consume_each": (PREFETCH, 1),
    "c_consume_multi": (PREFETCH, PREFETCH // 2),
    "c_consume_p1000": (1000, 100),
}
PUBLISH = ("c_publish_100",)
CASES = (*CONSUME, *PUBLISH)


class Unavailable(Exception):
    """The C anchors cannot be built here; the message says what is missing."""


def compiler() -> str:
    named = os.environ.get("CC") or "gcc"
    found = shutil.which(named) or (None if "CC" in os.environ else shutil.which("cc"))
    if not found:
        raise Unavailable("no C compiler (install gcc and librabbitmq-dev: benchmarks/setup.sh)")
    return found


def library_flags() -> list[str]:
    """librabbitmq's compiler and linker flags: pkg-config's where it knows the library."""
    if shutil.which("pkg-config"):
        found = subprocess.run(
            ["pkg-config", "--cflags", "--libs", "librabbitmq"],
            capture_output=True,
            text=True,
            check=False,
        )
        if found.returncode == 0 and found.stdout.strip():
            return found.stdout.split()
    return ["-lrabbitmq"]


def build(program: str) -> Path:
    """Path of the compiled ``benchmarks/c/<program>.c``, compiling it when its source changed.

    The binary's name carries a hash of the sources and flags, so a stale build is never run;
    it is written under a temporary name and renamed, so concurrent runs never see half a file.
    """
    cc = compiler()
    digest = hashlib.sha256(" ".join((cc, *CFLAGS, *library_flags())).encode())
    for source in sorted(SOURCES.glob("*.[ch]")):
        digest.update(source.name.encode() + source.read_bytes())
    target = BUILD / f"{program}-{digest.hexdigest()[:12]}"
    if target.exists():
        return target
    BUILD.mkdir(parents=True, exist_ok=True)
    fd, scratch = tempfile.mkstemp(dir=BUILD, prefix=f".{program}-")
    os.close(fd)
    command = [cc, *CFLAGS, "-o", scratch, str(SOURCES / f"{program}.c"), *library_flags()]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        os.unlink(scratch)
        lines = done.stderr.strip().splitlines() or ["no output"]
        missing = next((line for line in lines if "amqp" in line and "No such" in line), "")
        if missing or "lrabbitmq" in done.stderr:
            raise Unavailable(
                "librabbitmq is not installed (Debian: librabbitmq-dev; benchmarks/setup.sh)"
            )
        raise Unavailable(f"gcc failed: {lines[-1][:160]}")
    os.replace(scratch, target)
    return target


def run(program: Path, *args: str, timeout: float = 300) -> dict[str, Any]:
    done = subprocess.run(
        [str(program), *args], capture_output=True, text=True, timeout=timeout, check=False
    )
    for line in done.stdout.splitlines():
        if line.startswith("RESULT "):
            return dict(json.loads(line.removeprefix("RESULT ")))
    tail = (done.stderr.strip().splitlines() or [f"exit {done.returncode}, no output"])[-1]
    raise RuntimeError(f"{program.name}: {tail[:200]}")


def queue_depth(queue: str, settle: float = 0.0) -> int:
    """Ready messages in ``queue``; with ``settle``, polls up to that long for it to reach 0.

    A quorum queue applies acks through its Raft log, so the count can lag the client's last
    ack by a moment.
    """
    conn, channel = blocking_channel()
    deadline = time.monotonic() + settle
    try:
        while True:
            depth = int(channel.queue_declare(queue, passive=True).method.message_count)
            if depth == 0 or time.monotonic() >= deadline:
                return depth
            conn.sleep(0.05)
    finally:
        conn.close()


def consume(case: str, count: int) -> dict[str, Any]:
    prefetch, ack_every = CONSUME[case]
    program = build("consume")
    queue = queue_name(case)
    declare_raw_queue(queue)
    try:
        preload(queue, count)
        result = run(program, URL, queue, str(count), str(prefetch), str(ack_every))
        # The consumer closed its channel: anything it did not ack is back in the queue.
        left = queue_depth(queue, settle=10.0)
    finally:
        delete_queues(queue)
    if left:
        raise RuntimeError(f"{case}: {left} of {count} messages were not acked")
    return {"case": case, **result}


def publish(case: str, count: int) -> dict[str, Any]:
    program = build("publish")
    queue = queue_name(f"pub-{case}")
    declare_raw_queue(queue, bind_exchange=EXCHANGE)
    try:
        result = run(program, URL, EXCHANGE, queue, str(count), str(PUBLISH_IN_FLIGHT))
        depth = queue_depth(queue)
    finally:
        delete_queues(queue)
    if depth != count + 1:
        raise RuntimeError(f"{case}: the queue holds {depth} of {count + 1} confirmed messages")
    return {"case": case, **result}


def measure(case: str, count: int) -> dict[str, Any]:
    try:
        return consume(case, count) if case in CONSUME else publish(case, count)
    except Unavailable as exc:
        return {"case": case, "unavailable": str(exc)}


def main() -> None:
    logging.basicConfig(level=logging.WARNING)
    case, count = sys.argv[1], int(sys.argv[2])
    if case not in CASES:
        sys.exit(f"unknown case {case!r}; one of {', '.join(CASES)}")
    report(**measure(case, count))


if __name__ == "__main__":
    main()
