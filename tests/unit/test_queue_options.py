"""Queue options of a Worker: checked at class definition, declared with the work queue."""

from __future__ import annotations

import uuid
from typing import Any

import pytest

from workerkit import ConfigurationError, Settings, Worker
from workerkit.topology import Topology


def qname() -> str:
    return f"unit.opts.{uuid.uuid4().hex[:8]}"


def define(**attrs: Any) -> type[Worker]:
    async def handle(self: Worker, body: bytes) -> None: ...

    return type("Opts", (Worker,), {"queue": qname(), "handle": handle, **attrs})


def arguments(cls: type[Worker]) -> dict[str, Any]:
    return Topology(Settings(exchange="wkt")).worker_queues(cls)[-1].arguments


def test_options_become_queue_arguments() -> None:
    cls = define(
        queue_type="classic",
        max_priority=10,
        message_ttl=1.5,
        max_length=100,
        overflow="reject-publish-dlx",
        single_active_consumer=True,
        arguments={"x-max-length-bytes": 2048},
    )
    args = arguments(cls)
    assert args["x-max-priority"] == 10
    assert args["x-message-ttl"] == 1500
    assert args["x-max-length"] == 100
    assert args["x-overflow"] == "reject-publish-dlx"
    assert args["x-single-active-consumer"] is True
    assert args["x-max-length-bytes"] == 2048
    # Dead-lettering (and so expiry) still goes to <queue>.dlq.
    assert args["x-dead-letter-routing-key"] == f"{cls.queue}.dlq"


def test_quorum_queue_keeps_its_dead_letter_layout_with_a_ttl() -> None:
    args = arguments(define(message_ttl=60, max_length=5))
    assert args["x-queue-type"] == "quorum"
    assert args["x-message-ttl"] == 60000 and args["x-max-length"] == 5
    assert args["x-overflow"] == "reject-publish"
    assert args["x-dead-letter-strategy"] == "at-least-once"


def test_no_options_no_extra_arguments() -> None:
    args = arguments(define())
    assert not {"x-max-priority", "x-message-ttl", "x-max-length"} & args.keys()


@pytest.mark.parametrize(
    ("attrs", "match"),
    [
        ({"max_priority": 5}, "queue_type = 'classic'"),
        ({"queue_type": "classic", "max_priority": 0}, "max_priority"),
        ({"queue_type": "classic", "max_priority": 256}, "max_priority"),
        ({"message_ttl": 0}, "message_ttl"),
        ({"message_ttl": -1}, "message_ttl"),
        ({"message_ttl": float("nan")}, "message_ttl"),
        ({"max_length": 0}, "max_length"),
        ({"max_length": True}, "max_length"),
        ({"overflow": "drop-head"}, "quorum"),
        ({"queue_type": "classic", "overflow": "explode"}, "overflow"),
        ({"single_active_consumer": "yes"}, "single_active_consumer"),
        ({"arguments": {"max-length": 1}}, "start with 'x-'"),
        ({"arguments": {"x-message-ttl": 1}}, "use message_ttl"),
        ({"arguments": {"x-dead-letter-exchange": "elsewhere"}}, "dead-letter"),
        ({"arguments": ["x-a"]}, "dict"),
    ],
)
def test_bad_options_fail_at_class_definition(attrs: dict[str, Any], match: str) -> None:
    with pytest.raises(ConfigurationError, match=match):
        define(**attrs)
