"""The fast consume path reads exactly what pika's own decoder reads.

Streams of frames built with pika's marshalling (deliveries with random properties, headers and
bodies split over several body frames, deliveries to consumers the reader does not know, other
methods, heartbeats) are cut at random points and fed to :class:`FrameReader`; every delivery it
takes must equal the Message built from pika's decoding, and every other frame must reach pika
whole and in order.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from datetime import datetime
from decimal import Decimal
from typing import Any

import pika.frame
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pika import spec
from pika.channel import ContentFrameAssembler
from pika.compat import long
from pika.exceptions import BodyTooLongError, InvalidFrameError

from workerkit.message import Message
from workerkit.transport import _fastframes
from workerkit.transport._fastframes import FrameReader, ack_frame
from workerkit.transport.pika_asyncio import _message

FAST_TAGS = ("ctag1.fast", "ctag1.other-fast")
SLOTS = Message.__slots__


def fields(message: Message) -> tuple[Any, ...]:
    return tuple(typed(getattr(message, name)) for name in SLOTS)


def typed(value: Any) -> Any:
    """``value`` with the type of everything in it: equal only when the types are too (pika
    decodes a 64-bit integer as its ``long``, which it re-encodes as such; ``True == 1``)."""
    if isinstance(value, dict):
        return dict, [(typed(k), typed(v)) for k, v in value.items()]
    if isinstance(value, list):
        return list, [typed(v) for v in value]
    return type(value), value


# -- generated frames --------------------------------------------------------------------------

short_text = st.text(max_size=20)
short_value = st.one_of(
    short_text.filter(lambda s: len(s.encode()) <= 255),
    st.binary(max_size=20),  # not always UTF-8: pika then keeps bytes
)
header_leaf = st.one_of(
    st.text(max_size=10),
    st.binary(max_size=10),
    st.booleans(),
    st.integers(-(2**63), 2**63 - 1),
    st.integers(-(2**63), 2**63 - 1).map(long),  # pika writes its long as a 64-bit integer
    st.decimals(allow_nan=False, allow_infinity=False, places=2, min_value=-1000, max_value=1000),
    st.datetimes(min_value=datetime(1970, 1, 2), max_value=datetime(2100, 1, 1)).map(
        lambda d: d.replace(microsecond=0)
    ),
    st.none(),
)
header_value = st.recursive(
    header_leaf,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=5), inner, max_size=3)
    ),
    max_leaves=6,
)
header_key = st.one_of(st.text(max_size=8), st.binary(max_size=8))  # bytes: not always UTF-8
headers = st.dictionaries(header_key, header_value, max_size=4)


@st.composite
def properties(draw: st.DrawFn) -> spec.BasicProperties:
    def maybe(strategy: st.SearchStrategy[Any]) -> Any:
        return draw(st.one_of(st.none(), strategy))

    return spec.BasicProperties(
        content_type=maybe(short_value),
        content_encoding=maybe(short_value),
        headers=maybe(headers),
        delivery_mode=maybe(st.sampled_from([1, 2])),
        priority=maybe(st.integers(0, 9)),
        correlation_id=maybe(short_value),
        reply_to=maybe(short_value),
        expiration=maybe(st.integers(0, 10**6).map(str)),
        message_id=maybe(short_value),
        timestamp=maybe(st.integers(0, 2**63 - 1)),
        type=maybe(short_value),
        user_id=maybe(short_value),
        app_id=maybe(short_value),
        cluster_id=maybe(short_value),
    )


@st.composite
def delivery(draw: st.DrawFn) -> list[bytes]:
    channel = draw(st.sampled_from([1, 2]))
    tag = draw(st.sampled_from([*FAST_TAGS, "ctag1.pika"]))
    method = spec.Basic.Deliver(
        consumer_tag=tag,
        delivery_tag=draw(st.integers(1, 2**64 - 1)),
        redelivered=draw(st.booleans()),
        exchange=draw(short_value),
        routing_key=draw(short_value),
    )
    body = draw(st.binary(max_size=200))
    step = draw(st.integers(1, 64))  # a small frame_max: bodies over several body frames
    frames = [
        pika.frame.Method(channel, method).marshal(),
        pika.frame.Header(channel, len(body), draw(properties())).marshal(),
    ]
    frames += [
        pika.frame.Body(channel, body[i : i + step]).marshal() for i in range(0, len(body), step)
    ]
    return frames


other_frame = st.sampled_from(
    [
        pika.frame.Heartbeat().marshal(),
        pika.frame.Method(1, spec.Basic.Cancel(consumer_tag="ctag1.fast")).marshal(),
        pika.frame.Method(2, spec.Basic.QosOk()).marshal(),
        pika.frame.Method(1, spec.Basic.CancelOk(consumer_tag="x")).marshal(),
        pika.frame.Method(3, spec.Basic.Ack(delivery_tag=7, multiple=True)).marshal(),
        pika.frame.Method(2, spec.Channel.Close(406, "PRECONDITION_FAILED", 0, 0)).marshal(),
    ]
)
stream_items = st.lists(st.one_of(delivery(), other_frame.map(lambda f: [f])), max_size=12)


def pika_reading(items: list[list[bytes]]) -> list[tuple[Any, ...]]:
    """What the reader must report, item by item, worked out with pika's own decoder."""
    expected: list[tuple[Any, ...]] = []
    for frames in items:
        first = pika.frame.decode_frame(frames[0])[1]
        method = getattr(first, "method", None)
        if isinstance(method, spec.Basic.Deliver) and method.consumer_tag in FAST_TAGS:
            assembler = ContentFrameAssembler()
            for raw in frames:
                done = assembler.process(pika.frame.decode_frame(raw)[1])
            assert done
            method_frame, header, body = done
            message = _message(method_frame.method, header.properties, body)
            expected.append(("message", first.channel_number, fields(message)))
        else:
            expected += [("pika", raw) for raw in frames]
    return expected


