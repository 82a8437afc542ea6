"""Publish a burst of orders (some invalid on purpose) and images from several threads.

    python -m workers.produce --orders 200 --images 5 --threads 4

Every thread shares one :class:`workerkit.Publisher`; each publish returns once the broker
confirmed it. What the workers should make of each kind of order:

* ``valid``   - a receipt in the outbox and a line in the audit log;
* ``flaky``   - the fake mail server fails the first attempt: retried by the broker, then sent;
* ``no-email``- ``Reject``: straight to ``receipts.dlq`` (reason ``rejected``), still audited;
* ``invalid`` - fails validation (``order_id`` is not a number): ``receipts.dlq`` (``invalid``).
"""

from __future__ import annotations

import argparse
import base64
import collections
import concurrent.futures
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from workerkit import Publisher, WorkerkitError

from .receipts import FLAKY_DOMAIN, LineItem, OrderPlaced
from .thumbnails import ImageUploaded

__all__ = ["Batch", "publish_all", "sample_images", "sample_orders"]

ORDERS_EVENT = "orders.placed"
IMAGES_EVENT = "images.uploaded"


@dataclass
class Batch:
    """Bodies to publish on one routing key, each with the kind the workers will see."""

    routing_key: str
    items: list[tuple[str, object]] = field(default_factory=list)  # (kind, body)


def sample_orders(count: int, *, first_id: int | None = None) -> list[tuple[str, object]]:
    """``count`` orders: mostly valid, 1 in 10 without e-mail, 1 in 10 invalid, a few flaky."""
    start = first_id if first_id is not None else int(time.time() * 1000) % 10**9 * 100
    orders: list[tuple[str, object]] = []
    for n in range(count):
        order_id = start + n
        items = [LineItem(sku=f"SKU-{n % 7}", quantity=1 + n % 3, unit_price_cents=499)]
        if n % 10 == 3:
            orders.append(("no-email", OrderPlaced(order_id=order_id, items=items)))
        elif n % 10 == 7:
            orders.append(("invalid", {"order_id": f"ORD-{order_id}", "email": "x@shop.example"}))
        elif n % 20 == 9:
            email = f"customer{n}{FLAKY_DOMAIN}"
            orders.append(("flaky", OrderPlaced(order_id=order_id, email=email, items=items)))
        else:
            email = f"customer{n}@shop.example"
            orders.append(("valid", OrderPlaced(order_id=order_id, email=email, items=items)))
    return orders


def sample_images(count: int, *, size: int = 256) -> list[tuple[str, object]]:
    """``count`` square grayscale gradients of ``size`` pixels a side."""
    images: list[tuple[str, object]] = []
    for n in range(count):
        pixels = bytes((x + y + 17 * n) % 256 for y in range(size) for x in range(size))
        image = ImageUploaded(
            image_id=f"img-{int(time.time())}-{n}",
            width=size,
            height=size,
            pixels=base64.b64encode(pixels),
        )
        images.append(("image", image))
    return images


def publish_all(
    publisher: Publisher, batches: Sequence[Batch], *, threads: int = 4
) -> collections.Counter[str]:
    """Publish every item from ``threads`` threads at once; counts per kind, and ``failed``."""
    jobs = [(batch.routing_key, kind, body) for batch in batches for kind, body in batch.items]
    counts: collections.Counter[str] = collections.Counter()

    def send(job: tuple[str, str, object]) -> str:
        routing_key, kind, body = job
        try:
            publisher.publish(routing_key, body)
        except WorkerkitError as exc:
            print(f"  publish to {routing_key} failed: {type(exc).__name__}: {exc}")
            return "failed"
        return kind

    with concurrent.futures.ThreadPoolExecutor(threads, thread_name_prefix="producer") as pool:
        counts.update(pool.map(send, jobs))
    return counts


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--orders", type=int, default=100)
    parser.add_argument("--images", type=int, default=3)
    parser.add_argument("--threads", type=int, default=4)
    args = parser.parse_args(argv)

    batches = [
        Batch(ORDERS_EVENT, sample_orders(args.orders)),
        Batch(IMAGES_EVENT, sample_images(args.images)),
    ]
    started = time.monotonic()
    with Publisher() as publisher:
        counts = publish_all(publisher, batches, threads=args.threads)
    elapsed = time.monotonic() - started
    total = sum(counts.values()) - counts["failed"]
    print(f"published {total} confirmed messages from {args.threads} threads in {elapsed:.2f}s")
    for kind, number in sorted(counts.items()):
        print(f"  {kind:<9} {number}")
    return 1 if counts["failed"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
