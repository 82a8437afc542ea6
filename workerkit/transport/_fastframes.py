"""The consume channel's hot frames, read straight from the received bytes; pika does the rest.

A delivery is a Basic.Deliver method frame, a content header and body frames. pika decodes each
into objects (a Frame, a Deliver, a Header, a BasicProperties of fourteen fields, a Body),
copies its whole receive buffer after every frame to trim it, and routes the three through its
channel's content assembler and consumer dispatch: most of the CPU a delivery costs. Here one
loop walks the bytes with ``struct.unpack_from`` and builds the :class:`Message` directly,
decoding only the properties a Message has (and none past the timestamp, the last of them), the
headers with a table reader of its own for the kinds of value they mostly carry.

Only deliveries to a consumer registered here take this path. Every other frame, and the frames
of any other delivery, is handed to pika's own decoder unchanged and in order, so RPC replies,
Basic.Cancel from the broker, Channel.Close, heartbeats and publisher confirms behave exactly
as before. tests/unit/test_fastframes.py checks this reader against pika's decoder over
generated frames split at random boundaries.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import Any

from pika.compat import long
from pika.data import decode_value
from pika.exceptions import BodyTooLongError, InvalidFrameError

from ..message import Message

__all__ = ["ENABLED", "FrameReader", "ack_frame"]

# Off switch for the whole fast path (tests turn it off to run the fallback). A connection reads
# it once, when it opens.
ENABLED = True

_FRAME = struct.Struct(">BHI")  # type, channel, payload size
_U64 = struct.Struct(">Q")
_U32 = struct.Struct(">I")
_I32 = struct.Struct(">i")
_I64 = struct.Struct(">q")
_CONTENT = struct.Struct(">HHQH")  # class, weight, body size, first property-flags word
_ACK = struct.Struct(">BHIIQBB")
_DELIVER_ID = struct.pack(">HH", 60, 60)  # Basic.Deliver: class 60, method 60
_ACK_ID = (60 << 16) | 80
_METHOD, _HEADER, _BODY = 1, 2, 3
_FRAME_END = 0xCE
_MIN_FRAME = 8  # 7-byte frame header and the end octet
_NAMES = 4096  # decoded exchange, routing key and content type names kept

# Basic property flags, in wire order (AMQP 0-9-1 section 4.2.6.1); Message has the first ten's
# worth (delivery_mode is a single octet skipped on the way to the others).
_CONTENT_TYPE = 1 << 15
_CONTENT_ENCODING = 1 << 14
_HEADERS = 1 << 13
_DELIVERY_MODE = 1 << 12
_PRIORITY = 1 << 11
_CORRELATION_ID = 1 << 10
_REPLY_TO = 1 << 9
_EXPIRATION = 1 << 8
_MESSAGE_ID = 1 << 7
_TIMESTAMP = 1 << 6
# Fields after the timestamp are never read: flags with none of these bits set need no decoding.
_MESSAGE_FIELDS = 0xFFC0

OnMessage = Callable[[Message], None]
ToPika = Callable[[bytes], None]


def ack_frame(channel_number: int, delivery_tag: int, multiple: bool) -> bytes:
    """The Basic.Ack frame pika's ``basic_ack`` would send, built in one ``pack`` call."""
    return _ACK.pack(_METHOD, channel_number, 13, _ACK_ID, delivery_tag, multiple, _FRAME_END)


def _decoded(raw: bytes) -> Any:
    """Text, or the raw bytes when not UTF-8 (as pika decodes short strings)."""
    try:
        return raw.decode()
    except UnicodeDecodeError:
        return raw


def _table(data: bytes, at: int, names: dict[bytes, Any]) -> tuple[dict[Any, Any], int]:
    """An AMQP field table, decoded as ``pika.data.decode_table`` decodes it, value types
    included (pika's ``long`` for 64-bit integers: it re-encodes them as such).

    The kinds of value headers mostly carry (long strings, 32- and 64-bit integers, booleans,
    tables) are read here, any other by pika's ``decode_value``. pika tests a value's kind
    against each of sixteen in turn and unpacks through format strings: one 64-bit header cost a
    delivery about 13,000 instructions end to end, 8,000 here (callgrind, benchmarks/METRICS.md),
    five headers 2.6 us against 1.3 (timeit). Keys repeat from message to message: they are
    kept decoded in ``names`` (bounded), like the content types.
    """
    end = at + 4 + _U32.unpack_from(data, at)[0]
    at += 4
    table: dict[Any, Any] = {}
    while at < end:
        stop = at + 1 + data[at]
        raw = data[at + 1 : stop]
        key = names.get(raw)
        if key is None:
            key = _remembered(names, raw)
        kind = data[stop]
        at = stop + 1
        if kind == 0x53:  # S: long string
            stop = at + 4 + _U32.unpack_from(data, at)[0]
            table[key] = _decoded(data[at + 4 : stop])
            at = stop
        elif kind == 0x6C:  # l: 64-bit integer
            table[key] = long(_I64.unpack_from(data, at)[0])
            at += 8
        elif kind == 0x49:  # I: 32-bit integer
            table[key] = _I32.unpack_from(data, at)[0]
            at += 4
        elif kind == 0x74:  # t: boolean
            table[key] = data[at] != 0
            at += 1
        elif kind == 0x46:  # F: table
            table[key], at = _table(data, at, names)
        else:
            table[key], at = decode_value(data, stop)
    return table, at


