"""Request/reply, worker side, against the real broker over direct reply-to.

The caller is written here with raw pika (a blocking connection owned by one thread), so that
these tests check the worker against the broker's direct reply-to, not against workerkit's own
caller.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import orjson
import pika
import pytest
from pydantic import BaseModel

from workerkit import (
    Message,
    Reject,
    RemoteError,
    RetryPolicy,
    Runner,
    Settings,
    Worker,
)
from workerkit.reply import DIRECT_REPLY_TO, decode_reply
from workerkit.testing import running, wait_for

from .workers_fixture import get_all, ready_count

pytestmark = pytest.mark.integration

MIB = 1024 * 1024


class Quote(BaseModel):
    sku: str
    price: int


class DirectCaller:
    """A minimal direct reply-to caller: one blocking connection, used from one thread."""

    def __init__(self, url: str, exchange: str) -> None:
        self.pool = concurrent.futures.ThreadPoolExecutor(max_workers=1)
        self.url = url
        self.exchange = exchange
        self.replies: dict[str, Message] = {}
        self.pool.submit(self._open).result()

    def _open(self) -> None:
        self.conn = pika.BlockingConnection(pika.URLParameters(self.url))
        self.ch = self.conn.channel()
        self.ch.basic_consume(DIRECT_REPLY_TO, self._on_reply, auto_ack=True)

    def _on_reply(self, _ch: Any, _method: Any, props: Any, body: bytes) -> None:
        self.replies[props.correlation_id] = Message(
            body,
            headers=props.headers or {},
            content_type=props.content_type,
            correlation_id=props.correlation_id,
        )

    def _call(
        self,
        routing_key: str,
        body: bytes,
        content_type: str | None,
        timeout: float,
        with_id: bool = True,
    ) -> tuple[Message | None, float, str]:
        corr, message_id = uuid.uuid4().hex, uuid.uuid4().hex if with_id else None
        started = time.monotonic()
        self.ch.basic_publish(
            self.exchange,
            routing_key,
            body,
            pika.BasicProperties(
                reply_to=DIRECT_REPLY_TO,
                correlation_id=corr,
                message_id=message_id,
                content_type=content_type,
            ),
        )
        while corr not in self.replies and time.monotonic() - started < timeout:
            self.conn.process_data_events(time_limit=0.05)
        return self.replies.pop(corr, None), time.monotonic() - started, message_id or ""

    async def call(
        self,
        routing_key: str,
        body: bytes,
        *,
        content_type: str | None = "application/json",
        timeout: float = 15.0,
        with_id: bool = True,
    ) -> tuple[Message | None, float, str]:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(
            self.pool, self._call, routing_key, body, content_type, timeout, with_id
        )

    def close(self) -> None:
        self.pool.submit(self.conn.close).result()
        self.pool.shutdown()


@pytest.fixture
def caller(settings: Settings) -> Iterator[DirectCaller]:
    c = DirectCaller(settings.url.get_secret_value(), settings.exchange)
    yield c
    c.close()


def _runner(settings: Settings, *workers: type[Worker]) -> Runner:
    return Runner(list(workers), settings=settings, handle_signals=False)


async def test_return_values_answer_requests(
    settings: Settings,
    unique: Callable[[str], str],
    cleanup: list[str],
    caller: DirectCaller,
) -> None:
    q = unique("pricing")
    cleanup.append(q)
    handled: list[str] = []

    class Pricing(Worker):
        queue = q

        async def handle(self, body: dict[str, Any]) -> Any:
            handled.append(body["kind"])
            kind = body["kind"]
            if kind == "model":
                return Quote(sku=body["sku"], price=42)
            if kind == "none":
                return None
            if kind == "text":
                return "plain text"
            if kind == "bytes":
                return b"\x00\xff"
            if kind == "set":
                return {1, 2}  # cannot be encoded: the caller hears why
            if kind == "big":
                return "x" * (2 * MIB)  # above the worker's max_body_size: the caller hears why
            return {"sku": body["sku"], "list": [1, 2]}

    small = settings.model_copy(update={"max_body_size": MIB})
    async with running(_runner(small, Pricing)):
        reply, _, _ = await caller.call(q, orjson.dumps({"kind": "model", "sku": "A1"}))
        assert reply is not None
        assert decode_reply(reply, Quote) == Quote(sku="A1", price=42)
        assert decode_reply(reply) == {"sku": "A1", "price": 42}

        reply, _, _ = await caller.call(q, orjson.dumps({"kind": "none", "sku": "A1"}))
        assert reply is not None and reply.body == b""
        assert decode_reply(reply) is None

        reply, _, _ = await caller.call(q, orjson.dumps({"kind": "dict", "sku": "B2"}))
        assert reply is not None and decode_reply(reply) == {"sku": "B2", "list": [1, 2]}

        reply, _, _ = await caller.call(q, orjson.dumps({"kind": "text", "sku": "B2"}))
        assert reply is not None and decode_reply(reply) == "plain text"

        reply, _, _ = await caller.call(q, orjson.dumps({"kind": "bytes", "sku": "B2"}))
        assert reply is not None and decode_reply(reply) == b"\x00\xff"

        reply, _, _ = await caller.call(q, orjson.dumps({"kind": "set", "sku": "B2"}))
        assert reply is not None
        with pytest.raises(RemoteError, match="cannot encode") as raised:
            decode_reply(reply)
        assert raised.value.reason == "invalid-reply"

        # Too large to send: an error reply at once, not a wait until the caller's timeout (on
        # RabbitMQ 4.x a body above 16 MiB closed the publish channel and the replies on it).
        reply, _, _ = await caller.call(q, orjson.dumps({"kind": "big", "sku": "B2"}))
        assert reply is not None and not reply.body
        with pytest.raises(RemoteError, match="above max_body_size=1048576") as raised:
            decode_reply(reply)
        assert raised.value.reason == "invalid-reply"
        assert raised.value.type == "workerkit.errors.MessageTooLarge"
        reply, _, _ = await caller.call(q, orjson.dumps({"kind": "dict", "sku": "C3"}))
        assert reply is not None and decode_reply(reply) == {"sku": "C3", "list": [1, 2]}
    assert handled == ["model", "none", "dict", "text", "bytes", "set", "big", "dict"]
    # Requests were acked like any message: nothing left behind.
    assert await asyncio.to_thread(ready_count, settings.url.get_secret_value(), q) == 0


async def test_def_handler_answers_too(
    settings: Settings, unique: Callable[[str], str], cleanup: list[str], caller: DirectCaller
) -> None:
    q = unique("syncprice")
    cleanup.append(q)

    class SyncPricing(Worker):
        queue = q

        def handle(self, body: dict[str, Any]) -> dict[str, Any]:
            return {"double": body["n"] * 2}

    async with running(_runner(settings, SyncPricing)):
        reply, _, _ = await caller.call(q, orjson.dumps({"n": 21}))
    assert reply is not None and decode_reply(reply) == {"double": 42}


async def test_failures_answer_with_remote_errors_well_before_the_timeout(
    settings: Settings, unique: Callable[[str], str], cleanup: list[str], caller: DirectCaller
) -> None:
    q = unique("failing")
    cleanup.append(q)
    attempts: list[int] = []

    class Failing(Worker):
        queue = q
        retry = RetryPolicy(max_attempts=2, delay=0.2, jitter=0.0)

        async def handle(self, body: Quote, message: Message) -> None:
            attempts.append(message.attempt)
            if body.sku == "reject":
                raise Reject("no such sku")
            raise ConnectionError("pricing backend down")

    url = settings.url.get_secret_value()
    async with running(_runner(settings, Failing)):
        # Exhausted: two attempts, then an error reply (the caller's timeout is 15 s).
        reply, elapsed, request_id = await caller.call(
            q, orjson.dumps({"sku": "exhaust", "price": 1})
        )
        assert reply is not None, "no error reply for an exhausted request"
        assert elapsed < 5.0
        with pytest.raises(RemoteError) as info:
            decode_reply(reply)
        err = info.value
        assert err.type == "builtins.ConnectionError"
        assert err.message == "pricing backend down"
        assert err.request_id == request_id
        assert err.reason == "exhausted"
        assert attempts == [1, 2]

        # Rejected: at once, one attempt.
        reply, elapsed, request_id = await caller.call(
            q, orjson.dumps({"sku": "reject", "price": 1})
        )
        assert reply is not None and elapsed < 5.0
        with pytest.raises(RemoteError) as info:
            decode_reply(reply)
        assert info.value.type == "workerkit.errors.Reject"
        assert info.value.message == "no such sku"
        assert info.value.reason == "rejected"
        assert info.value.request_id == request_id

        # Invalid body: never reaches the handler.
        reply, elapsed, request_id = await caller.call(q, orjson.dumps({"sku": "x"}))
        assert reply is not None and elapsed < 5.0
        with pytest.raises(RemoteError) as info:
            decode_reply(reply)
        assert info.value.type == "workerkit.errors.DecodeError"
        assert "price" in info.value.message
        assert info.value.reason == "invalid"
        assert attempts == [1, 2, 1]

    # The DLQ has its copy of each (confirmed before the error reply was sent).
    dead = await asyncio.to_thread(get_all, url, f"{q}.dlq")
    reasons = sorted(str(d.headers["workerkit-reason"]) for d in dead)
    assert reasons == ["exhausted", "invalid", "rejected"]
    # The DLQ copies keep reply_to/correlation_id: a replayed request still answers its caller.
    assert all(d.properties.reply_to for d in dead)


async def test_a_retried_request_is_answered_by_a_later_attempt(
    settings: Settings, unique: Callable[[str], str], cleanup: list[str], caller: DirectCaller
) -> None:
    q = unique("retried")
    cleanup.append(q)
    attempts: list[int] = []

    class Flaky(Worker):
        queue = q
        retry = RetryPolicy(max_attempts=4, delay=0.2, jitter=0.0)

        async def handle(self, body: dict[str, Any], message: Message) -> dict[str, int]:
            attempts.append(message.attempt)
            if message.attempt < 3:
                raise TimeoutError("flaky")
            return {"answered_by": message.attempt}

    async with running(_runner(settings, Flaky)) as _:
        reply, _, _ = await caller.call(q, orjson.dumps({"sku": "A"}))
        # One reply only: nothing was sent for the failed attempts.
        assert reply is not None and decode_reply(reply) == {"answered_by": 3}
        assert not caller.replies
    assert attempts == [1, 2, 3]


async def test_messages_without_reply_to_send_nothing_and_a_gone_caller_is_counted(
    settings: Settings, unique: Callable[[str], str], cleanup: list[str]
) -> None:
    q = unique("noreply")
    cleanup.append(q)
    url = settings.url.get_secret_value()
    done: list[int] = []

    class Plain(Worker):
        queue = q

        async def handle(self, body: dict[str, Any]) -> dict[str, int]:
            done.append(body["n"])
            return {"ignored": body["n"]}

    runner = _runner(settings, Plain)
    async with running(runner):
        conn = await asyncio.to_thread(pika.BlockingConnection, pika.URLParameters(url))
        ch = conn.channel()
        ch.basic_publish(settings.exchange, q, orjson.dumps({"n": 1}))
        # A request whose caller is gone (its channel closed) and one to a missing reply queue.
        gone = pika.BlockingConnection(pika.URLParameters(url))
        gch = gone.channel()
        gch.basic_consume(DIRECT_REPLY_TO, lambda *a: None, auto_ack=True)
        gch.basic_publish(
            settings.exchange,
            q,
            orjson.dumps({"n": 2}),
            pika.BasicProperties(reply_to=DIRECT_REPLY_TO, correlation_id="c"),
        )
        gone.close()
        ch.basic_publish(
            settings.exchange,
            q,
            orjson.dumps({"n": 3}),
            pika.BasicProperties(reply_to=f"{q}.missing-reply-queue", correlation_id="c"),
        )
        conn.close()
        rt = runner.runtimes[0]
        await wait_for(lambda: rt.processed == 3, what="three acks")
    assert sorted(done) == [1, 2, 3]
    # The plain message sent nothing; the reply to the missing queue was refused and counted;
    # the broker drops a direct reply-to reply to a gone caller without telling anyone.
    assert rt.replies_failed == 1
    assert rt.replies_sent == 1
    assert rt.retried == 0 and rt.dead_lettered == 0
    assert await asyncio.to_thread(ready_count, url, q) == 0


async def test_a_request_without_a_message_id_is_named_as_its_dead_letter_is_listed(
    settings: Settings, unique: Callable[[str], str], cleanup: list[str], caller: DirectCaller
) -> None:
    """Another client's request with no message id: the error reply's request id is the
    ``h-<hash>`` id `workerkit dlq list` shows for its dead letter (it was empty)."""
    from workerkit import dlq

    q = unique("noid")
    cleanup.extend([q, f"{q}.dlq"])

    class Strict(Worker):
        queue = q
        retry = RetryPolicy(max_attempts=2, delay=0.05, jitter=0.0)

        async def handle(self, body: dict[str, Any]) -> None:
            if body["kind"] == "reject":
                raise Reject("unknown sku")
            raise ConnectionError("backend down")  # exhausted after 2 attempts

    ids = []
    async with running(_runner(settings, Strict)):
        for kind in ("reject", "exhausted"):
            reply, _, sent_id = await caller.call(q, orjson.dumps({"kind": kind}), with_id=False)
            assert reply is not None and sent_id == ""
            with pytest.raises(RemoteError) as raised:
                decode_reply(reply)
            assert raised.value.request_id.startswith("h-"), raised.value
            ids.append(raised.value.request_id)
    listed = await dlq.list_dead(q, settings=settings)
    assert [d.id for d in listed] == ids
    assert [d.reason for d in listed] == ["rejected", "exhausted"]
