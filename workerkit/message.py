"""The message envelope, workerkit's headers, and body codecs.

Nothing here imports pika or aio-pika: transports build :class:`Message` from their own frames and
send :class:`Outgoing`.
"""

from __future__ import annotations

import calendar
import math
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields, is_dataclass, replace
from datetime import datetime
from decimal import Decimal
from types import MappingProxyType
from typing import Any

import orjson
from pydantic import BaseModel, TypeAdapter, ValidationError

from .compression import check_codec, compress, decompress
from .errors import ConfigurationError, DecodeError, InvalidMessage, MessageTooLarge

__all__ = [
    "Decoder",
    "Header",
    "Message",
    "Outgoing",
    "Properties",
    "check_headers",
    "copy_headers",
    "decoder_for",
    "encode_body",
]

JSON = "application/json"
TEXT = "text/plain"
BINARY = "application/octet-stream"


_NO_HEADERS: Mapping[Any, Any] = MappingProxyType({})


class Header:
    """Names of the headers workerkit writes. Publishers may not set ``workerkit-*`` headers."""

    PREFIX = "workerkit-"
    ATTEMPT = "workerkit-attempt"
    DELIVERIES = "workerkit-deliveries"
    REASON = "workerkit-reason"
    ERROR_TYPE = "workerkit-error-type"
    ERROR_MESSAGE = "workerkit-error-message"
    TRACEBACK = "workerkit-traceback"
    FIRST_FAILURE = "workerkit-first-failure"
    LAST_FAILURE = "workerkit-last-failure"
    ORIGINAL_EXCHANGE = "workerkit-original-exchange"
    ORIGINAL_ROUTING_KEY = "workerkit-original-routing-key"
    QUEUE = "workerkit-queue"


# Headers the broker adds on dead-lettering; a message republished by workerkit drops them so
# that they neither grow without bound nor pass for workerkit's own counts.
BROKER_DEATH_HEADERS = frozenset(
    {
        "x-death",
        "x-first-death-exchange",
        "x-first-death-queue",
        "x-first-death-reason",
        "x-last-death-exchange",
        "x-last-death-queue",
        "x-last-death-reason",
        "x-delivery-count",
        "x-acquired-count",  # RabbitMQ 4.3+
    }
)


@dataclass(slots=True)
class Properties:
    """The AMQP properties workerkit reads and writes, as one value shared by :class:`Message`,
    :class:`Outgoing`, the DLQ tools and the transports (copies use ``dataclasses.replace``)."""

    content_type: str | None = None
    content_encoding: str | None = None
    headers: Mapping[Any, Any] = field(default_factory=lambda: _NO_HEADERS)
    message_id: str | None = None
    correlation_id: str | None = None
    timestamp: int | None = None
    reply_to: str | None = None
    # Per-message TTL in milliseconds as AMQP carries it (a decimal string), and priority 0-255.
    expiration: str | None = None
    priority: int | None = None