def _remembered(names: dict[bytes, Any], raw: bytes) -> Any:
    """A name not in ``names`` yet, decoded, and kept while there is room."""
    name = _decoded(raw)
    if len(names) < _NAMES:
        names[raw] = name
    return name


def _short(data: bytes, at: int) -> tuple[str | bytes, int]:
    """An AMQP short string as pika decodes it: text, or the raw bytes when not UTF-8."""
    end = at + 1 + data[at]
    return _decoded(data[at + 1 : end]), end


class _Channel:
    """A channel with fast consumers, and the delivery being assembled on it (if ours)."""

    __slots__ = ("consumers", "got", "message", "on_message", "parts", "size")

    def __init__(self) -> None:
        self.consumers: dict[bytes, OnMessage] = {}
        # Between a Basic.Deliver taken here and its last body frame: the message so far.
        self.on_message: OnMessage | None = None
        self.message: Message | None = None
        self.size = -1  # body size from the content header; -1 until it came
        self.got = 0
        self.parts: list[bytes] = []


class FrameReader:
    """Splits a connection's received bytes into frames; takes the deliveries of registered
    consumers and hands every other frame, whole, to ``to_pika``."""

    __slots__ = ("_names", "channels", "frames", "need", "pending", "pending_size", "to_pika")

    def __init__(self, to_pika: ToPika) -> None:
        self.to_pika = to_pika
        self.channels: dict[int, _Channel] = {}
        self.pending: list[bytes] = []  # the start of a frame not complete yet
        self.pending_size = 0
        self.need = _MIN_FRAME  # bytes the pending frame needs before it can be read
        self.frames = 0  # frames taken here (pika counts the ones it decodes)
        # Exchange, routing key, content type and header names seen, decoded once (bounded).
        self._names: dict[bytes, str | bytes] = {}

    def register(self, channel_number: int, consumer_tag: str, on_message: OnMessage) -> None:
        channel = self.channels.get(channel_number)
        if channel is None:
            channel = self.channels[channel_number] = _Channel()
        channel.consumers[consumer_tag.encode()] = on_message

    def unregister(self, channel_number: int, consumer_tag: str) -> None:
        """Later deliveries to this consumer go to pika (which rejects those of a cancelled
        consumer, as before)."""
        channel = self.channels.get(channel_number)
        if channel is not None:
            channel.consumers.pop(consumer_tag.encode(), None)

    def forget(self, channel_number: int) -> None:
        """The channel closed: its number may be reused by a channel of pika's own."""
        self.channels.pop(channel_number, None)

    def prepend(self, data: bytes) -> None:
        """Bytes received before this reader took over (the start of a frame)."""
        if data:
            self.pending.insert(0, data)
            self.pending_size += len(data)
            self.need = _MIN_FRAME

    # One loop over three frame types, inlined on purpose: every call saved here is saved per
    # delivery (benchmarks/PROFILE.md); the complexity cap yields to it in this module only.
    def feed(self, data: bytes) -> int:  # noqa: C901
        """Read every complete frame in what has arrived; return the bytes consumed.

        One function on purpose: this runs three times per delivery, and each Python call
        saved here is a measurable share of the per-message cost (benchmarks/PROFILE.md).
        """
        if self.pending:
            self.pending.append(data)
            self.pending_size += len(data)
            if self.pending_size < self.need:
                return 0
            data = b"".join(self.pending)
            self.pending = []
        size = len(data)
        pos = 0
        frames = 0
        channels = self.channels
        names = self._names
        unpack_frame = _FRAME.unpack_from
        unpack_u64 = _U64.unpack_from
        unpack_content = _CONTENT.unpack_from
        while size - pos >= _MIN_FRAME:
            kind, number, length = unpack_frame(data, pos)
            start = pos + 7
            end = start + length
            if end >= size:
                self.need = end + 1 - pos
                break
            if data[end] != _FRAME_END:
                raise InvalidFrameError("Invalid FRAME_END marker")
            channel = channels.get(number)
            if channel is None:
                self.to_pika(data[pos : end + 1])
            elif kind == _BODY and channel.size >= 0:  # a body frame of a delivery of ours
                frames += 1
                got = channel.got + length
                if got != channel.size or channel.parts:
                    self._body(channel, data, start, end, got)
                else:  # the whole body in one frame: the common case
                    message = channel.message
                    on_message = channel.on_message
                    channel.message = channel.on_message = None
                    channel.size = -1
                    message.body = data[start:end]  # type: ignore[union-attr]
                    on_message(message)  # type: ignore[arg-type, misc]
            elif kind == _HEADER and channel.message is not None and channel.size < 0:
                frames += 1
                _class, _weight, body_size, flags = unpack_content(data, start)
                message = channel.message
                # Continued property flags (bit 0; none are defined past the first word).
                at = _after_flags(data, start + 14) if flags & 1 else start + 14
                if flags & _MESSAGE_FIELDS:
                    _properties(message, flags, data, at, names)
                if body_size:
                    channel.size = body_size
                    channel.got = 0
                else:
                    on_message = channel.on_message
                    channel.message = channel.on_message = None
                    message.body = b""
                    on_message(message)  # type: ignore[misc]
            elif kind == _METHOD and data[start : start + 4] == _DELIVER_ID:
                tag_end = start + 5 + data[start + 4]
                on_message = channel.consumers.get(data[start + 5 : tag_end])
                channel.message = None
                channel.size = -1
                if on_message is None:  # not one of ours: pika's (it rejects if cancelled)
                    self.to_pika(data[pos : end + 1])
                else:
                    frames += 1
                    at = tag_end + 9
                    cut = at + 1 + data[at]
                    raw = data[at + 1 : cut]
                    exchange = names.get(raw)
                    if exchange is None:
                        exchange = self._name(raw)
                    at = cut + 1 + data[cut]
                    raw = data[cut + 1 : at]
                    routing_key = names.get(raw)
                    if routing_key is None:
                        routing_key = self._name(raw)
                    if channel.parts:
                        channel.parts = []
                    channel.on_message = on_message
                    channel.message = Message(
                        b"",
                        unpack_u64(data, tag_end)[0],
                        routing_key,  # type: ignore[arg-type]
                        exchange,  # type: ignore[arg-type]
                        data[tag_end + 8] & 1 == 1,
                    )
            else:
                if kind == _METHOD:  # a content of ours cut short: pika takes over
                    channel.message = None
                    channel.size = -1
                self.to_pika(data[pos : end + 1])
            pos = end + 1
        else:
            self.need = _MIN_FRAME
        if pos < size:
            rest = data[pos:]
            self.pending = [rest]
            self.pending_size = len(rest)
        else:
            self.pending_size = 0
        self.frames += frames
        return pos

    def _name(self, raw: bytes) -> Any:
        """An exchange or routing key not seen yet, decoded and remembered (bounded)."""
        names = self._names
        if len(names) >= _NAMES:
            names.clear()
        name = names[raw] = _decoded(raw)
        return name

    @staticmethod
    def _body(channel: _Channel, data: bytes, start: int, end: int, got: int) -> None:
        """A body in several frames: keep the parts until the last one."""
        if got > channel.size:
            expected = channel.size
            channel.message = None
            channel.size = -1
            channel.parts = []
            raise BodyTooLongError(got, expected)
        channel.parts.append(data[start:end])
        if got < channel.size:
            channel.got = got
            return
        message, on_message = channel.message, channel.on_message
        assert message is not None and on_message is not None
        message.body = b"".join(channel.parts)
        channel.parts = []
        channel.message = channel.on_message = None
        channel.size = -1
        on_message(message)


