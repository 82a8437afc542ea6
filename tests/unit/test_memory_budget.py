"""A worker's memory budget and the copies a large body costs (issue 9, item 9), without a broker:
the prefetch cap, the body frames built once, large frames written unjoined, and failed
deliveries that do not outlive their handling in a reference cycle."""

from __future__ import annotations

import gc
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import pika.frame
import pytest

from workerkit import Reject, Settings, Worker
from workerkit.message import Message
from workerkit.runtime import byte_cap, window
from workerkit.testing import in_memory, memory_publisher, running, wait_for
from workerkit.transport import _pika_internals
from workerkit.transport.memory import MemoryBroker

MiB = 1024 * 1024


def worker(**attrs: Any) -> type[Worker]:
    async def handle(self: Any, body: bytes) -> None:
        return None

    async def handle_batch(self: Any, bodies: list[bytes]) -> None:
        return None

    handler: Callable[..., Awaitable[None]] = handle_batch if attrs.get("batch_size") else handle
    name = "W" + uuid.uuid4().hex[:6]
    return type(name, (Worker,), {"queue": f"unit.{name}", "handle": handler, **attrs})


def test_the_budget_caps_the_prefetch_at_budget_over_max_body_size() -> None:
    cls = worker(concurrency=4)
    tight = Settings(max_in_flight_bytes=64 * MiB, max_body_size=16 * MiB)
    assert byte_cap(tight) == 4
    assert window(cls, tight, 100, None) == (4, 4)
    assert window(cls, tight, 2, None) == (2, 4)  # below the cap: as asked
    # The defaults: 256 MiB of 16 MiB bodies; a smaller max_body_size allows more.
    assert window(cls, Settings(), 100, None) == (16, 4)
    assert window(cls, Settings(max_body_size=MiB), 100, None) == (100, 4)
    # At least one delivery, even when one body is larger than the budget; 0 turns it off.
    assert byte_cap(Settings(max_in_flight_bytes=MiB, max_body_size=16 * MiB)) == 1
    assert window(cls, Settings(max_in_flight_bytes=0), 1000, None) == (1000, 4)
    batch = worker(batch_size=50, concurrency=2)
    assert window(batch, tight, None, None) == (4, 2)


def test_a_capped_batch_worker_is_told_its_batches_are_smaller(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A batch_size of 100 with the default budget fills batches of 16 at most: say so, in the
    start-up warning, rather than leave the user to wonder (found by a docs review)."""
    runner, _ = in_memory([worker(batch_size=100)], settings=Settings())
    with caplog.at_level("INFO", logger="workerkit.runner"):
        runner._say_memory_caps()
    [record] = [r for r in caplog.records if "instead of" in r.getMessage()]
    assert record.levelname == "WARNING"
    assert "batches of at most 16 instead of batch_size 100" in record.getMessage()


@pytest.mark.parametrize("size", [1, 1000, 131064, 131065, 3 * 131064 + 17, 2 * MiB])
def test_body_frames_are_pikas_frames_built_once(size: int) -> None:
    body = bytes(range(256)) * (size // 256) + b"x" * (size % 256)
    step = 131064  # frame_max 131072 less the frame overhead
    pikas = b"".join(
        pika.frame.Body(7, body[start : start + step]).marshal()
        for start in range(0, len(body), step)
    )
    assert _pika_internals._body_frames(7, body, step) == pikas


def test_large_frames_are_written_unjoined_and_in_order() -> None:
    big = b"B" * (_pika_internals.BIG_FRAMES + 1)
    writes = _pika_internals.writes([b"m1", b"h1", big, b"m2", b"h2"])
    assert writes == [b"m1h1", big, b"m2h2"]
    assert writes[1] is big  # not copied
    assert _pika_internals.writes([b"a", b"b", b"c"]) == [b"abc"]  # only small ones: one write


@pytest.mark.parametrize("kind", ["async", "def"])
async def test_a_rejected_delivery_does_not_outlive_its_handling(kind: str) -> None:
    """The failure's traceback holds the delivery's frame; with the frame holding the failure,
    only the garbage collector freed them (and the body): with it off, none may be left."""
    broker = MemoryBroker()
    queue = f"unit.cycle.{uuid.uuid4().hex[:8]}"

    async def handle(self: Any, body: bytes, message: Message) -> None:
        raise Reject("not this one")

    def handle_def(self: Any, body: bytes, message: Message) -> None:
        raise Reject("not this one")

    chosen = handle if kind == "async" else handle_def
    cls = type("CycleW", (Worker,), {"queue": queue, "handle": chosen, "concurrency": 1})
    settings = Settings(exchange="wkm", publish_timeout=2.0, shutdown_grace=1.0)
    runner, _ = in_memory([cls], broker=broker, settings=settings)
    gc.collect()
    gc.disable()
    try:
        async with running(runner), memory_publisher(broker, settings) as publisher:
            for n in range(5):
                await publisher.publish(queue, f"big-{n}".encode() * 1000)
            await wait_for(lambda: broker.ready_count(f"{queue}.dlq") == 5, 5, "five in the DLQ")
            await wait_for(lambda: broker.unacked(queue) == 0, 5, "five acked")
            alive = [
                o for o in gc.get_objects() if isinstance(o, Message) and o.body.startswith(b"big-")
            ]
            assert alive == [], f"{len(alive)} handled deliveries still alive"
    finally:
        gc.enable()
