"""Price quotes on request: a worker whose return value is the reply.

Run it with ``workerkit run workers.pricing:Pricing``; ask it with
``workerkit request pricing.quote '{"sku": "A1", "quantity": 3}'`` or, from code,
``Publisher().request("pricing.quote", QuoteRequest(sku="A1"), reply_type=Quote)`` (the web app's
``GET /quote?sku=A1`` does that).

The price list is a dict here; swap :meth:`Pricing.price_of` for your catalogue.
"""

from __future__ import annotations

import logging

from pydantic import BaseModel, Field

from workerkit import Reject, Worker

__all__ = ["PRICES", "Pricing", "Quote", "QuoteRequest"]

log = logging.getLogger("workerkit.examples.pricing")

# Unit prices in cents.
PRICES = {"A1": 1250, "B2": 399, "C3": 10_000}
# Quantity discount: 10 or more units get 10% off.
BULK_QUANTITY, BULK_PERCENT_OFF = 10, 10


class QuoteRequest(BaseModel):
    sku: str
    quantity: int = Field(default=1, ge=1, le=10_000)


class Quote(BaseModel):
    sku: str
    quantity: int
    unit_price_cents: int
    total_cents: int


class Pricing(Worker):
    """Answers ``pricing.quote`` requests with a :class:`Quote`.

    An unknown SKU is rejected: the caller gets ``RemoteError`` at once (not a timeout), and the
    request goes to ``pricing.quote.dlq`` like any rejected message. An invalid request (no
    ``sku``) does the same with reason ``invalid``.
    """

    queue = "pricing.quote"
    concurrency = 20

    async def handle(self, request: QuoteRequest) -> Quote:
        unit = self.price_of(request.sku)
        total = unit * request.quantity
        if request.quantity >= BULK_QUANTITY:
            total = total * (100 - BULK_PERCENT_OFF) // 100
        log.info("quoted %s x%d: %d cents", request.sku, request.quantity, total)
        return Quote(
            sku=request.sku, quantity=request.quantity, unit_price_cents=unit, total_cents=total
        )

    def price_of(self, sku: str) -> int:
        if sku not in PRICES:
            raise Reject(f"unknown sku {sku!r}")
        return PRICES[sku]
