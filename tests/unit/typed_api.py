"""Types users see, checked by mypy (scripts/typecheck.sh runs it over tests/, strict) rather
than by pytest: ``assert_type`` fails the type check when a public signature stops giving the
type the docs promise. Nothing here runs."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel
from typing_extensions import assert_type

from workerkit import AsyncPublisher, Publisher


class Quote(BaseModel):
    sku: str
    price: int


async def request_is_typed_by_its_reply_type(pub: AsyncPublisher, sync: Publisher) -> None:
    # docs/messages.md: with reply_type=Quote the call returns a Quote (or raises).
    assert_type(await pub.request("pricing.quote", {}, reply_type=Quote), Quote)
    assert_type(sync.request("pricing.quote", {}, reply_type=Quote), Quote)
    assert_type(sync.request("pricing.quote", {}, reply_type=list[int]), list[int])
    # Without it, the value is whatever came (JSON values, text, bytes).
    assert_type(await pub.request("pricing.quote", {}), Any)
