"""Batch workers: class-definition checks and the handler's failure mapping."""

from __future__ import annotations

import uuid
from typing import Any

import pytest
from pydantic import BaseModel

from workerkit import ConfigurationError, Message, Reject, Worker
from workerkit.batch import Failures, failures_of
from workerkit.idempotency import MemoryStore


class Order(BaseModel):
    order_id: int


def qname() -> str:
    return f"unit.batch.{uuid.uuid4().hex[:8]}"


def test_batch_handler_decodes_each_element() -> None:
    class Batched(Worker):
        queue = qname()
        batch_size = 10

        async def handle(self, orders: list[Order], messages: list[Message]) -> None: ...

    assert Batched._handler.body_type is Order
    assert Batched._handler.wants_message


@pytest.mark.parametrize(
    ("attrs", "annotation", "match"),
    [
        ({"batch_size": 0}, list[Order], "batch_size"),
        ({"batch_size": 5, "batch_timeout": 0}, list[Order], "batch_timeout"),
        ({"batch_size": 5, "prefetch": 2}, list[Order], "never fill"),
        ({"batch_size": 5}, Order, "annotate the body as a list"),
        (
            {"batch_size": 5, "idempotent": True, "idempotency_store": MemoryStore()},
            list[Order],
            "idempotent",
        ),
    ],
)
def test_bad_batch_workers_fail_at_definition(
    attrs: dict[str, Any], annotation: Any, match: str
) -> None:
    async def handle(self: Worker, items: Any) -> None: ...

    handle.__annotations__ = {"items": annotation, "return": None}
    with pytest.raises(ConfigurationError, match=match):
        type("Bad", (Worker,), {"queue": qname(), "handle": handle, **attrs})


def test_second_parameter_must_be_a_list_of_messages() -> None:
    with pytest.raises(ConfigurationError, match="list\\[Message\\]"):

        class Bad(Worker):
            queue = qname()
            batch_size = 5

            async def handle(self, orders: list[Order], message: Message) -> None: ...


def test_failures_of() -> None:
    boom = Reject("x")
    assert failures_of(None, 3) == {}
    assert failures_of(Failures({1: boom}), 3) == {1: boom}
    assert failures_of({0: boom}, 3) == {0: boom}
    everything = failures_of({7: boom}, 3)  # out of range: a handler bug fails every item
    assert set(everything) == {0, 1, 2} and isinstance(everything[0], TypeError)
    assert isinstance(failures_of({0: "not an exception"}, 2)[1], TypeError)