class Message:
    """A delivered message as the handler sees it.

    ``attempt`` is 1 for the first delivery and counts retries; it comes from a header that only
    workerkit writes (publishers cannot set ``workerkit-*`` headers through workerkit). The AMQP
    properties are plain attributes (one object per delivery keeps the consume path fast);
    ``properties`` returns them as one :class:`Properties` value, and ``properties=`` sets them.
    """

    __slots__ = (
        "_began",  # time.monotonic() when a handler slot took it (with middleware only; runtime.py)
        "_republished",  # a retry, a scheduled message or a classic queue's recount (runtime.py)
        "body",
        "content_encoding",
        "content_type",
        "correlation_id",
        "delivery_tag",
        "exchange",
        "headers",
        "message_id",
        "priority",
        "queue",
        "redelivered",
        "reply_to",
        "routing_key",
        "timestamp",
    )

    def __init__(
        self,
        body: bytes,
        delivery_tag: int = 0,
        routing_key: str = "",
        exchange: str = "",
        redelivered: bool = False,
        headers: Mapping[Any, Any] | None = None,
        content_type: str | None = None,
        content_encoding: str | None = None,
        message_id: str | None = None,
        correlation_id: str | None = None,
        timestamp: int | None = None,
        reply_to: str | None = None,
        queue: str = "",
        priority: int | None = None,
        *,
        properties: Properties | None = None,
    ) -> None:
        self.body = body
        self.delivery_tag = delivery_tag
        self.routing_key = routing_key
        self.exchange = exchange
        self.redelivered = redelivered
        if properties is not None:
            headers = properties.headers
            content_type, content_encoding = properties.content_type, properties.content_encoding
            message_id, correlation_id = properties.message_id, properties.correlation_id
            timestamp, reply_to = properties.timestamp, properties.reply_to
            priority = properties.priority
        self.headers: Mapping[Any, Any] = headers if headers is not None else _NO_HEADERS
        self.content_type = content_type
        self.content_encoding = content_encoding
        self.message_id = message_id
        self.correlation_id = correlation_id
        self.timestamp = timestamp
        self.reply_to = reply_to
        self.queue = queue  # the queue it was consumed from (set by the runner)
        self.priority = priority
        self._began = 0.0
        self._republished = False

    @property
    def properties(self) -> Properties:
        """The AMQP properties as one value (a snapshot: changing it changes nothing here)."""
        return Properties(
            self.content_type,
            self.content_encoding,
            self.headers,
            self.message_id,
            self.correlation_id,
            self.timestamp,
            self.reply_to,
            priority=self.priority,
        )

    @property
    def attempt(self) -> int:
        value = self.headers.get(Header.ATTEMPT)
        return value if isinstance(value, int) and value >= 1 else 1

    def __repr__(self) -> str:
        return (
            f"Message(id={self.message_id!r}, routing_key={self.routing_key!r}, "
            f"attempt={self.attempt}, size={len(self.body)})"
        )


@dataclass(slots=True)
class Outgoing:
    """A message ready for a transport to publish (persistent, with workerkit's properties)."""

    exchange: str
    routing_key: str
    body: bytes
    properties: Properties

    @property
    def headers(self) -> dict[Any, Any]:
        """The headers, as a dict of this message's own (publish middleware may add some)."""
        headers = self.properties.headers
        if type(headers) is not dict:
            headers = dict(headers)
            self.properties = replace(self.properties, headers=headers)
        return headers

    @property
    def message_id(self) -> str:
        return self.properties.message_id or ""

    @classmethod
    def copy_of(
        cls,
        message: Message,
        exchange: str,
        routing_key: str,
        headers: Mapping[Any, Any],
        *,
        message_id: str | None = None,
    ) -> Outgoing:
        """The copy of a delivered message that workerkit publishes (retry, dead letter,
        replay): same body and properties, ``headers`` made re-encodable by
        :func:`copy_headers` (the broker's death headers and ``CC``/``BCC`` dropped)."""
        props = message.properties
        return cls(
            exchange,
            routing_key,
            message.body,
            replace(
                props,
                headers=copy_headers(headers),
                message_id=message_id or props.message_id,
                timestamp=props.timestamp or int(time.time()),
            ),
        )


def encode_body(body: object) -> tuple[bytes, str]:
    """Bytes and content type for a body: pydantic model or JSON value, ``str`` or ``bytes``."""
    if isinstance(body, bytes | bytearray | memoryview):
        return bytes(body), BINARY
    if isinstance(body, str):
        return body.encode("utf-8"), TEXT
    if isinstance(body, BaseModel):
        payload = body.model_dump_json().encode("utf-8")
    else:
        try:
            payload = orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY)
        except TypeError as exc:
            raise InvalidMessage(
                f"cannot encode body of type {type(body).__name__} as JSON: {exc}"
            ) from None
    # JSON has no NaN or infinity: both encoders write them as null, which would change the
    # data in silence. Only a body with a null can hold one (one byte search, in C), and
    # _finite walks it without building a path (0.5 us for a small dict; the path, 7 us, is
    # worked out only for the error).
    if b"null" in payload and not _finite(body):
        value = body.model_dump() if isinstance(body, BaseModel) else body
        where = _non_finite(value, "body") or "body"
        raise InvalidMessage(f"{where} is not a finite number: JSON has no NaN or infinity")
    return payload, JSON


