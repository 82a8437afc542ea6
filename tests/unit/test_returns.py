"""basic.return is matched to the publish it belongs to, by publish sequence (issue 9, item 11).

Frames are fed to the channel's handlers directly, in the order the broker sends them, so the
interleavings that are rare on a live broker are exact here."""

from __future__ import annotations

import functools
from types import SimpleNamespace
from typing import Any

import pika.exceptions as px
from pika.spec import Basic, BasicProperties

from workerkit.errors import ConnectionFailed, PublishNacked, Unroutable
from workerkit.message import Outgoing, Properties
from workerkit.transport.pika_asyncio import PikaChannel, _Pending


def channel_with(*messages: Outgoing) -> tuple[PikaChannel, dict[int, Any]]:
    channel = PikaChannel.__new__(PikaChannel)
    PikaChannel.__init__(channel, SimpleNamespace(blocked=False))  # type: ignore[arg-type]
    outcomes: dict[int, Any] = {}
    for seq, message in enumerate(messages, start=1):
        channel._seq = seq
        channel._unconfirmed[seq] = _Pending(
            functools.partial(outcomes.__setitem__, seq), message, 1e18, 10.0
        )
    return channel, outcomes


def out(routing_key: str, message_id: str) -> Outgoing:
    return Outgoing("ex", routing_key, b"", Properties(message_id=message_id))


def returned(routing_key: str, message_id: str) -> tuple[Any, ...]:
    method = Basic.Return(312, "NO_ROUTE", "ex", routing_key)
    return (None, method, BasicProperties(message_id=message_id), b"")


def ack(tag: int, multiple: bool = False) -> Any:
    return SimpleNamespace(method=Basic.Ack(delivery_tag=tag, multiple=multiple))


def test_one_id_in_flight_twice_is_reported_per_publish() -> None:
    # 1 is routable (its quorum queue confirms late), 2 has the same id and is returned.
    channel, outcomes = channel_with(out("bound", "same"), out("nobody", "same"))
    channel._on_return(*returned("nobody", "same"))
    channel._on_confirm(ack(2, multiple=True))  # 1 and 2 confirmed in one frame
    assert outcomes[1] is None
    assert isinstance(outcomes[2], Unroutable)


def test_a_multiple_ack_reports_only_the_returned_publish() -> None:
    channel, outcomes = channel_with(out("k", "a"), out("k", "a"), out("k", "a"))
    channel._on_return(*returned("k", "a"))  # the broker returns the first of the three
    channel._on_confirm(ack(3, multiple=True))
    assert isinstance(outcomes[1], Unroutable)
    assert outcomes[2] is None and outcomes[3] is None


def test_a_stale_return_is_never_pinned_on_a_later_publish() -> None:
    channel, outcomes = channel_with(out("k", "x"))
    channel._unconfirmed.pop(1)  # it timed out: the caller already got PublishTimeout
    channel._on_return(*returned("k", "x"))  # its return arrives late
    channel._on_confirm(ack(1))
    channel._seq = 2
    channel._unconfirmed[2] = _Pending(
        lambda error: outcomes.__setitem__(2, error), out("k", "x"), 1e18, 10.0
    )
    channel._on_confirm(ack(2))
    assert outcomes == {2: None}


def nack(tag: int) -> Any:
    return SimpleNamespace(method=Basic.Nack(delivery_tag=tag, multiple=False))


class _Raw:
    is_open = True
    closed = 0
    connection = SimpleNamespace()  # no fast-path reader on it
    channel_number = 1

    def close(self) -> None:
        self.closed += 1


def test_a_nack_before_earlier_acks_fails_only_the_nacked_publish() -> None:
    """A classic queue acks a persisted publish after its fsync but nacks a full queue's at
    once: the nack of 3 overtakes the acks of 1 and 2, which must still count as confirmed."""
    channel, outcomes = channel_with(out("k", "a"), out("k", "b"), out("k", "c"))
    raw = channel._raw = _Raw()
    channel._on_confirm(nack(3))
    assert isinstance(outcomes[3], PublishNacked)
    assert 1 not in outcomes and 2 not in outcomes
    assert not channel.is_open and raw.closed == 0  # retired: no new publish, not yet closed
    late: list[Any] = []
    channel.publish_nowait(out("k", "d"), mandatory=True, timeout=1.0, on_done=late.append)
    assert isinstance(late[0], ConnectionFailed)  # refused locally: callers open a new channel
    channel._on_confirm(ack(1))
    assert raw.closed == 0
    channel._on_confirm(ack(2))
    assert outcomes[1] is None and outcomes[2] is None
    assert raw.closed == 1  # closed once everything sent before the nack was answered


def test_a_retired_channel_closing_ends_its_consumers() -> None:
    """The transport closes a retired channel itself, so its owner never called close(): a
    consumer on it (a publisher's direct reply-to consumer) must hear that it ended, or the
    requests waiting for replies there would wait for their timeout."""
    channel, outcomes = channel_with(out("k", "a"))
    raw = channel._raw = _Raw()
    ended: list[str] = []
    channel._cancel_callbacks["reply"] = lambda: ended.append("reply")
    channel._on_confirm(nack(1))
    assert isinstance(outcomes[1], PublishNacked) and raw.closed == 1
    assert ended == []  # not before the broker's close-ok
    channel._on_close(raw, px.ChannelClosedByClient(200, "Normal shutdown"))
    assert ended == ["reply"]


def test_an_owner_closing_its_channel_ends_no_consumer_callbacks() -> None:
    channel, _outcomes = channel_with()
    channel._raw = _Raw()
    ended: list[str] = []
    channel._cancel_callbacks["c"] = lambda: ended.append("c")
    channel._on_close(channel._raw, px.ChannelClosedByClient(200, "Normal shutdown"))
    assert ended == []  # the owner closed it: it knows
