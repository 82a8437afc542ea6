"""The request/reply wire format (reply.py), without a broker."""

from __future__ import annotations

import pickle
from typing import Any, Optional

import pytest
from pydantic import BaseModel

from workerkit import DecodeError, InvalidMessage, Message, RemoteError, RequestTimeout
from workerkit.errors import PublishTimeout
from workerkit.reply import (
    DIRECT_REPLY_TO,
    REPLY_HEADER,
    decode_reply,
    encode_reply,
    error_reply,
    reply_mandatory,
    reply_to_request,
)


class Quote(BaseModel):
    sku: str
    price: int


REQUEST = Message(
    b"{}",
    message_id="req-1",
    correlation_id="corr-1",
    reply_to=DIRECT_REPLY_TO + ".abc",
)


def _delivered(out: Any) -> Message:
    """What the caller receives for an Outgoing reply."""
    return Message(
        out.body,
        properties=out.properties,
    )


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ({"a": [1, 2]}, {"a": [1, 2]}),
        ([1, "x"], [1, "x"]),
        ("text", "text"),
        (b"\x00raw", b"\x00raw"),
        (Quote(sku="A", price=1), {"sku": "A", "price": 1}),
        (None, None),
        (0, 0),
        ("", ""),
    ],
)
def test_values_round_trip(value: Any, expected: Any) -> None:
    out = reply_to_request(REQUEST, value)
    assert out.exchange == ""
    assert out.routing_key == REQUEST.reply_to
    assert out.properties.correlation_id == "corr-1"
    assert out.headers[REPLY_HEADER] == "ok"
    assert decode_reply(_delivered(out)) == expected


def test_reply_type_validates() -> None:
    out = reply_to_request(REQUEST, {"sku": "A", "price": "3"})
    assert decode_reply(_delivered(out), Quote) == Quote(sku="A", price=3)
    bad = reply_to_request(REQUEST, {"sku": "A"})
    with pytest.raises(DecodeError, match="price"):
        decode_reply(_delivered(bad), Quote)
    # An empty reply (the handler returned None) is None only for a type that admits it: a
    # caller typed as getting a Quote gets one or a typed error.
    empty = _delivered(reply_to_request(REQUEST, None))
    with pytest.raises(DecodeError, match=r"empty reply .* Quote was asked for"):
        decode_reply(empty, Quote)
    with pytest.raises(DecodeError, match="empty reply"):
        decode_reply(empty, int)
    assert decode_reply(empty, Quote | None) is None
    assert decode_reply(empty, Optional[Quote]) is None  # noqa: UP045 (the older spelling)
    assert decode_reply(empty, Any) is None
    assert decode_reply(empty) is None
    assert decode_reply(empty, Message) is empty


def test_error_replies_raise_remote_error() -> None:
    out = error_reply(REQUEST, "app.Boom", "it broke", "exhausted")
    assert out.body == b""
    with pytest.raises(RemoteError) as info:
        decode_reply(_delivered(out))
    err = info.value
    assert (err.type, err.message, err.request_id, err.reason) == (
        "app.Boom",
        "it broke",
        "req-1",
        "exhausted",
    )
    assert "app.Boom: it broke" in str(err)
    copy = pickle.loads(pickle.dumps(err))  # crosses process boundaries intact
    assert (copy.type, copy.request_id, copy.reason) == ("app.Boom", "req-1", "exhausted")


def test_a_foreign_status_is_a_decode_error() -> None:
    with pytest.raises(DecodeError):
        decode_reply(Message(b"x", headers={REPLY_HEADER: "maybe"}))


def test_unencodable_values_are_invalid_messages() -> None:
    with pytest.raises(InvalidMessage):
        encode_reply(object())


def test_direct_reply_to_is_never_mandatory() -> None:
    assert not reply_mandatory(DIRECT_REPLY_TO + ".g1h2")
    assert reply_mandatory("my-reply-queue")


def test_request_timeout_is_a_publish_timeout() -> None:
    assert issubclass(RequestTimeout, PublishTimeout)
