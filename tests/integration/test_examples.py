"""The example app in ``workers/`` against the real broker, fed through the producer's code path.

Each test subclasses the example workers with unique queue names and routing keys so that runs
never see each other's messages; everything else (handlers, models, retry policies, producer
helpers, the WSGI app) is the example code itself.
"""

from __future__ import annotations

import asyncio
import io
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pika
import pytest

from workerkit import Publisher, RetryPolicy, Runner, Worker
from workerkit.dlq import list_dead
from workerkit.settings import Settings
from workerkit.testing import running
from workers import produce, webapp
from workers.audit import AuditLog
from workers.pricing import Pricing
from workers.receipts import SendReceipt
from workers.thumbnails import MakeThumbnail

pytestmark = pytest.mark.integration


def _lines(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines()]


def _delete_queues(url: str, names: list[str]) -> None:
    connection = pika.BlockingConnection(pika.URLParameters(url))
    try:
        channel = connection.channel()
        for name in names:
            channel.queue_delete(name)
    finally:
        connection.close()


class App:
    """The three example workers on queues private to one test."""

    def __init__(self, unique: Callable[[str], str], settings: Settings, tmp: Path) -> None:
        prefix = unique("shop")
        self.settings = settings
        self.orders_key = f"{prefix}.orders.placed"
        self.images_key = f"{prefix}.images.uploaded"
        orders_key, images_key = self.orders_key, self.images_key

        class Receipts(SendReceipt):
            queue = f"{prefix}.receipts"
            bindings = (orders_key,)
            # The example's policy with a shorter first delay, to keep the test quick.
            retry = RetryPolicy(max_attempts=4, delay=0.2, backoff=2.0, max_delay=5.0)

        class Thumbnails(MakeThumbnail):
            queue = f"{prefix}.thumbnails"
            bindings = (images_key,)

        class Audit(AuditLog):
            queue = f"{prefix}.audit"
            bindings = (f"{prefix}.orders.*", f"{prefix}.images.*")

        self.quote_key = quote_key = f"{prefix}.pricing.quote"

        class Quotes(Pricing):
            queue = f"{prefix}.pricing"
            bindings = (quote_key,)

        self.workers: list[type[Worker]] = [Receipts, Thumbnails, Audit, Quotes]
        self.outbox = tmp / "outbox.jsonl"
        self.audit_log = tmp / "audit.jsonl"
        self.thumbnails = tmp / "thumbnails"

    def queues(self) -> list[str]:
        return [q for w in self.workers for q in (w.queue, f"{w.queue}.dlq")]

    async def burst(self) -> None:
        """Run every worker until its queue is empty and nothing is in flight."""
        runner = Runner(self.workers, settings=self.settings, burst=True, handle_signals=False)
        await asyncio.wait_for(runner.run(), 60)


@pytest.fixture
def app(
    unique: Callable[[str], str],
    settings: Settings,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    broker_url: str,
) -> Any:
    shop = App(unique, settings, tmp_path)
    monkeypatch.setenv("RECEIPTS_OUTBOX", str(shop.outbox))
    monkeypatch.setenv("AUDIT_LOG", str(shop.audit_log))
    monkeypatch.setenv("THUMBNAILS_DIR", str(shop.thumbnails))
    yield shop
    _delete_queues(broker_url, shop.queues())


async def _burst_until(app: App, condition: Callable[[], bool], timeout: float = 40.0) -> None:
    """Burst runs until ``condition`` holds: retried messages come back from the delay queues."""
    deadline = time.monotonic() + timeout
    while True:
        await app.burst()
        if condition():
            return
        if time.monotonic() > deadline:
            raise AssertionError("the example workers did not reach the expected state in time")
        await asyncio.sleep(0.1)


async def test_orders_images_and_audit_end_to_end(app: App, settings: Settings) -> None:
    await app.burst()  # declares every queue and binding before anything is published

    orders = produce.sample_orders(40, first_id=1000)
    images = produce.sample_images(3, size=96)
    kinds = [kind for kind, _ in orders]
    batches = [produce.Batch(app.orders_key, orders), produce.Batch(app.images_key, images)]
    with Publisher(settings=settings) as publisher:
        counts = await asyncio.to_thread(produce.publish_all, publisher, batches, threads=4)
    assert counts["failed"] == 0
    assert counts["valid"] + counts["flaky"] + counts["no-email"] + counts["invalid"] == 40
    assert counts["flaky"] >= 1 and counts["no-email"] >= 1 and counts["invalid"] >= 1

    deliverable = {1000 + n for n, kind in enumerate(kinds) if kind in ("valid", "flaky")}
    expected_audit = len(orders) + len(images)

    def settled() -> bool:
        return (
            {r["order_id"] for r in _lines(app.outbox)} == deliverable
            and len(_lines(app.audit_log)) >= expected_audit
            and len(list(app.thumbnails.glob("*.pgm"))) == len(images)
        )

    await _burst_until(app, settled)

    # Receipts: one per deliverable order; the flaky ones were sent on their second attempt.
    receipts = _lines(app.outbox)
    assert len(receipts) == len(deliverable)
    flaky = {1000 + n for n, kind in enumerate(kinds) if kind == "flaky"}
    assert {r["order_id"] for r in receipts if r["attempt"] == 2} == flaky
    assert all(r["to"] and r["subject"].endswith(str(r["order_id"])) for r in receipts)

    # The receipts DLQ holds exactly the rejected and the invalid orders, with their reasons.
    receipts_queue = app.workers[0].queue
    dead = await list_dead(receipts_queue, settings=settings)
    reasons = sorted(d.reason for d in dead)
    assert reasons == sorted(
        {"no-email": "rejected", "invalid": "invalid"}[k]
        for k in kinds
        if k in ("no-email", "invalid")
    )
    for letter in dead:
        body = json.loads(letter.body)
        if letter.reason == "rejected":
            assert "has no e-mail address" in (letter.error_message or "")
            assert body["email"] is None
        else:
            assert "order_id" in (letter.error_message or "")
            assert str(body["order_id"]).startswith("ORD-")
        assert letter.original_routing_key == app.orders_key

    # Audit: every event once (nothing was redelivered in this run), pixels summarised.
    audit = _lines(app.audit_log)
    assert len(audit) == expected_audit
    assert len({r["message_id"] for r in audit}) == expected_audit
    assert sum(r["event"] == app.orders_key for r in audit) == len(orders)
    image_records = [r for r in audit if r["event"] == app.images_key]
    assert len(image_records) == len(images)
    assert all(r["data"]["pixels"].startswith("<") for r in image_records)

    # Thumbnails: real PGM files, downscaled to fit 64x64.
    for path in app.thumbnails.glob("*.pgm"):
        data = path.read_bytes()
        assert data.startswith(b"P5\n64 64\n255\n")
        assert len(data) == len(b"P5\n64 64\n255\n") + 64 * 64
    assert await _dlq_empty(app.workers[1].queue, settings)
    assert await _dlq_empty(app.workers[2].queue, settings)


