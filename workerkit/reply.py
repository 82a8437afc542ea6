"""Request/reply on the wire: what a request and its reply look like, shared by both sides.

Over RabbitMQ's direct reply-to (no reply queue is declared per call)::

    request   published as usual (topic exchange, mandatory, confirmed) with
              reply_to       = "amq.rabbitmq.reply-to" (the broker rewrites it to the caller's
                               channel-specific address) or any queue name the caller consumes
              correlation_id = an id unique among the caller's pending requests
    reply     published to the default exchange ("") with
              routing key    = the request's reply_to
              correlation_id = the request's correlation_id
              header workerkit-reply = "ok" | "error"
              ok:    the handler's return value, encoded like a published body (content type
                     application/json, text/plain or application/octet-stream); ``None`` is an
                     empty body without a content type
              error: an empty body; headers workerkit-error-type (the exception's qualified
                     name, or workerkit's own reason for an invalid body), workerkit-error-message,
                     workerkit-request-id (the request's message id) and workerkit-reason
                     (rejected, exhausted, delivery-limit, invalid; invalid-reply when the
                     handler returned a value that cannot be sent: the request was handled)

Nothing here does I/O: the runtime sends what :func:`reply_to_request` builds, a caller turns
what it receives back into a value (or :class:`~workerkit.errors.RemoteError`) with
:func:`decode_reply`.
"""

from __future__ import annotations

from typing import Any

from .errors import DecodeError, MessageTooLarge, RemoteError
from .message import BINARY, JSON, Header, Message, Outgoing, Properties, decoder_for, encode_body

__all__ = [
    "DIRECT_REPLY_TO",
    "ERROR",
    "INVALID_REPLY",
    "OK",
    "REPLY_HEADER",
    "REQUEST_ID_HEADER",
    "decode_reply",
    "encode_reply",
    "error_reply",
    "reply_mandatory",
    "reply_to_request",
]

DIRECT_REPLY_TO = "amq.rabbitmq.reply-to"
REPLY_HEADER = "workerkit-reply"
REQUEST_ID_HEADER = "workerkit-request-id"
OK = "ok"
ERROR = "error"
#: The reason of an error reply whose handler ran but returned a value that cannot be encoded.
INVALID_REPLY = "invalid-reply"

# Replies are small and never pass the DLQ tooling; the cap only bounds what a caller decodes.
DEFAULT_MAX_REPLY = 128 * 1024 * 1024


def encode_reply(value: object) -> tuple[bytes, str | None]:
    """Body and content type of an ``ok`` reply: like a published body; ``None`` is empty.

    Raises :class:`~workerkit.errors.InvalidMessage` for a value that cannot be encoded.
    """
    if value is None:
        return b"", None
    return encode_body(value)


def reply_to_request(
    request: Message, value: object, max_body_size: int = DEFAULT_MAX_REPLY
) -> Outgoing:
    """The ``ok`` reply answering ``request`` (which must have ``reply_to``) with ``value``.

    Raises :class:`~workerkit.errors.MessageTooLarge` for a body above ``max_body_size``, as a
    publish would: sent anyway, a body above the broker's own limit closes the worker's publish
    channel, and every reply on its way with it (RabbitMQ 4.x: 16 MiB).
    """
    body, content_type = encode_reply(value)
    if len(body) > max_body_size:
        raise MessageTooLarge(
            f"reply body is {len(body)} bytes, above max_body_size={max_body_size}"
        )
    return _reply(request, body, content_type, {REPLY_HEADER: OK})


def error_reply(
    request: Message, error_type: str, message: str, reason: str, request_id: str | None = None
) -> Outgoing:
    """The ``error`` reply telling the caller of ``request`` that it will not be answered.
    ``request_id``: the request's message id, else the id its dead letter is listed by."""
    headers = {
        REPLY_HEADER: ERROR,
        Header.ERROR_TYPE: error_type,
        Header.ERROR_MESSAGE: message,
        Header.REASON: reason,
        REQUEST_ID_HEADER: request_id or request.message_id or "",
    }
    return _reply(request, b"", None, headers)


def _reply(
    request: Message, body: bytes, content_type: str | None, headers: dict[str, Any]
) -> Outgoing:
    assert request.reply_to, "only a request (with reply_to) is answered"
    properties = Properties(
        content_type=content_type, headers=headers, correlation_id=request.correlation_id
    )
    return Outgoing("", request.reply_to, body, properties)


def reply_mandatory(reply_to: str) -> bool:
    """Whether a reply to ``reply_to`` is published ``mandatory``.

    Not for direct reply-to: RabbitMQ (3.10 measured) returns every mandatory publish to an
    ``amq.rabbitmq.reply-to.*`` address as unroutable even when it delivered it, and drops
    silently what it cannot deliver (the caller is gone). A reply to an ordinary queue is
    mandatory, so a missing reply queue is an ``Unroutable`` the worker logs and counts.
    """
    return not reply_to.startswith(DIRECT_REPLY_TO)


def decode_reply(
    reply: Message, reply_type: Any = None, max_body_size: int = DEFAULT_MAX_REPLY
) -> Any:
    """The value a reply carries, or :class:`~workerkit.errors.RemoteError` raised.

    Without ``reply_type``: ``None`` for an empty reply, Python values for JSON, ``str`` for
    text, ``bytes`` for anything else. With it, the body is decoded and validated exactly as a
    handler annotated with ``reply_type`` would receive it (a pydantic model, ``dict``,
    ``list[int]``...); a body that does not fit raises :class:`~workerkit.errors.DecodeError`,
    and so does an empty (``None``) reply unless ``reply_type`` admits ``None``.
    """
    headers = reply.headers
    status = _text(headers.get(REPLY_HEADER))
    if status == ERROR:
        raise RemoteError(
            _text(headers.get(Header.ERROR_TYPE)) or "unknown",
            _text(headers.get(Header.ERROR_MESSAGE)) or "",
            _text(headers.get(REQUEST_ID_HEADER)) or "",
            reason=_text(headers.get(Header.REASON)) or "",
        )
    if status is not None and status != OK:
        raise DecodeError(f"not a workerkit reply: {REPLY_HEADER} is {status!r}")
    if not reply.body and not reply.content_type:
        if reply_type is None or reply_type is Any or reply_type is object:
            return None
        return _empty_as(reply, reply_type)
    if reply_type is not None:
        return decoder_for(reply_type, max_body_size)(reply)
    ctype = reply.content_type or BINARY
    if ctype.startswith(JSON):
        return decoder_for(Any, max_body_size)(reply)
    if ctype.startswith("text/"):
        return decoder_for(str, max_body_size)(reply)
    return decoder_for(bytes, max_body_size)(reply)


def _empty_as(reply: Message, reply_type: Any) -> Any:
    """An empty reply (the handler returned ``None``) for a caller that asked for ``reply_type``:
    ``None`` when that type admits it (``Quote | None``), else :class:`DecodeError`: the caller
    gets what it asked for or a typed error, never a ``None`` its type does not allow."""
    if reply_type is Message:
        return reply
    from pydantic import TypeAdapter, ValidationError

    try:
        return TypeAdapter(reply_type).validate_python(None)
    except ValidationError:
        name = getattr(reply_type, "__name__", None) or repr(reply_type)
        raise DecodeError(
            f"empty reply (the handler returned None) where a {name} was asked for; ask for"
            f" {name} | None to accept it"
        ) from None


def _text(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return str(value)