_PLAIN = (str, int, bool, type(None))


def _finite(value: object) -> bool:
    """No NaN or infinity anywhere in ``value`` (what :func:`encode_body` encodes)."""
    kind = type(value)
    if kind is float:
        return math.isfinite(value)  # type: ignore[arg-type]
    if kind in _PLAIN:
        return True
    if kind is dict:
        return all(map(_finite, value.values()))  # type: ignore[attr-defined]
    if kind is list or kind is tuple:
        return all(map(_finite, value))  # type: ignore[call-overload]
    if isinstance(value, BaseModel):
        return all(map(_finite, value.__dict__.values()))  # its fields, no model_dump
    return _non_finite(value, "body") is None  # subclasses, dataclasses, numpy


def _non_finite(value: object, where: str) -> str | None:
    """Where in a JSON value a NaN or an infinity is (``body['a'][2]``), or None."""
    if isinstance(value, float):
        return None if math.isfinite(value) else where
    if isinstance(value, dict):
        for key, item in value.items():
            found = _non_finite(item, f"{where}[{key!r}]")
            if found is not None:
                return found
    elif isinstance(value, list | tuple):
        for index, item in enumerate(value):
            found = _non_finite(item, f"{where}[{index}]")
            if found is not None:
                return found
    elif is_dataclass(value) and not isinstance(value, type):  # slots or not
        return _non_finite({f.name: getattr(value, f.name) for f in fields(value)}, where)
    elif getattr(getattr(value, "dtype", None), "kind", "") in ("f", "c"):  # numpy, floats
        import numpy

        array: Any = value
        if not numpy.isfinite(array).all():
            return where
    return None


# The version (4) and RFC 4122 variant bits of a random UUID, as uuid.UUID(version=4) sets them.
_UUID4_CLEAR = ~((0xF << 76) | (0x3 << 62))
_UUID4_SET = (0x4 << 76) | (0x2 << 62)


def new_message_id() -> str:
    """A random (version 4) UUID in hex.

    Not ``uuid.uuid4()``: its ``os.urandom`` is a system call that lets go of the GIL, and with
    many threads publishing each release is a thread switch. ``random`` is reseeded after
    ``fork()``, so a child never repeats its parent's ids.
    """
    return "%032x" % (random.getrandbits(128) & _UUID4_CLEAR | _UUID4_SET)


# -- what AMQP can carry ----------------------------------------------------------------------
#
# The client encodes a header table value by value while it builds the frames; a value it cannot
# encode used to surface as a failed send (and a reconnect). Checked here, before anything is
# sent, an unencodable value is an InvalidMessage naming the header.

SHORT_STRING = 255  # bytes: header keys, ids, reply_to, routing keys, queue and exchange names
_LONG_MIN, _LONG_MAX = -(2**63), 2**63 - 1  # the signed 64-bit integer the client sends
# Headers whose values re-route a message (sender-selected distribution): a copy that workerkit
# publishes to a retry level or a DLQ must go exactly there, so they are dropped from copies.
ROUTING_HEADERS = frozenset({"CC", "BCC"})


def short_string(value: str | bytes, what: str) -> None:
    """Raise InvalidMessage unless ``value`` fits an AMQP short string (1 length byte)."""
    if isinstance(value, str):
        try:
            size = len(value.encode("utf-8"))
        except UnicodeEncodeError:
            raise InvalidMessage(f"{what} is not valid UTF-8 (a lone surrogate?)") from None
    elif isinstance(value, bytes):
        size = len(value)
    else:
        raise InvalidMessage(f"{what} must be a str, not {type(value).__name__}")
    if size > SHORT_STRING:
        raise InvalidMessage(f"{what} is {size} bytes; AMQP allows at most {SHORT_STRING}")


