"""Receipt e-mails for placed orders: an async handler fed by the ``orders.placed`` event.

Run it with ``workerkit run workers.receipts:SendReceipt``.

E-mail is FAKE here: a "sent" receipt is one JSON line appended to the outbox file named by
``RECEIPTS_OUTBOX`` (default ``/tmp/workerkit-demo/outbox.jsonl``) plus a log line. Swap
:meth:`SendReceipt.deliver` for your SMTP or e-mail API client.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from pathlib import Path

from pydantic import BaseModel, Field

from workerkit import Message, Reject, RetryPolicy, Worker

__all__ = ["LineItem", "OrderPlaced", "SendReceipt", "SmtpUnavailable"]

# A child of the "workerkit" logger, so `workerkit run` formats and shows these lines.
log = logging.getLogger("workerkit.examples.receipts")

DEFAULT_OUTBOX = "/tmp/workerkit-demo/outbox.jsonl"
# A demo hook for seeing retries: addresses at this domain fail on their first attempt.
FLAKY_DOMAIN = "@flaky.example"


class LineItem(BaseModel):
    sku: str
    quantity: int = Field(ge=1)
    unit_price_cents: int = Field(ge=0)


class OrderPlaced(BaseModel):
    """The ``orders.placed`` event. ``email`` may be missing: guest checkouts have none."""

    order_id: int
    email: str | None = None
    items: list[LineItem] = Field(default_factory=list)

    @property
    def total_cents(self) -> int:
        return sum(item.quantity * item.unit_price_cents for item in self.items)


class SmtpUnavailable(ConnectionError):
    """The (fake) mail server is unreachable: a transient error worth retrying."""


class SendReceipt(Worker):
    queue = "receipts"
    bindings = ("orders.placed",)
    prefetch = 50
    concurrency = 10
    retry = RetryPolicy(max_attempts=4, delay=0.5, backoff=2.0, max_delay=30.0)

    async def setup(self) -> None:
        self.outbox = Path(os.environ.get("RECEIPTS_OUTBOX", DEFAULT_OUTBOX))
        self.outbox.parent.mkdir(parents=True, exist_ok=True)
        # Delivery is at-least-once: remember what this process already sent so that a
        # redelivered order does not mail the customer twice. A real service would keep this in
        # its database, keyed by order id.
        self.sent: set[int] = set()

    async def handle(self, order: OrderPlaced, message: Message) -> None:
        if not order.email:
            raise Reject(f"order {order.order_id} has no e-mail address")
        if order.order_id in self.sent:
            log.info("receipt for order %s already sent; skipping duplicate", order.order_id)
            return
        if order.email.endswith(FLAKY_DOMAIN) and message.attempt == 1:
            raise SmtpUnavailable(f"mail server refused {order.email} (demo: first attempt fails)")
        await self.deliver(order, message)
        self.sent.add(order.order_id)

    async def deliver(self, order: OrderPlaced, message: Message) -> None:
        """FAKE e-mail: append the receipt to the outbox file instead of talking to SMTP."""
        receipt = {
            "order_id": order.order_id,
            "to": order.email,
            "subject": f"Your receipt for order #{order.order_id}",
            "total_cents": order.total_cents,
            "message_id": message.message_id,
            "attempt": message.attempt,
        }
        line = json.dumps(receipt, sort_keys=True) + "\n"
        # File I/O off the event loop, like any blocking client call from an async handler.
        await asyncio.to_thread(_append, self.outbox, line)
        log.info("FAKE e-mail: receipt for order %s written to %s", order.order_id, self.outbox)


def _append(path: Path, line: str) -> None:
    with path.open("a", encoding="utf-8") as fh:
        fh.write(line)