def reader_with_log() -> tuple[FrameReader, list[tuple[Any, ...]]]:
    log: list[tuple[Any, ...]] = []
    reader = FrameReader(lambda raw: log.append(("pika", raw)))

    def logging_on(channel: int) -> Callable[[Message], None]:
        return lambda m: log.append(("message", channel, fields(m)))

    for channel in (1, 2):
        for tag in FAST_TAGS:
            reader.register(channel, tag, logging_on(channel))
    return reader, log


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(items=stream_items, data=st.data())
def test_reader_matches_pikas_decoder_at_any_split(
    items: list[list[bytes]], data: st.DataObject
) -> None:
    stream = b"".join(raw for frames in items for raw in frames)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=8)))
    reader, log = reader_with_log()
    consumed = 0
    for start, end in zip([0, *cuts], [*cuts, len(stream)], strict=True):
        consumed += reader.feed(stream[start:end])
    assert log == pika_reading(items)
    assert consumed == len(stream)  # what the connection adds to bytes_received
    assert not reader.pending


def test_zero_length_body_is_delivered_at_its_header() -> None:
    reader, log = reader_with_log()
    frames = [
        pika.frame.Method(1, spec.Basic.Deliver("ctag1.fast", 5, True, "ex", "rk")).marshal(),
        pika.frame.Header(1, 0, spec.BasicProperties(content_type="a/b")).marshal(),
    ]
    reader.feed(b"".join(frames))
    assert log == pika_reading([frames])
    assert log[0][2][SLOTS.index("body")] == (bytes, b"")
    assert log[0][2][SLOTS.index("redelivered")] == (bool, True)