def check_headers(headers: Mapping[Any, Any], *, copy: bool = False) -> None:
    """Raise InvalidMessage unless every key and value can be sent in an AMQP table.

    Keys are ``str`` of at most 255 UTF-8 bytes (a copy of a delivered message may also
    keep the ``bytes`` keys the client gave it for non-UTF-8 keys). Values: ``str`` (valid
    UTF-8), ``bytes``, ``bool``, ``int`` in the signed 64-bit range, ``Decimal``, ``datetime``
    (sent as whole seconds, UTC), ``None``, and ``list`` / ``dict`` of these.
    """
    for key, value in headers.items():
        _check_key(key, copy)
        _check_value(value, f"header {key!r}", copy)
        if key in ROUTING_HEADERS and not (
            isinstance(value, list) and all(isinstance(item, str) for item in value)
        ):
            raise InvalidMessage(f"header {key!r} routes the message: it must be a list of str")


def _check_key(key: object, copy: bool) -> None:
    if isinstance(key, bytes) and copy:
        short_string(key, f"header key {key!r}")
        return
    if not isinstance(key, str):
        raise InvalidMessage(f"header key {key!r}: header keys must be str")
    short_string(key, f"header key {key[:40]!r}")


def _check_value(value: object, what: str, copy: bool) -> None:
    if isinstance(value, list):
        for item in value:
            _check_value(item, what, copy)
    elif isinstance(value, dict):
        for key, item in value.items():
            _check_key(key, copy)
            _check_value(item, f"{what}[{key!r}]", copy)
    else:
        _check_scalar(value, what)


def _check_scalar(value: object, what: str) -> None:
    if value is None or isinstance(value, bytes | bool):
        return
    if isinstance(value, datetime):
        # Sent as unsigned seconds since the epoch, UTC (naive means UTC).
        if calendar.timegm(value.utctimetuple()) < 0:
            raise InvalidMessage(f"{what}: AMQP timestamps cannot be before 1970")
    elif isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise InvalidMessage(f"{what}: not valid UTF-8 (a lone surrogate?)") from None
    elif isinstance(value, int):
        if not _LONG_MIN <= value <= _LONG_MAX:
            raise InvalidMessage(f"{what}: {value} is outside the signed 64-bit range")
    elif isinstance(value, Decimal):
        _check_decimal(value, what)
    elif isinstance(value, float):
        raise InvalidMessage(
            f"{what}: AMQP floats cannot be sent by the client; send str(value) or a Decimal"
        )
    else:
        raise InvalidMessage(f"{what}: a {type(value).__name__} cannot be sent as a header value")


def _check_decimal(value: Decimal, what: str) -> None:
    # AMQP decimals are a scale octet and a signed 32-bit unscaled value.
    if not value.is_finite():
        raise InvalidMessage(f"{what}: {value} is not a finite decimal")
    _sign, digits, exponent = value.normalize().as_tuple()
    assert isinstance(exponent, int)
    unscaled = int("".join(map(str, digits)) or "0") * 10 ** max(exponent, 0)
    if -exponent > 255 or unscaled >= 2**31:
        raise InvalidMessage(
            f"{what}: {value} does not fit an AMQP decimal (scale <= 255, 32 bits)"
        )


def copy_headers(headers: Mapping[Any, Any]) -> dict[Any, Any]:
    """The headers a workerkit copy (retry, dead-letter, replay) of a delivered message carries.

    The broker's death headers and the re-routing ``CC``/``BCC`` are dropped. Values another
    client could send but this one cannot encode are kept in a form it can: a float becomes its
    shortest round-tripping text (``"1.5"``, ``"nan"``), an integer outside the signed 64-bit
    range its decimal text, a tuple a list.
    """
    return {
        key: _encodable(value)
        for key, value in headers.items()
        if key not in BROKER_DEATH_HEADERS and key not in ROUTING_HEADERS
    }