async def _dlq_empty(queue: str, settings: Settings) -> bool:
    return await list_dead(queue, settings=settings) == []


async def test_webapp_publishes_orders_the_workers_handle(app: App, settings: Settings) -> None:
    await app.burst()
    with Publisher(settings=settings) as publisher:
        wsgi = webapp.make_app(publisher, routing_key=app.orders_key)

        def post(path: str, payload: bytes, method: str = "POST") -> tuple[str, dict[str, Any]]:
            replies: list[str] = []
            environ = {
                "REQUEST_METHOD": method,
                "PATH_INFO": path,
                "CONTENT_LENGTH": str(len(payload)),
                "wsgi.input": io.BytesIO(payload),
            }
            body = b"".join(wsgi(environ, lambda status, _headers: replies.append(status)))
            return replies[0], json.loads(body)

        order = {"order_id": 42, "email": "web@shop.example", "items": []}
        status, reply = await asyncio.to_thread(post, "/orders", json.dumps(order).encode())
        assert status == "202 Accepted"
        assert reply == {"order_id": 42, "message_id": "order-42"}

        status, reply = await asyncio.to_thread(post, "/orders", b'{"order_id": "x"}')
        assert status.startswith("422") and reply["error"] == "invalid order"
        status, _ = await asyncio.to_thread(post, "/orders", b"", "GET")
        assert status.startswith("405")

        unbound = webapp.make_app(publisher, routing_key=app.orders_key + ".nobody")
        environ = {
            "REQUEST_METHOD": "POST",
            "PATH_INFO": "/orders",
            "CONTENT_LENGTH": str(len(json.dumps(order))),
            "wsgi.input": io.BytesIO(json.dumps(order).encode()),
        }
        statuses: list[str] = []
        body = await asyncio.to_thread(
            lambda: b"".join(unbound(environ, lambda s, _h: statuses.append(s)))
        )
        assert statuses == ["503 Unavailable"] and b"Unroutable" in body

    await _burst_until(app, lambda: len(_lines(app.outbox)) == 1)
    (receipt,) = _lines(app.outbox)
    assert receipt["order_id"] == 42 and receipt["message_id"] == "order-42"


async def test_webapp_asks_the_pricing_worker_for_quotes(app: App, settings: Settings) -> None:
    runner = Runner(app.workers, settings=settings, handle_signals=False)
    with Publisher(settings=settings) as publisher:
        wsgi = webapp.make_app(publisher, routing_key=app.orders_key, quote_key=app.quote_key)

        def get(query: str) -> tuple[str, dict[str, Any]]:
            statuses: list[str] = []
            environ = {"REQUEST_METHOD": "GET", "PATH_INFO": "/quote", "QUERY_STRING": query}
            body = b"".join(wsgi(environ, lambda status, _headers: statuses.append(status)))
            return statuses[0], json.loads(body)

        async with running(runner):
            status, quote = await asyncio.to_thread(get, "sku=A1&quantity=3")
            assert status == "200 OK"
            assert quote == {
                "sku": "A1",
                "quantity": 3,
                "unit_price_cents": 1250,
                "total_cents": 3750,
            }
            status, quote = await asyncio.to_thread(get, "sku=B2&quantity=10")  # bulk: 10% off
            assert status == "200 OK" and quote["total_cents"] == 3591
            status, reply = await asyncio.to_thread(get, "sku=ZZ")
            assert status == "404 Not Found" and reply == {"error": "unknown sku 'ZZ'"}
            status, reply = await asyncio.to_thread(get, "quantity=2")
            assert status.startswith("422")
        # No pricing worker consuming: the request waits in its queue and the page gives up.
        webapp_timeout = webapp.QUOTE_TIMEOUT
        webapp.QUOTE_TIMEOUT = 0.5
        try:
            status, reply = await asyncio.to_thread(get, "sku=A1")
        finally:
            webapp.QUOTE_TIMEOUT = webapp_timeout
        assert status == "503 Unavailable" and reply["error"].startswith("RequestTimeout")