def test_a_body_as_large_as_rabbitmqs_frame_max_in_one_frame_and_in_many() -> None:
    body = bytes(range(256)) * 2048  # 512 KiB: four 128 KiB body frames, as frame_max cuts it
    step = 131072 - 8
    frames = [
        pika.frame.Method(1, spec.Basic.Deliver("ctag1.fast", 1, False, "", "q")).marshal(),
        pika.frame.Header(1, len(body), spec.BasicProperties()).marshal(),
        *(pika.frame.Body(1, body[i : i + step]).marshal() for i in range(0, len(body), step)),
    ]
    reader, log = reader_with_log()
    stream = b"".join(frames)
    for i in range(0, len(stream), 4096):  # pika's old read size: many partial frames
        reader.feed(stream[i : i + 4096])
    assert log == pika_reading([frames])


def test_every_amqp_field_type_in_headers_decodes_like_pika() -> None:
    # Types pika never writes but a broker or another client may: b B U u i L f s T.
    def field(name: bytes, kind: bytes, packed: bytes) -> bytes:
        return bytes((len(name),)) + name + kind + packed

    table = b"".join(
        [
            field(b"b", b"b", struct.pack(">b", -5)),
            field(b"B", b"B", struct.pack(">B", 250)),
            field(b"U", b"U", struct.pack(">h", -300)),
            field(b"u", b"u", struct.pack(">H", 60000)),
            field(b"I", b"I", struct.pack(">i", -70000)),
            field(b"i", b"i", struct.pack(">I", 4000000000)),
            field(b"L", b"L", struct.pack(">Q", 2**63)),
            field(b"l", b"l", struct.pack(">q", -(2**40))),
            field(b"f", b"f", struct.pack(">f", 1.5)),
            field(b"d", b"d", struct.pack(">d", -2.25)),
            field(b"D", b"D", struct.pack(">Bi", 2, 12345)),
            field(b"s", b"s", struct.pack(">h", -3)),  # a short int to RabbitMQ and pika
            field(b"S", b"S", struct.pack(">I", 2) + "é".encode()),
            field(b"x", b"x", struct.pack(">I", 2) + b"\xff\x00"),
            field(b"t", b"t", b"\x01"),
            field(b"T", b"T", struct.pack(">Q", 1700000000)),
            field(b"V", b"V", b""),
            field(b"A", b"A", struct.pack(">I", 3) + b"V" + b"t\x00"),
            field(b"F", b"F", struct.pack(">I", 0)),
        ]
    )
    payload = struct.pack(">HHQH", 60, 0, 2, spec.BasicProperties.FLAG_HEADERS)
    payload += struct.pack(">I", len(table)) + table
    header = struct.pack(">BHI", 2, 1, len(payload)) + payload + b"\xce"
    frames = [
        pika.frame.Method(1, spec.Basic.Deliver("ctag1.fast", 9, False, "e", "r")).marshal(),
        header,
        pika.frame.Body(1, b"{}").marshal(),
    ]
    reader, log = reader_with_log()
    reader.feed(b"".join(frames))
    assert log == pika_reading([frames])
    got = dict(log[0][2][SLOTS.index("headers")][1])
    assert got[str, "D"] == (Decimal, Decimal("123.45"))
    assert got[str, "u"] == (int, 60000) and got[str, "s"] == (int, -3)
    assert got[str, "l"] == (long, -(2**40)) and got[str, "t"] == (bool, True)
    assert got[str, "S"] == (str, "é") and got[str, "x"] == (bytes, b"\xff\x00")


def test_header_keys_are_decoded_once_and_the_cache_stays_bounded() -> None:
    def delivery(tag: int, key: str) -> list[bytes]:
        props = spec.BasicProperties(headers={key: tag, "same": "x"})
        return [
            pika.frame.Method(1, spec.Basic.Deliver("ctag1.fast", tag, False, "e", "r")).marshal(),
            pika.frame.Header(1, 1, props).marshal(),
            pika.frame.Body(1, b"x").marshal(),
        ]

    items = [delivery(i + 1, f"key-{i}") for i in range(_fastframes._NAMES + 10)]
    reader, log = reader_with_log()
    reader.feed(b"".join(raw for frames in items for raw in frames))
    assert log == pika_reading(items)
    assert len(reader._names) == _fastframes._NAMES  # every key decoded, only some kept