def _encodable(value: Any) -> Any:
    if isinstance(value, float):
        return repr(value) if math.isfinite(value) else str(value)
    if isinstance(value, int) and not isinstance(value, bool):
        return value if _LONG_MIN <= value <= _LONG_MAX else str(value)
    if isinstance(value, list | tuple):
        return [_encodable(item) for item in value]
    if isinstance(value, dict):
        return {key: _encodable(item) for key, item in value.items()}
    return value


def build_outgoing(
    exchange: str,
    routing_key: str,
    body: object,
    *,
    headers: Mapping[str, Any] | None = None,
    message_id: str | None = None,
    correlation_id: str | None = None,
    reply_to: str | None = None,
    max_body_size: int,
    expiration: float | None = None,
    priority: int | None = None,
    compression: str = "none",
    compress_min_size: int = 0,
) -> Outgoing:
    """The one place where both publishers turn user input into an :class:`Outgoing`.

    ``max_body_size`` applies to the body before compression (what a consumer will decode);
    a body of at least ``compress_min_size`` bytes is compressed with ``compression``.
    """
    if not isinstance(routing_key, str) or not routing_key:
        raise InvalidMessage("routing key must be a non-empty str")
    short_string(routing_key, "routing key")
    payload, content_type = encode_body(body)
    if len(payload) > max_body_size:
        raise MessageTooLarge(f"body is {len(payload)} bytes, above max_body_size={max_body_size}")
    user_headers = dict(headers) if headers else {}
    if user_headers:
        check_headers(user_headers)
        for key in user_headers:
            if key.lower().startswith(Header.PREFIX):
                raise InvalidMessage(
                    f"header {key!r}: workerkit-* headers are written by workerkit only"
                )
    for value, what in ((message_id, "message_id"), (correlation_id, "correlation_id")):
        if value is not None:
            short_string(value, what)
    if reply_to is not None:
        short_string(reply_to, "reply_to")
    ttl = None if expiration is None else expiration_ms(expiration)
    if priority is not None:
        check_priority(priority)
    encoding = None
    if compression != "none" and len(payload) >= compress_min_size:
        payload, encoding = compress(payload, compression), compression
    return Outgoing(
        exchange,
        routing_key,
        payload,
        Properties(
            content_type=content_type,
            content_encoding=encoding,
            headers=user_headers,
            message_id=message_id or new_message_id(),
            correlation_id=correlation_id,
            timestamp=int(time.time()),
            reply_to=reply_to,
            expiration=ttl,
            priority=priority,
        ),
    )


# RabbitMQ's per-message TTL is an unsigned 32-bit count of milliseconds (about 49.7 days).
MAX_EXPIRATION_MS = 2**32 - 1


def expiration_ms(seconds: float) -> str:
    """The AMQP ``expiration`` property for a TTL of ``seconds``: whole milliseconds as text.

    InvalidMessage for a negative, non-finite or too large value (RabbitMQ would close the
    channel for it).
    """
    if isinstance(seconds, bool) or not isinstance(seconds, int | float):
        raise InvalidMessage(f"expiration must be a number of seconds, got {seconds!r}")
    if not math.isfinite(seconds) or seconds < 0:
        raise InvalidMessage(f"expiration must be a finite number of seconds >= 0, got {seconds!r}")
    ms = round(seconds * 1000)
    if ms > MAX_EXPIRATION_MS:
        raise InvalidMessage(
            f"expiration {seconds}s is above the broker's limit of {MAX_EXPIRATION_MS} ms"
        )
    return str(ms)


def check_priority(priority: int) -> None:
    """InvalidMessage unless ``priority`` is an int 0-255 (the AMQP octet)."""
    if isinstance(priority, bool) or not isinstance(priority, int) or not 0 <= priority <= 255:
        raise InvalidMessage(f"priority must be an int from 0 to 255, got {priority!r}")


