"""Body codecs: what a handler's annotation accepts, and every bad body refused as DecodeError."""

from __future__ import annotations

import os
import pickle
import uuid
from typing import Any

import orjson
import pytest
from pydantic import BaseModel

from workerkit.errors import DecodeError, InvalidMessage, MessageTooLarge
from workerkit.message import (
    Header,
    Message,
    build_outgoing,
    decoder_for,
    encode_body,
    new_message_id,
)

LIMIT = 1024 * 1024


class Order(BaseModel):
    order_id: int
    email: str


def msg(body: bytes, content_type: str | None = "application/json", **kw: Any) -> Message:
    return Message(body, content_type=content_type, **kw)


# -- encoding -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "expected", "ctype"),
    [
        (Order(order_id=7, email="a@b.c"), {"order_id": 7, "email": "a@b.c"}, "application/json"),
        ({"a": [1, 2]}, {"a": [1, 2]}, "application/json"),
        ([1, "x", None], [1, "x", None], "application/json"),
    ],
)
def test_encode_json_values(body: object, expected: object, ctype: str) -> None:
    payload, content_type = encode_body(body)
    assert content_type == ctype
    assert orjson.loads(payload) == expected


def test_encode_str_and_bytes() -> None:
    assert encode_body("héllo") == ("héllo".encode(), "text/plain")
    assert encode_body(b"\x00\xff") == (b"\x00\xff", "application/octet-stream")
    assert encode_body(bytearray(b"ab")) == (b"ab", "application/octet-stream")


def test_encode_unserialisable_is_a_type_error_naming_the_type() -> None:
    with pytest.raises(InvalidMessage, match="object"):
        encode_body(object())


def test_build_outgoing_sets_properties() -> None:
    out = build_outgoing(
        "ex", "orders.placed", Order(order_id=1, email="x"), headers={"k": "v"},
        correlation_id="c1", max_body_size=LIMIT,
    )  # fmt: skip
    assert (out.exchange, out.routing_key, out.properties.content_type) == (
        "ex",
        "orders.placed",
        "application/json",
    )
    assert out.headers == {"k": "v"}
    assert out.properties.correlation_id == "c1"
    assert len(out.message_id) == 32
    assert (out.properties.timestamp or 0) > 1_600_000_000
    other = build_outgoing("ex", "k", {}, max_body_size=LIMIT)
    assert other.message_id != out.message_id


def test_build_outgoing_keeps_given_message_id() -> None:
    assert build_outgoing("ex", "k", "x", message_id="m-1", max_body_size=LIMIT).message_id == "m-1"


@pytest.mark.parametrize("name", ["workerkit-attempt", "WorkerKit-Reason", Header.ATTEMPT])
def test_build_outgoing_refuses_workerkit_headers(name: str) -> None:
    # Attempt counts must not be forgeable by publishers.
    with pytest.raises(ValueError, match="workerkit-"):
        build_outgoing("ex", "k", {}, headers={name: 99}, max_body_size=LIMIT)


def test_build_outgoing_refuses_oversize_body_without_sending() -> None:
    with pytest.raises(MessageTooLarge, match="1001 bytes"):
        build_outgoing("ex", "k", b"x" * 1001, max_body_size=1000)
    assert build_outgoing("ex", "k", b"x" * 1000, max_body_size=1000).body == b"x" * 1000


@pytest.mark.parametrize("key", ["", "k" * 256])
def test_build_outgoing_refuses_bad_routing_keys(key: str) -> None:
    with pytest.raises(ValueError, match="routing key"):
        build_outgoing("ex", key, {}, max_body_size=LIMIT)


# -- decoding: the happy paths ------------------------------------------------------------------


def test_model_round_trip() -> None:
    out = build_outgoing("ex", "k", Order(order_id=7, email="a@b.c"), max_body_size=LIMIT)
    decoded = decoder_for(Order, LIMIT)(msg(out.body, out.properties.content_type))
    assert decoded == Order(order_id=7, email="a@b.c")


def test_dict_list_and_generic_annotations() -> None:
    assert decoder_for(dict, LIMIT)(msg(b'{"a": 1}')) == {"a": 1}
    assert decoder_for(list, LIMIT)(msg(b"[1, 2]")) == [1, 2]
    assert decoder_for(list[int], LIMIT)(msg(b'[1, "2"]')) == [1, 2]
    assert decoder_for(Any, LIMIT)(msg(b"3")) == 3


def test_json_with_charset_parameter_is_json() -> None:
    assert decoder_for(dict, LIMIT)(msg(b"{}", "application/json; charset=utf-8")) == {}


JSON_TYPES = [
    "application/vnd.api+json",
    "application/problem+json",
    "text/json",
    "Application/JSON",
]


@pytest.mark.parametrize("ctype", JSON_TYPES)
def test_json_media_types_are_json(ctype: str) -> None:
    """RFC 6839's +json types and the older text/json were dead-lettered as "not JSON"."""
    assert decoder_for(dict, LIMIT)(msg(b'{"a": 1}', ctype)) == {"a": 1}


@pytest.mark.parametrize("ctype", ["application/x-python-pickle", "application/jsonx", "text/x"])
def test_other_media_types_are_not_json(ctype: str) -> None:
    with pytest.raises(DecodeError, match="is not JSON"):
        decoder_for(dict, LIMIT)(msg(b'{"a": 1}', ctype))


