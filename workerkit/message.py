"""The message envelope, workerkit's headers, and body codecs.

Nothing here imports pika or aio-pika: transports build :class:`Message` from their own frames and
send :class:`Outgoing`.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import orjson
from pydantic import BaseModel, TypeAdapter, ValidationError

from .errors import DecodeError, InvalidMessage, MessageTooLarge

__all__ = [
    "Decoder",
    "Header",
    "Message",
    "Outgoing",
    "decoder_for",
    "encode_body",
]

JSON = "application/json"
TEXT = "text/plain"
BINARY = "application/octet-stream"


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


class Message:
    """A delivered message as the handler sees it.

    ``attempt`` is 1 for the first delivery and counts retries; it comes from a header that only
    workerkit writes (publishers cannot set ``workerkit-*`` headers through workerkit).
    """

    __slots__ = (
        "body",
        "content_encoding",
        "content_type",
        "correlation_id",
        "delivery_tag",
        "exchange",
        "headers",
        "message_id",
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
        headers: Mapping[str, Any] | None = None,
        content_type: str | None = None,
        content_encoding: str | None = None,
        message_id: str | None = None,
        correlation_id: str | None = None,
        timestamp: int | None = None,
        reply_to: str | None = None,
    ) -> None:
        self.body = body
        self.delivery_tag = delivery_tag
        self.routing_key = routing_key
        self.exchange = exchange
        self.redelivered = redelivered
        self.headers: Mapping[str, Any] = headers if headers is not None else _NO_HEADERS
        self.content_type = content_type
        self.content_encoding = content_encoding
        self.message_id = message_id
        self.correlation_id = correlation_id
        self.timestamp = timestamp
        self.reply_to = reply_to

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
    content_type: str | None
    headers: dict[str, Any] = field(default_factory=dict)
    message_id: str = ""
    correlation_id: str | None = None
    timestamp: int = 0
    reply_to: str | None = None
    content_encoding: str | None = None


def encode_body(body: object) -> tuple[bytes, str]:
    """Bytes and content type for a body: pydantic model or JSON value, ``str`` or ``bytes``."""
    if isinstance(body, bytes | bytearray | memoryview):
        return bytes(body), BINARY
    if isinstance(body, str):
        return body.encode("utf-8"), TEXT
    if isinstance(body, BaseModel):
        return body.model_dump_json().encode("utf-8"), JSON
    try:
        return orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY), JSON
    except TypeError as exc:
        raise InvalidMessage(
            f"cannot encode body of type {type(body).__name__} as JSON: {exc}"
        ) from None


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
) -> Outgoing:
    """The one place where both publishers turn user input into an :class:`Outgoing`."""
    if not routing_key or len(routing_key.encode()) > 255:
        raise InvalidMessage("routing key must be 1 to 255 bytes")
    payload, content_type = encode_body(body)
    if len(payload) > max_body_size:
        raise MessageTooLarge(f"body is {len(payload)} bytes, above max_body_size={max_body_size}")
    user_headers = dict(headers) if headers else {}
    for key in user_headers:
        if key.lower().startswith(Header.PREFIX):
            raise InvalidMessage(
                f"header {key!r}: workerkit-* headers are written by workerkit only"
            )
    return Outgoing(
        exchange=exchange,
        routing_key=routing_key,
        body=payload,
        content_type=content_type,
        headers=user_headers,
        message_id=message_id or new_message_id(),
        correlation_id=correlation_id,
        timestamp=int(time.time()),
        reply_to=reply_to,
    )


Decoder = Callable[[Message], Any]
_NO_HEADERS: Mapping[str, Any] = MappingProxyType({})


def _check_plain(message: Message, max_body_size: int) -> None:
    if message.content_encoding not in (None, "", "identity", "utf-8"):
        raise DecodeError(f"unsupported content encoding {message.content_encoding!r}")
    if len(message.body) > max_body_size:
        raise DecodeError(f"body is {len(message.body)} bytes, above {max_body_size}")


def _json_content(message: Message) -> None:
    ctype = message.content_type
    if ctype is not None and ctype != JSON and not ctype.startswith("application/json"):
        # Pickle and friends are never deserialised: the body goes to the DLQ instead.
        raise DecodeError(f"content type {ctype!r} is not JSON")


def decoder_for(annotation: Any, max_body_size: int) -> Decoder:
    """Build, once per worker, the function that turns a message into the handler's argument."""
    if annotation is Message:
        return lambda message: message
    if annotation is bytes:

        def decode_bytes(message: Message) -> bytes:
            _check_plain(message, max_body_size)
            return message.body

        return decode_bytes
    if annotation is str:

        def decode_str(message: Message) -> str:
            _check_plain(message, max_body_size)
            ctype = message.content_type
            if ctype is not None and not (ctype.startswith("text/") or ctype.startswith(JSON)):
                raise DecodeError(f"content type {ctype!r} is not text")
            try:
                return message.body.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise DecodeError(f"body is not UTF-8: {exc}") from None

        return decode_str
    if annotation in (dict, list, Any, object):
        expected: type | None = annotation if annotation in (dict, list) else None

        def decode_json(message: Message) -> Any:
            _check_plain(message, max_body_size)
            _json_content(message)
            try:
                value = orjson.loads(message.body)
            except orjson.JSONDecodeError as exc:
                raise DecodeError(f"invalid JSON: {exc}") from None
            if expected is not None and not isinstance(value, expected):
                raise DecodeError(
                    f"expected a JSON {expected.__name__}, got {type(value).__name__}"
                )
            return value

        return decode_json
    # A model, or any other annotation (list[int], a TypedDict, a dataclass...): pydantic
    # validates straight from the JSON bytes, with its validator built once, here.
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        validate: Callable[[bytes], Any] = annotation.model_validate_json
    else:
        validate = TypeAdapter(annotation).validate_json

    def decode_validated(message: Message) -> Any:
        _check_plain(message, max_body_size)
        _json_content(message)
        try:
            return validate(message.body)
        except ValidationError as exc:
            raise DecodeError(_summarise(exc)) from None

    return decode_validated


def _summarise(exc: ValidationError) -> str:
    errors = exc.errors(include_url=False, include_input=False)
    parts = [f"{'.'.join(str(p) for p in e['loc']) or '<body>'}: {e['msg']}" for e in errors[:5]]
    more = f" (+{len(errors) - 5} more)" if len(errors) > 5 else ""
    return f"{exc.error_count()} validation error(s): " + "; ".join(parts) + more