def check_compression(codec: str, min_size: int) -> None:
    """ConfigurationError unless ``codec`` can compress here and ``min_size`` is >= 0."""
    check_codec(codec)
    if isinstance(min_size, bool) or not isinstance(min_size, int) or min_size < 0:
        raise ConfigurationError(f"compress_min_size must be an int >= 0, got {min_size!r}")


Decoder = Callable[[Message], Any]


def _body(message: Message, max_body_size: int) -> bytes:
    """The body to decode: as sent, or decompressed (capped at ``max_body_size``) when its
    ``content-encoding`` says so. One check on the uncompressed path."""
    encoding = message.content_encoding
    body = decompress(message.body, encoding, max_body_size) if encoding else message.body
    if len(body) > max_body_size:
        raise DecodeError(f"body is {len(body)} bytes, above {max_body_size}")
    return body


def _json_content(message: Message) -> None:
    ctype = message.content_type
    if ctype is not None and ctype != JSON and not is_json_type(ctype):
        # Pickle and friends are never deserialised: the body goes to the DLQ instead.
        raise DecodeError(f"content type {ctype!r} is not JSON")


def is_json_type(content_type: str) -> bool:
    """``application/json``, a ``+json`` type (RFC 6839: ``application/vnd.api+json``,
    ``application/problem+json``) or the older ``text/json``, parameters (``; charset=utf-8``)
    and letter case aside."""
    media = content_type.split(";", 1)[0].strip().lower()
    return media in (JSON, "text/json") or (
        media.startswith("application/") and media.endswith("+json")
    )


def decoder_for(annotation: Any, max_body_size: int) -> Decoder:
    """Build, once per worker, the function that turns a message into the handler's argument."""
    if annotation is Message:
        return lambda message: message
    if annotation is bytes:
        return lambda message: _body(message, max_body_size)
    if annotation is str:
        return _text_decoder(max_body_size)
    if annotation in (dict, list, Any, object):
        return _json_decoder(annotation if annotation in (dict, list) else None, max_body_size)
    return _validating_decoder(annotation, max_body_size)


def _text_decoder(max_body_size: int) -> Decoder:
    def decode_str(message: Message) -> str:
        body = _body(message, max_body_size)
        ctype = message.content_type
        if ctype is not None and not (ctype.startswith("text/") or is_json_type(ctype)):
            raise DecodeError(f"content type {ctype!r} is not text")
        try:
            return body.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise DecodeError(f"body is not UTF-8: {exc}") from None

    return decode_str


def _json_decoder(expected: type | None, max_body_size: int) -> Decoder:
    def decode_json(message: Message) -> Any:
        body = _body(message, max_body_size)
        _json_content(message)
        try:
            value = orjson.loads(body)
        except orjson.JSONDecodeError as exc:
            raise DecodeError(f"invalid JSON: {exc}") from None
        if expected is not None and not isinstance(value, expected):
            raise DecodeError(f"expected a JSON {expected.__name__}, got {type(value).__name__}")
        return value

    return decode_json


def _validating_decoder(annotation: Any, max_body_size: int) -> Decoder:
    # A model, or any other annotation (list[int], a TypedDict, a dataclass...): pydantic
    # validates straight from the JSON bytes, with its validator built once, here.
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        validate: Callable[[bytes], Any] = annotation.model_validate_json
    else:
        validate = TypeAdapter(annotation).validate_json

    def decode_validated(message: Message) -> Any:
        body = _body(message, max_body_size)
        _json_content(message)
        try:
            return validate(body)
        except ValidationError as exc:
            raise DecodeError(_summarise(exc)) from None

    return decode_validated


def _summarise(exc: ValidationError) -> str:
    errors = exc.errors(include_url=False, include_input=False)
    parts = [f"{'.'.join(str(p) for p in e['loc']) or '<body>'}: {e['msg']}" for e in errors[:5]]
    more = f" (+{len(errors) - 5} more)" if len(errors) > 5 else ""
    return f"{exc.error_count()} validation error(s): " + "; ".join(parts) + more