def test_continued_property_flags_are_skipped_like_pika() -> None:
    flags = spec.BasicProperties.FLAG_CONTENT_TYPE | spec.BasicProperties.FLAG_MESSAGE_ID | 1
    payload = struct.pack(">HHQHHH", 60, 0, 1, flags, 1, 0)  # two continuation words
    payload += b"\x03a/b" + b"\x02id"
    header = struct.pack(">BHI", 2, 1, len(payload)) + payload + b"\xce"
    frames = [
        pika.frame.Method(1, spec.Basic.Deliver("ctag1.fast", 3, False, "e", "r")).marshal(),
        header,
        pika.frame.Body(1, b"z").marshal(),
    ]
    reader, log = reader_with_log()
    reader.feed(b"".join(frames))
    assert log == pika_reading([frames])
    assert log[0][2][SLOTS.index("message_id")] == (str, "id")


def test_unregistered_consumers_and_forgotten_channels_go_to_pika() -> None:
    reader, log = reader_with_log()
    deliver = [
        pika.frame.Method(1, spec.Basic.Deliver("ctag1.fast", 1, False, "", "q")).marshal(),
        pika.frame.Header(1, 1, spec.BasicProperties()).marshal(),
        pika.frame.Body(1, b"x").marshal(),
    ]
    reader.unregister(1, "ctag1.fast")
    reader.feed(b"".join(deliver))
    reader.register(1, "ctag1.fast", lambda m: log.append(("message", 1, fields(m))))
    reader.forget(1)
    reader.feed(b"".join(deliver))
    assert log == [("pika", raw) for raw in deliver * 2]


def test_a_method_frame_cutting_a_delivery_short_hands_the_rest_to_pika() -> None:
    reader, log = reader_with_log()
    deliver = pika.frame.Method(1, spec.Basic.Deliver("ctag1.fast", 1, False, "", "q")).marshal()
    close = pika.frame.Method(1, spec.Channel.Close(505, "UNEXPECTED_FRAME", 60, 60)).marshal()
    stray = pika.frame.Header(1, 1, spec.BasicProperties()).marshal()
    reader.feed(deliver + close + stray)
    assert log == [("pika", close), ("pika", stray)]


def test_bad_frame_end_and_overlong_bodies_fail_like_pika() -> None:
    reader, _log = reader_with_log()
    broken = bytearray(pika.frame.Heartbeat().marshal())
    broken[-1] = 0
    with pytest.raises(InvalidFrameError):
        reader.feed(bytes(broken))
    reader, _log = reader_with_log()
    frames = [
        pika.frame.Method(1, spec.Basic.Deliver("ctag1.fast", 1, False, "", "q")).marshal(),
        pika.frame.Header(1, 1, spec.BasicProperties()).marshal(),
        pika.frame.Body(1, b"xy").marshal(),
    ]
    with pytest.raises(BodyTooLongError):
        reader.feed(b"".join(frames))


def test_bytes_received_before_the_reader_took_over_are_read_first() -> None:
    reader, log = reader_with_log()
    frame = pika.frame.Method(2, spec.Basic.QosOk()).marshal()
    reader.prepend(frame[:5])
    assert reader.feed(frame[5:]) == len(frame)
    assert log == [("pika", frame)]


@given(channel=st.integers(1, 65535), tag=st.integers(0, 2**64 - 1), multiple=st.booleans())
def test_ack_frame_is_pikas_basic_ack(channel: int, tag: int, multiple: bool) -> None:
    expected = pika.frame.Method(channel, spec.Basic.Ack(tag, multiple)).marshal()
    assert ack_frame(channel, tag, multiple) == expected


def test_the_fast_path_can_be_switched_off() -> None:
    assert _fastframes.ENABLED is True  # on by default; tests/integration flips it
