"""Property-based round trips through the real broker (issue 9).

For each generated message: either a typed error before the network (InvalidMessage, at once,
the publisher's connection untouched) or a delivery that carries exactly what was published.
Never a reconnect, never a hang. A bounded number of examples keeps this well under a minute.
"""

from __future__ import annotations

import calendar
import time
from collections.abc import Iterator
from datetime import datetime, timezone
from decimal import Decimal
from typing import Any

import hypothesis.strategies as st
import pika
import pytest
from hypothesis import HealthCheck, given, settings

from workerkit import InvalidMessage, Publisher, Settings

pytestmark = pytest.mark.integration

# A bounded number of examples: each is a real publish, confirm and basic.get.
BROKER_EXAMPLES = 40
FAST = settings(
    max_examples=BROKER_EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**64), max_value=2**64),
    st.text(max_size=30),
    st.text(alphabet=st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF), max_size=1),
    st.binary(max_size=30),
    st.floats(width=32),
    st.decimals(min_value=-(10**6), max_value=10**6, places=3, allow_nan=False),
    st.datetimes(min_value=datetime(1960, 1, 1), max_value=datetime(2100, 1, 1)),
)
values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=6,
)
headers = st.dictionaries(
    st.text(max_size=40).filter(lambda k: not k.lower().startswith(("workerkit-", "x-"))),
    values,
    max_size=4,
)
ids = st.one_of(st.none(), st.text(max_size=20), st.text(alphabet="é", min_size=127, max_size=129))
bodies = st.one_of(st.binary(max_size=2000), st.text(max_size=200))


class Channel:
    """A blocking pika channel for reading what arrived."""

    def __init__(self, url: str) -> None:
        self.conn = pika.BlockingConnection(pika.URLParameters(url))
        self.ch = self.conn.channel()

    def get(self, queue: str) -> tuple[Any, bytes]:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            method, props, body = self.ch.basic_get(queue, auto_ack=True)
            if method is not None:
                return props, body
            time.sleep(0.01)  # a confirmed message is in the queue; this only polls for it
        raise AssertionError("a confirmed message never arrived")


@pytest.fixture(scope="module")
def broker(broker_url: str) -> Iterator[tuple[Settings, Publisher, Channel, str]]:
    import uuid

    settings = Settings(url=broker_url, exchange="wkt", publish_timeout=5.0)
    queue = f"t.roundtrip.{uuid.uuid4().hex[:8]}"
    reader = Channel(broker_url)
    reader.ch.exchange_declare(settings.exchange, "topic", durable=True)
    reader.ch.queue_declare(queue, durable=True, arguments={"x-queue-type": "quorum"})
    reader.ch.queue_bind(queue, settings.exchange, queue)
    publisher = Publisher(settings=settings)
    try:
        yield settings, publisher, reader, queue
    finally:
        publisher.close()
        reader.ch.queue_delete(queue)
        reader.conn.close()


def expected(value: Any) -> Any:
    """What the broker hands back for a value that was accepted."""
    if isinstance(value, datetime):  # whole seconds, UTC (naive means UTC)
        return datetime.fromtimestamp(calendar.timegm(value.utctimetuple()), timezone.utc)
    if isinstance(value, list):
        return [expected(v) for v in value]
    if isinstance(value, dict):
        return {k: expected(v) for k, v in value.items()}
    return value


@FAST
@given(headers=headers, message_id=ids, correlation_id=ids, reply_to=ids, body=bodies)
def test_a_message_is_refused_before_the_network_or_arrives_intact(
    broker: tuple[Settings, Publisher, Channel, str],
    headers: dict[str, Any],
    message_id: str | None,
    correlation_id: str | None,
    reply_to: str | None,
    body: bytes | str,
) -> None:
    _settings, publisher, reader, queue = broker
    publisher.publish(queue, b"warm-up")  # connected, so the identity check below means something
    reader.get(queue)
    core = publisher._core
    assert core is not None
    connection = core._connection
    started = time.monotonic()
    try:
        sent_id = publisher.publish(
            queue,
            body,
            headers=headers,
            message_id=message_id,
            correlation_id=correlation_id,
            reply_to=reply_to,
        )
    except InvalidMessage:
        assert time.monotonic() - started < 1.0  # refused at once, nothing was sent
        assert core._connection is connection and connection is not None and connection.is_open
        return
    props, got = reader.get(queue)
    assert core._connection is connection  # never a reconnect
    assert got == (body.encode() if isinstance(body, str) else body)
    assert props.message_id == sent_id == (message_id or sent_id)
    assert props.correlation_id == correlation_id
    assert props.reply_to == reply_to
    delivered = {k: v for k, v in (props.headers or {}).items() if k != "x-delivery-count"}
    assert delivered == expected(headers)
    assert all(
        type(delivered[k]) is type(expected(v))
        for k, v in headers.items()
        if not isinstance(v, Decimal)
    )


names = st.text(
    alphabet=st.characters(categories=["L", "N"], include_characters="._-"),
    min_size=1,
    max_size=130,
)


@settings(
    max_examples=10, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(name=names)
def test_routing_keys_in_bytes_are_refused_or_routed(
    broker: tuple[Settings, Publisher, Channel, str], name: str
) -> None:
    settings, publisher, reader, _queue = broker
    key = f"t.rk.{name}"
    if len(key.encode()) > 255:
        with pytest.raises(InvalidMessage, match="routing key"):
            publisher.publish(key, b"x")
        return
    queue = reader.ch.queue_declare("", exclusive=True).method.queue
    reader.ch.queue_bind(queue, settings.exchange, key)
    try:
        publisher.publish(key, b"x", delay=None)
        _props, body = reader.get(queue)
        assert body == b"x"
    finally:
        reader.ch.queue_delete(queue)