def _after_flags(data: bytes, at: int) -> int:
    """The offset after continued property-flag words (bit 0 set: another word follows)."""
    while (data[at - 1] & 1) == 1:
        at += 2
    return at


def _properties(
    message: Message, flags: int, data: bytes, at: int, names: dict[bytes, Any]
) -> None:
    """Set the properties Message has, in wire order, and stop after the timestamp."""
    if flags & _CONTENT_TYPE:
        end = at + 1 + data[at]
        raw = data[at + 1 : end]
        value = names.get(raw)  # a handful of content types, over and over
        if value is None:
            value = _remembered(names, raw)
        message.content_type = value
        at = end
    if flags & _CONTENT_ENCODING:
        message.content_encoding, at = _short(data, at)  # type: ignore[assignment]
    if flags & _HEADERS:
        message.headers, at = _table(data, at, names)
    if flags & _DELIVERY_MODE:
        at += 1
    if flags & _PRIORITY:
        message.priority = data[at]
        at += 1
    if flags & _CORRELATION_ID:
        message.correlation_id, at = _short(data, at)  # type: ignore[assignment]
    if flags & _REPLY_TO:
        message.reply_to, at = _short(data, at)  # type: ignore[assignment]
    if flags & _EXPIRATION:
        at += 1 + data[at]
    if flags & _MESSAGE_ID:
        message_id, at = _short(data, at)
        message.message_id = message_id or None  # type: ignore[assignment]
    if flags & _TIMESTAMP:
        message.timestamp = _U64.unpack_from(data, at)[0]