def test_missing_content_type_is_accepted_as_json() -> None:
    # Messages from other producers often carry no content type at all.
    assert decoder_for(dict, LIMIT)(msg(b'{"x": 1}', None)) == {"x": 1}


def test_str_and_bytes() -> None:
    assert decoder_for(str, LIMIT)(msg("héllo".encode(), "text/plain")) == "héllo"
    assert decoder_for(bytes, LIMIT)(msg(b"\x00\xff", "application/octet-stream")) == b"\x00\xff"


def test_message_annotation_gets_the_envelope() -> None:
    m = msg(b"whatever", "application/x-anything")
    assert decoder_for(Message, LIMIT)(m) is m


# -- decoding: refusals -------------------------------------------------------------------------

EXECUTED: list[str] = []


def _record(what: str) -> None:
    EXECUTED.append(what)


class _Exploit:
    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return (_record, ("pickle ran code",))


@pytest.mark.parametrize("annotation", [Order, dict, list, list[int], Any, str])
def test_pickle_content_type_is_refused_and_never_unpickled(annotation: Any) -> None:
    body = pickle.dumps(_Exploit())
    assert not EXECUTED
    with pytest.raises(DecodeError, match="x-python-pickle"):
        decoder_for(annotation, LIMIT)(msg(body, "application/x-python-pickle"))
    assert EXECUTED == []  # proof the payload was never deserialised


@pytest.mark.parametrize("annotation", [Order, dict, str])
def test_non_utf8_body_is_a_decode_error(annotation: Any) -> None:
    ctype = "text/plain" if annotation is str else "application/json"
    with pytest.raises(DecodeError):
        decoder_for(annotation, LIMIT)(msg(b'{"order_id": "\xff\xfe"}', ctype))


@pytest.mark.parametrize("annotation", [Order, dict, list, list[int]])
def test_truncated_json_is_a_decode_error(annotation: Any) -> None:
    with pytest.raises(DecodeError):
        decoder_for(annotation, LIMIT)(msg(b'{"order_id": 7, "email": "a@'))


class Anything(BaseModel):
    a: Any = None


@pytest.mark.parametrize("annotation", [Anything, dict, list, Any, list[Any]])
def test_deep_nesting_is_a_decode_error_not_recursion_error(annotation: Any) -> None:
    depth = 100_000
    inner = b"[" * depth + b"]" * depth
    body = b'{"a": ' + inner + b"}" if annotation in (Anything, dict) else inner
    with pytest.raises(DecodeError):
        decoder_for(annotation, 10 * LIMIT)(msg(body))


def test_schema_invalid_names_the_field_without_echoing_input() -> None:
    with pytest.raises(DecodeError) as info:
        decoder_for(Order, LIMIT)(msg(b'{"order_id": "seven", "email": "topsecret@x"}'))
    assert "order_id" in str(info.value)
    assert "topsecret" not in str(info.value)


def test_wrong_json_shape_is_a_decode_error() -> None:
    with pytest.raises(DecodeError, match="expected a JSON dict, got list"):
        decoder_for(dict, LIMIT)(msg(b"[1]"))
    with pytest.raises(DecodeError, match="expected a JSON list"):
        decoder_for(list, LIMIT)(msg(b"{}"))


@pytest.mark.parametrize("annotation", [Order, dict, str, bytes])
def test_oversize_body_is_refused_on_decode(annotation: Any) -> None:
    body = b'"' + b"x" * 2000 + b'"'
    with pytest.raises(DecodeError, match="above 1000"):
        decoder_for(annotation, 1000)(msg(body, "text/plain" if annotation is str else None))


def test_compressed_content_encoding_is_refused() -> None:
    with pytest.raises(DecodeError, match="gzip"):
        decoder_for(dict, LIMIT)(msg(b"{}", content_encoding="gzip"))


def test_text_decoder_refuses_binary_content_types() -> None:
    with pytest.raises(DecodeError, match="not text"):
        decoder_for(str, LIMIT)(msg(b"abc", "application/octet-stream"))


# -- the envelope -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("headers", "attempt"),
    [(None, 1), ({Header.ATTEMPT: 3}, 3), ({Header.ATTEMPT: 0}, 1), ({Header.ATTEMPT: "9"}, 1)],
)
def test_attempt_comes_from_the_workerkit_header_only(headers: Any, attempt: int) -> None:
    assert Message(b"", headers=headers).attempt == attempt


def test_broker_delivery_count_does_not_count_as_attempt() -> None:
    assert Message(b"", headers={"x-delivery-count": 7}).attempt == 1


def test_message_ids_are_random_version_4_uuids() -> None:
    ids = [new_message_id() for _ in range(2000)]
    assert len(set(ids)) == len(ids)
    for mid in ids:
        parsed = uuid.UUID(mid)
        assert (parsed.version, parsed.variant, parsed.hex) == (4, uuid.RFC_4122, mid)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork()")
def test_forked_children_do_not_repeat_their_parents_ids() -> None:
    """``random`` is reseeded in a child: without that, the child's first id would be the
    parent's next one."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.write(write, new_message_id().encode())
        os._exit(0)
    os.close(write)
    os.waitpid(pid, 0)
    child = os.read(read, 64).decode()
    os.close(read)
    assert len(child) == 32
    assert child != new_message_id()
