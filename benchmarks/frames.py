"""CPU per delivery on the receive path, fed with recorded frames: no broker traffic, no noise.

``python -m benchmarks.frames [COUNT] [CHUNK]`` opens a real connection and consumes from an
empty queue (so pika's state is real), then hands the connection COUNT synthetic deliveries
(Basic.Deliver + content header + ~100 B JSON body, as consume.py's messages look) in CHUNK-byte
pieces (default 4096, pika's own read size; the fast path reads 65536) straight to where pika's
transport hands received bytes (``_pika_internals.receiver``), as the socket would, and reports
CPU microseconds per delivery from the bytes to the consumer callback holding a Message. It runs
with the fast path on and off (the fallback is pika's decoder). ``valgrind --tool=callgrind`` on
it gives instruction counts.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from typing import Any

import pika.frame
from pika import spec

from workerkit.message import Message
from workerkit.transport import _fastframes, _pika_internals
from workerkit.transport.pika_asyncio import PikaTransport
from workerkit.transport.specs import QueueSpec

from .common import payload, queue_name, settings


def recorded(channel: int, tag: str, queue: str, count: int) -> bytes:
    """One delivery's frames, ``count`` times (built once: building is not what is measured)."""
    props = spec.BasicProperties(content_type="application/json", delivery_mode=2)
    body = payload(1)
    frames = [
        pika.frame.Method(channel, spec.Basic.Deliver(tag, 1, False, "", queue)).marshal(),
        pika.frame.Header(channel, len(body), props).marshal(),
        pika.frame.Body(channel, body).marshal(),
    ]
    return b"".join(frames) * count


async def measure(fast: bool, count: int, chunk: int) -> dict[str, Any]:
    _fastframes.ENABLED = fast
    queue = queue_name("frames")
    conn = await PikaTransport().connect(settings(), name="frames", on_lost=lambda _e: None)
    try:
        channel = await conn.channel(prefetch=100)
        await channel.declare_queue(QueueSpec(queue, {"x-queue-type": "quorum"}))
        got: list[Message] = []
        tag = await channel.consume(queue, got.append, lambda: None)
        stream = recorded(channel._raw.channel_number, tag, queue, count)
        pieces = [stream[i : i + chunk] for i in range(0, len(stream), chunk)]
        receive = _pika_internals.receiver(conn._raw)
        cpu, wall = time.process_time(), time.perf_counter()
        for piece in pieces:
            receive(piece)
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
        assert len(got) == count, (len(got), count)
        await channel.delete_queue(queue)
    finally:
        await conn.close()
    return {
        "path": "fast" if fast else "pika",
        "chunk": chunk,
        "count": count,
        "cpu_us_per_message": round(cpu / count * 1e6, 3),
        "wall_us_per_message": round(wall / count * 1e6, 3),
    }


def main() -> None:
    count = int(sys.argv[1]) if len(sys.argv) > 1 else 20000
    chunk = int(sys.argv[2]) if len(sys.argv) > 2 else 4096
    paths = sys.argv[3].split(",") if len(sys.argv) > 3 else ["pika", "fast"]
    for path in paths:
        print("RESULT", json.dumps(asyncio.run(measure(path == "fast", count, chunk))))


if __name__ == "__main__":
    main()
